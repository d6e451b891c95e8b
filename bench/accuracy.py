"""Benchmark: the accuracy protocol. Flagfiles x seeds on one data folder, mean +- sd.

Not a test: it trains. For each ``--flagfiles`` entry and each seed in ``--seeds`` it runs

    python -m covid_keras.train --flagfile=F --data_dir=D --run_dir=W/<name>/seed<k> \\
        --seed=k --report_splits=<the data folder's splits other than train and val>

(fresh processes, one at a time), then reads each run's ``metrics.json`` (the checkpoint
chosen on ``--val_split``, evaluated on val and once on each held-out split) and
``log.csv`` (one validation row per epoch). Per flagfile it prints the mean +- sd over
seeds of the val and held-out patient and slice AUC, the chosen epoch, and the stability
of training: the largest distance of the last 5 epochs' val patient AUC from their mean.
The val figures chose the checkpoint: only the held-out ones are an accuracy claim.

``--folds=K``: each run is ``train --folds=K`` (K fold models and their ensemble, issue 31):
val is then the out-of-fold prediction of every training patient (it chose the folds'
checkpoints and the decision), the held-out splits are the ensemble's, the chosen epoch
and the last-5 stability are the folds' means, and ``fold_val_patient_auc_sd`` is the
spread across folds. Each fold model is also evaluated alone on the held-out splits
(``member_<split>_patient_auc``: the members' mean, ``..._sd`` their spread within a seed,
``ensemble_minus_members_<split>_patient_auc``: what the average added, per seed), and
``<split>_vote_patient_*`` is a diagnostic that chooses nothing: the members' majority vote
at the ensemble's out-of-fold threshold, which was chosen on one member's scores a patient
(the ensemble's mean of five is narrower; bench/README.md, "Cross-validated ensembles").

Every run's own decision (decision.json: the threshold chosen on val, or out of fold for
an ensemble) on each held-out split, as train evaluated it (metrics.json):
``<split>_decision_patient_sensitivity``, ``..._specificity`` and ``..._accuracy`` say
whether the chosen threshold transfers.

A run whose ``metrics.json`` exists is reused, on the build of the data it trained on only
(run_info.json's manifest SHA-256: a build with a new salt has another record order), and
an interrupted one resumes where it stopped (the protocol is resumable; train refuses,
naming the flag, a run whose flags or data changed); ``--rerun`` trains it again from
scratch. The RESULT records the build (``dataset_manifest_sha256``), and a
``--baseline_json`` of another build is refused unless its records are the same (below).
With two flagfiles or more, every one
is also compared with the first, paired by seed (the patient AUC differences of each split,
their mean +- sd, and at how many seeds it was higher). ``--baseline_json`` compares each
model with its namesake in an earlier run's RESULT JSON the same way (the 5-fold ensembles
against the single models of the same flagfile and seeds; val only where both are alike:
out of fold is not a checkpoint-choosing val split). Ends with a table and a
``RESULT {json}`` line (``--output_json`` writes it too).

The RESULT also records the build without its salt (``dataset_content_sha256``: data_prep
orders the records by their salt-free content, so a rebuild elsewhere trains the same), the
package versions, what read the runs' figures (``read_with_sha256``: this script's figure
code and the evaluation code it runs), and for each run what trained it, stamped into the
run folder (``bench_trained_with.json``) before this script trains it: the code
(``code_sha256`` of the git-tracked training and evaluation code, configs/ and this
script's train command, comments and docstrings left out; "mixed" for a run resumed under
other code or not started by this script) and the threads (cores, processor, thread-count
and backend variables: another count sums in another order); the RESULT's own
``code_sha256`` and ``threads`` where one setting trained every run. A run folder does not
outlive its checkout; its RESULT does: ``--merge=a.json,b.json`` merges RESULTs of other
seeds of one protocol (same records, training code, threads, figure code, packages,
held-out splits, --folds, models, stages and flags; flagfiles under configs/, whose content
the code digest covers) into one, and a ``--baseline_json`` whose records it shares is
paired whatever its salt or folder. A file named by a flag after -- (``--init_from=w.h5``)
is recorded by its SHA-256 (``extra_flag_files``; RESULTs that name one flag with other
content do not merge). A training run's ``--baseline_json`` may have been trained by other
code (the pretraining's effect: a flagfile against its from-scratch self); what it is not
known to share (code, threads, packages, figure code, files after --) is printed and
recorded as ``baseline_differs_in``.

A flagfile whose ``--classifier_flagfile`` is another listed flagfile (DRENet's, which starts
from the ResNet-50 classifier) uses that flagfile's run of the same seed as its stage
(``--classifier_dir``): the classifier trains once and the pair is paired by construction.
With ``--folds`` that run is a ``--folds`` run with the same folds, and DRENet's fold k
starts from its fold k.

    .venv/bin/python bench/accuracy.py --data_dir=tfrecords/covid_ct_holdout --seeds=0,1,2 \\
        --flagfiles=configs/covid_ct_drenet.cfg,configs/covid_ct_resnet50.cfg,configs/covid_ct_drenet_scratch.cfg
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, parser  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LAST_EPOCHS = 5


def held_out_splits(data_dir: str, val_split: str) -> list[str]:
    names = {os.path.basename(p).split("-")[0]
             for p in glob.glob(os.path.join(data_dir, "*-*-of-*.tfrecord.gz"))}
    return sorted(names - {"train", val_split})


def mean_sd(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 \
        else 0.0
    return {"mean": mean, "sd": sd, "n": len(vals)}


def stability(log_csv: Path) -> dict:
    """Last epochs' val patient AUC (from a run's log.csv): see :func:`stability_of`."""
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    return stability_of([float(r["val_patient_auc"]) for r in rows
                         if r.get("val_patient_auc")])


def stability_of(aucs: list[float]) -> dict:
    """The last epochs' val patient AUC: their values, mean and largest distance from it."""
    last = aucs[-LAST_EPOCHS:]
    if not last:
        return {"last": [], "max_dev": None}
    mean = sum(last) / len(last)
    return {"last": last, "mean": mean, "max_dev": max(abs(v - mean) for v in last),
            "all": aucs}


def shared_stages(flagfiles: list[str]) -> dict[str, str]:
    """{flagfile: the listed flagfile its ``--classifier_flagfile`` names}: that flagfile's
    run of the same seed is then its classifier stage (``--classifier_dir``), trained once
    for both (the trainer reuses a finished stage only when its flags and data match)."""
    from covid_keras.core import cli
    real = {os.path.realpath(f): f for f in flagfiles}
    out = {}
    for flagfile in flagfiles:
        stage = [a.split("=", 1)[1] for a in cli.expand_flagfiles(["p", f"--flagfile={flagfile}"])
                 if a.startswith("--classifier_flagfile=")]
        if stage and stage[-1] and os.path.realpath(stage[-1]) in real:
            out[flagfile] = real[os.path.realpath(stage[-1])]
    return out


def interrupted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a started, unfinished training (a run killed mid-way)."""
    from covid_keras.io.run_dir import RunDir

    return run_dir.is_dir() and RunDir(str(run_dir)).state() == "resumed"


def seed_log(run_dir: Path, seed: int) -> Path:
    """The log of a seed's commands, beside its run folder."""
    return run_dir.parent / f"seed{seed}.log"


def run_logged(cmd: list[str], log_path: Path, what: str, append: bool = True) -> None:
    """Runs ``cmd`` in the repository, its output appended to ``log_path`` (or replacing
    it); a failure ends the benchmark in one line naming ``what`` and the log."""
    with open(log_path, "a" if append else "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): see {log_path}")


def train_command(flagfile: str, data_dir: str, run_dir: Path, seed: int, splits: list[str],
                  extra: list[str], rerun: bool, folds: int = 0) -> tuple[list[str], bool]:
    """(the seed's ``covid_keras.train`` command, whether it resumes an interrupted run)."""
    cmd = [sys.executable, "-m", "covid_keras.train", f"--flagfile={os.path.abspath(flagfile)}",
           f"--data_dir={data_dir}", f"--run_dir={run_dir}", f"--seed={seed}",
           f"--report_splits={','.join(splits)}", "--verbose=0",
           *(e.replace("{seed}", str(seed)) for e in extra)]
    # a folds run resumes at its fold by itself, an interrupted single run at its epoch
    # (train refuses, naming the flag, if its flags changed: --rerun starts it again); a
    # finished one is reused by run_one; --rerun replaces it
    resume = not rerun and interrupted(run_dir)
    if folds:
        cmd += [f"--folds={folds}"] + (["--overwrite"] if rerun else [])
    elif not resume:
        cmd.append("--overwrite")
    return cmd, resume


def manifest_sha256(data_dir: str) -> str:
    """The SHA-256 of the data folder's manifest.json: the build (a build into a new or
    emptied folder draws a new salt, so other keys and another record order), as the trainer
    records it in run_info.json (``dataset_manifest_sha256``)."""
    from covid_keras.core import files, schema

    return files.sha256(os.path.join(data_dir, schema.MANIFEST))


def package_versions() -> dict[str, str]:
    """Python's and the packages' versions (covid_keras.core.provenance), as train records
    them in run_info.json."""
    from covid_keras.core import provenance

    return provenance.package_versions()


def content_sha256(data_dir: str) -> str | None:
    """The build without its salt (manifest.json's ``content_sha256``: the same records in
    the same order, so the same trainings, in every rebuild of the same data with the same
    data_prep); None for a folder written before data_prep recorded it."""
    from covid_keras.core import schema

    manifest = json.loads(Path(data_dir, schema.MANIFEST).read_text())
    return manifest.get("content_sha256")


#: The code that trains and evaluates, and the flagfiles: RESULTs of other sessions are
#: merged (--merge) only where it is the same. The serving wing, the web page, export and
#: predict are not on that path (nothing there imports them). Of this script, the function
#: that makes the train command counts (the figures are read from what train and evaluate
#: wrote: a RESULT keeps each run's figures as its own run of this script read them).
CODE = ("covid_keras", "configs")
NOT_TRAINING = ("covid_keras/serving", "covid_keras/web_static", "covid_keras/web.py",
                "covid_keras/serve.py", "covid_keras/export.py", "covid_keras/predict.py")
#: In a run folder that this script trained: what trained it (:func:`trained_with`; its
#: code "mixed" when a resume ran other code than the start), so a reused run keeps its own.
STAMP_FILE = "bench_trained_with.json"
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
                    "TF_ENABLE_ONEDNN_OPTS", "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES")


def _strip_docstrings(tree) -> bytes:
    """``ast.dump`` of ``tree`` without its docstrings (attributes, so line numbers, left
    out)."""
    import ast

    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(node, scopes) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                and isinstance(first.value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def _normalised(path: Path, function: str | None = None) -> bytes:
    """What of a file decides what it does: a .py file's syntax tree without docstrings
    (comments, blank lines and layout do not count; ``function``: that function's alone), a
    flagfile's lines without comments (``#``, ``//``) and blank ones."""
    import ast

    text = path.read_text()
    if path.suffix != ".py":
        return "\n".join(ln.strip() for ln in text.splitlines() if ln.strip()
                         and not ln.strip().startswith(("#", "//"))).encode()
    tree = ast.parse(text)
    if function is not None:
        tree = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return _strip_docstrings(tree)


def _code_files(root: Path) -> list[Path]:
    """The .py and .cfg files of :data:`CODE` in ``root``, the serving wing left out: those
    git tracks in a checkout (a scratch file does not count), every one elsewhere."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *CODE], cwd=root,
                                capture_output=True, check=True).stdout.decode().split("\0")
        paths = [root / rel for rel in listed if rel]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for top in CODE for p in (root / top).rglob("*")]
    return sorted(p for p in paths if p.suffix in (".py", ".cfg") and p.is_file()
                  and "__pycache__" not in p.parts
                  and not p.relative_to(root).as_posix().startswith(NOT_TRAINING))


def _digest(parts: list[tuple[str, bytes]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for rel, data in parts:
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _code_parts(root: Path, suffixes: tuple[str, ...] = (".py", ".cfg")) -> list:
    """(path, :func:`_normalised` content) of each of :func:`_code_files` with a suffix in
    ``suffixes``, in path order: what both digests read."""
    return [(p.relative_to(root).as_posix(), _normalised(p)) for p in _code_files(root)
            if p.suffix in suffixes]


def code_sha256(root: Path = REPO) -> str:
    """SHA-256 (hex) of the training and evaluation code and the flagfiles under configs/
    as they are in ``root``, and of this script's :func:`train_command` (each file's path
    and :func:`_normalised` content, in path order): a comment or docstring does not change
    it, a changed line of code does."""
    parts = _code_parts(root)
    script = root / "bench" / "accuracy.py"
    if script.is_file():
        parts.append(("bench/accuracy.py:train_command", _normalised(script, "train_command")))
    return _digest(parts)


#: This script's functions that do not turn runs into figures (merging, printing, the
#: command line): left out of :func:`read_with_sha256`.
NOT_READING = ("main", "merge_main", "merge_results", "read_result", "read_baseline",
               "print_table", "runs_code", "runs_threads", "paired_with_baseline",
               "baseline_differences", "extra_flag_files", "recorded")


def read_with_sha256(root: Path = REPO) -> str:
    """SHA-256 (hex) of what turns finished runs into a RESULT's per-run figures: this
    script without :data:`NOT_READING` (the figures, the members' evaluation, the vote, the
    stability window) and the evaluation code it runs (covid_keras as in
    :func:`code_sha256`), comments and docstrings left out. RESULTs merge only where it is
    the same."""
    import ast

    script = root / "bench" / "accuracy.py"
    body = ast.parse(script.read_text()).body
    kept = [n for n in body if not (isinstance(n, ast.FunctionDef) and n.name in NOT_READING)]
    module = ast.Module(body=kept, type_ignores=[])
    parts = _code_parts(root, (".py",))
    parts.append(("bench/accuracy.py", _strip_docstrings(module)))
    return _digest(parts)


def cpu_model() -> str | None:
    """The processor's model name (oneDNN picks its kernels by the instruction set)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def threads() -> dict:
    """Where the numbers are summed: the cores this process may use, the processor, and the
    thread-count and backend variables it was given. The same flags and seed on other thread
    counts sum in another order (two ResNet-50 runs of one seed, one with 2 threads and one
    with 1, differed from the first epoch's loss)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu": cpu_model(),
            **{k: os.environ.get(k) for k in THREAD_VARIABLES}}


def trained_with(root: Path = REPO) -> dict:
    """A run's stamp: the code (:func:`code_sha256`) and the threads (:func:`threads`)."""
    return {"code_sha256": code_sha256(root), "threads": threads()}


def trained_on(run_dir: Path, folds: int = 0) -> str | None:
    """The manifest SHA-256 of the build that the run in ``run_dir`` trained on (its
    run_info.json; a --folds run: its folds.json), None where it is not recorded."""
    from covid_keras.io.run_dir import RunDir

    run = RunDir(str(run_dir))
    return ((run.folds() if folds else run.run_info()) or {}).get("dataset_manifest_sha256")


def run_one(flagfile: str, data_dir: str, run_dir: Path, seed: int, splits: list[str],
            extra: list[str], rerun: bool, folds: int = 0) -> dict:
    metrics_path = run_dir / "metrics.json"
    if not rerun and metrics_path.exists():
        built = trained_on(run_dir, folds)
        if built is not None and built != manifest_sha256(data_dir):
            raise SystemExit(f"{run_dir} was trained on another build of {data_dir} (its "
                             "manifest.json has changed since): pass --rerun to train it "
                             "again, or give this build another --work_dir")
    if rerun or not metrics_path.exists():
        cmd, resume = train_command(flagfile, data_dir, run_dir, seed, splits, extra, rerun,
                                    folds)
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}"
              + (" (resumed)" if resume else ""), flush=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        # stamped before it trains: a run killed now and resumed later by other code is
        # "mixed"; a resumed run that this script did not start is "mixed" too (unknown)
        now, stamp = trained_with(), run_dir / STAMP_FILE
        started = (json.loads(stamp.read_text()) if stamp.exists() else {}) if resume else now
        run_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({k: (now[k] if started.get(k) == now[k] else "mixed")
                                     for k in now}) + "\n")
        run_logged(cmd, seed_log(run_dir, seed), "training", append=resume)
        print(f"    took {time.time() - t0:.0f} s", flush=True)
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("folds", 0) != folds:
        raise SystemExit(f"{run_dir} holds a run with --folds={metrics.get('folds', 0)}, not "
                         f"--folds={folds}: give this protocol another --work_dir")
    stamp = run_dir / STAMP_FILE
    made = json.loads(stamp.read_text()) if stamp.exists() else {}
    out = {"seed": seed, "best_epoch": metrics.get("best_epoch"),
           "code_sha256": made.get("code_sha256"), "threads": made.get("threads"),
           "val": {k: metrics["best"][k] for k in KEYS if k in metrics["best"]}}
    if folds:
        per_fold = [stability(run_dir / f"fold_{k}" / "log.csv") for k in range(folds)]
        devs = [s["max_dev"] for s in per_fold if s["max_dev"] is not None]
        out["stability"] = {"max_dev": sum(devs) / len(devs) if devs else None,
                            "folds": per_fold}
        epochs = [f["best_epoch"] for f in metrics["fold_runs"]
                  if f.get("best_epoch") is not None]
        out["best_epoch"] = sum(epochs) / len(epochs) if epochs else None
        out["fold_val_patient_auc"] = metrics["fold_val_patient_auc"]
        out["members"] = member_figures(run_dir, folds, splits, seed)
        out["vote"] = vote_figures(run_dir, folds, splits, metrics)
    else:
        out["stability"] = stability(run_dir / "log.csv")
    for split in splits:
        m = metrics[f"best_on_{split}"]
        out[split] = {k: m[k] for k in KEYS if k in m}
    out["decision"] = decision_figures(metrics, splits)
    return out


def evaluated(run: Path, split: str, dest: Path, log_path: Path) -> dict:
    """``covid_keras.evaluate --run_dir=run --split=split`` (its decision.json's rule and
    threshold, no bootstrap, no report) into ``dest``: its metrics.json, reused while newer
    than the run's checkpoint and decision.json (a fold of a --folds run: its figures
    alone)."""
    found = dest / "metrics.json"
    inputs = [run / n for n in ("best.keras", "final.keras", "decision.json")
              if (run / n).exists()]
    newest = max((f.stat().st_mtime for f in inputs), default=0.0)
    if not found.exists() or found.stat().st_mtime < newest:
        run_logged([sys.executable, "-m", "covid_keras.evaluate", f"--run_dir={run}",
                    f"--split={split}", f"--output_dir={dest}", "--bootstrap=0",
                    "--noreport", "--max_explained_patients=0"],
                   log_path, f"evaluating {run} on {split}")
    return json.loads(found.read_text())


def member_figures(run_dir: Path, folds: int, splits: list[str], seed: int) -> dict:
    """Each fold model of a ``--folds`` run alone on each held-out split (:func:`evaluated`,
    into ``<run_dir>_members/fold_k_S``, beside the run folder, never in it):
    split -> ``patient_auc`` / ``slice_auc`` -> the K members' values. Beside the
    ensemble's figure of the same seed, they show what averaging the members gave."""
    out: dict = {}
    for split in splits:
        values: dict = {"patient_auc": [], "slice_auc": []}
        for k in range(folds):
            m = evaluated(run_dir / f"fold_{k}", split,
                          run_dir.parent / f"{run_dir.name}_members" / f"fold_{k}_{split}",
                          seed_log(run_dir, seed))
            values["patient_auc"].append(m["patient"]["auc"]["value"])
            values["slice_auc"].append(m["slice"]["auc"]["value"])
        out[split] = values
    return out


#: What the run's decision (decision.json: the threshold chosen on val, or out of fold for
#: an ensemble) gives on a held-out split: does the threshold transfer? (``accuracy`` is
#: the decision's, positive class vs the rest.)
DECISION_KEYS = ("sensitivity", "specificity", "accuracy")


def decision_figures(metrics: dict, splits: list[str]) -> dict:
    """The run (single model or ensemble) at its own decision on each held-out split, as
    train wrote it into metrics.json (``decision_on_<split>``): split -> the patient
    sensitivity, specificity and accuracy, and the threshold. A run without a decision
    (none could be chosen) has no entry."""
    out = {}
    for split in splits:
        d = metrics.get(f"decision_on_{split}")
        if d:
            out[split] = {k: d["patient"][k]["value"] for k in DECISION_KEYS}
            out[split]["threshold"] = d["decision"]["threshold"]
    return out


def vote_figures(run_dir: Path, folds: int, splits: list[str], metrics: dict) -> dict:
    """A diagnostic of a ``--folds`` run, held out (it chooses nothing): the members'
    majority vote at the ensemble's own decision. Each member's patient score by the
    decision's rule, from its own held-out predictions (:func:`member_figures`' slices.csv),
    against the out-of-fold threshold, which was chosen on one member's scores a patient;
    positive when at least half of the members are. split -> the patient sensitivity,
    specificity and accuracy (the positive class against the rest); a split without the
    decision or the members' predictions has no entry."""
    import numpy as np

    from covid_keras.evaluation.decision import aggregate
    from covid_keras.evaluation.metrics import binary_metrics

    out = {}
    for split in splits:
        decided = metrics.get(f"decision_on_{split}")
        paths = [run_dir.parent / f"{run_dir.name}_members" / f"fold_{k}_{split}" / "slices.csv"
                 for k in range(folds)]
        if not decided or not all(p.exists() for p in paths):
            continue
        rule, t = decided["decision"]["rule"], float(decided["decision"]["threshold"])
        pos = decided["positive_class"]
        count: dict = {}  # patient key -> members calling it positive
        labels: dict = {}
        for path in paths:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            # the positive class's column alone: the rule's patient score (mean or the
            # highest slice) against the rest
            pats = aggregate(np.array([[float(r[f"prob_{pos}"])] for r in rows]),
                             np.array([r["label"] == pos for r in rows], np.int64),
                             [r["patient_key"] for r in rows], rule, 0)
            labels.update(zip(pats.keys, pats.labels))
            for key, yes in zip(pats.keys, pats.score >= t):
                count[key] = count.get(key, 0) + int(yes)
        keys = list(count)
        called = np.array([2 * count[k] >= folds for k in keys])
        m = binary_metrics(np.array([labels[k] for k in keys]), called.astype(float), called)
        out[split] = {k: m[k] for k in DECISION_KEYS}
    return out


# The positive class's patient and slice AUC, the patient accuracy (argmax over every class)
# and, with more than two classes, the slice macro AUC (one-vs-rest).
KEYS = ("patient_auc", "slice_auc", "slice_macro_auc", "patient_accuracy")


def summarise(runs: list[dict], splits: list[str]) -> dict:
    summary = {}
    for split in ["val", *splits]:
        for key in KEYS:
            if all(key in r[split] for r in runs):
                summary[f"{split}_{key}"] = mean_sd([r[split][key] for r in runs])
    for split in splits:  # the chosen threshold, held out
        if runs and all(split in r.get("decision", {}) for r in runs):
            for key in DECISION_KEYS:
                summary[f"{split}_decision_patient_{key}"] = mean_sd(
                    [r["decision"][split][key] for r in runs])
        if runs and all(split in r.get("vote", {}) for r in runs):  # --folds: a diagnostic
            for key in DECISION_KEYS:
                summary[f"{split}_vote_patient_{key}"] = mean_sd(
                    [r["vote"][split][key] for r in runs])
    summary["last5_val_patient_auc_max_dev"] = mean_sd(
        [r["stability"]["max_dev"] for r in runs])
    summary["best_epoch"] = mean_sd([r["best_epoch"] for r in runs])
    if all("fold_val_patient_auc" in r for r in runs):
        summary["fold_val_patient_auc_sd"] = mean_sd(
            [r["fold_val_patient_auc"]["sd"] for r in runs])
    for split in splits:  # --folds: the members alone, and the ensemble's gain over them
        if runs and all(split in r.get("members", {}) for r in runs):
            members = [mean_sd(r["members"][split]["patient_auc"]) for r in runs]
            summary[f"member_{split}_patient_auc"] = mean_sd([m["mean"] for m in members])
            summary[f"member_{split}_patient_auc_sd"] = mean_sd([m["sd"] for m in members])
            summary[f"ensemble_minus_members_{split}_patient_auc"] = mean_sd(
                [r[split]["patient_auc"] - m["mean"] for r, m in zip(runs, members)])
    return summary


def paired_runs(runs: list[dict], ref_runs: list[dict], splits: list[str]) -> dict:
    """``runs`` against ``ref_runs``, paired by seed: per split (val and the held-out ones),
    the patient AUC differences of the seeds both ran, their mean +- sd and the wins."""
    ref = {r["seed"]: r for r in ref_runs}
    pair = {}
    for split in ["val", *splits]:
        seeds, diffs = [], []
        for r in runs:
            base = ref.get(r["seed"])
            a = r.get(split, {}).get("patient_auc")
            b = (base or {}).get(split, {}).get("patient_auc")
            if a is None or b is None or math.isnan(a) or math.isnan(b):
                continue
            seeds.append(r["seed"])
            diffs.append(a - b)
        if diffs:
            pair[split] = {"seeds": seeds, "diffs": diffs, **mean_sd(diffs),
                           "wins": sum(d > 0 for d in diffs)}
    return pair


def paired(models: dict, splits: list[str]) -> dict:
    """Each model against the first, paired by seed (``paired_runs``)."""
    names = list(models)
    if len(names) < 2:
        return {}
    return {f"{name} - {names[0]}": paired_runs(models[name]["runs"], models[names[0]]["runs"],
                                                splits)
            for name in names[1:]}


def paired_with_baseline(models: dict, baseline: dict, label: str,
                         splits: list[str], folds: int) -> dict:
    """``--baseline_json``: each model against the same-named model of an earlier RESULT
    (e.g. the 5-fold ensembles against the single models of the same flagfile), paired by
    seed. A model the baseline lacks is left out; so is val when one side is a --folds run
    and the other not (out-of-fold predictions against a val split that chose a
    checkpoint: two different quantities)."""
    compared = splits if baseline.get("folds", 0) != folds else ["val", *splits]
    out = {}
    for name, model in models.items():
        if name in baseline["models"]:
            pair = paired_runs(model["runs"], baseline["models"][name]["runs"], splits)
            out[f"{name} - {label}"] = {k: v for k, v in pair.items() if k in compared}
    return out


def read_baseline(path: str, data_dir: str, splits: list[str], names: set[str]) -> dict:
    """``--baseline_json``'s RESULT, checked: a ValueError (one line) for a file that is not
    one, another data folder or another build of it (where the RESULT records its build),
    other held-out splits, or none of these models."""
    try:
        baseline = read_result(path)
    except ValueError:
        raise ValueError(f"--baseline_json={path} is not a RESULT JSON of this script "
                         "(--output_json)") from None
    models = baseline["models"]
    if not set(models) & names:
        raise ValueError(f"--baseline_json={path} has none of these flagfiles' models (it "
                         f"has {sorted(models)})")
    theirs = baseline.get("data_dir")
    built = baseline.get("dataset_manifest_sha256")
    content = baseline.get("dataset_content_sha256")
    if content is not None and content == content_sha256(data_dir):
        pass  # the same records in the same order (a rebuild, perhaps elsewhere, another salt)
    elif theirs is None or os.path.realpath(theirs) != os.path.realpath(data_dir):
        raise ValueError(f"--baseline_json={path} was run on another data folder ({theirs}, "
                         f"here {data_dir})")
    elif built is not None and built != manifest_sha256(data_dir):
        raise ValueError(f"--baseline_json={path} was run on another build of {data_dir} "
                         "(its manifest.json has changed since): its runs are not paired "
                         "with these by data")
    if baseline.get("held_out") != splits:
        raise ValueError(f"--baseline_json={path} holds out {baseline.get('held_out')}, this "
                         f"data folder {splits}")
    return baseline


#: What a training run's ``--baseline_json`` may differ in and still pair (the pretraining's
#: effect pairs a flagfile with its from-scratch self: other code by design), recorded in
#: the RESULT (``baseline_differs_in``) and printed, so that no pair passes for more than it is.
BASELINE_ALIKE = ("code_sha256", "threads", "packages", "read_with_sha256",
                  "extra_flag_files")


def recorded(doc: dict, key: str):
    """What the RESULT ``doc`` records as ``key``, None where it does not: the code and
    threads that trained every one of its runs (:func:`runs_code`, :func:`runs_threads`),
    no file after -- where nothing came after --, else its entry."""
    if key == "code_sha256":
        return runs_code(doc)
    if key == "threads":
        return runs_threads(doc)
    if key == "extra_flag_files" and not doc.get("extra_flags"):
        return doc.get(key) or {}
    return doc.get(key)


def baseline_differences(res: dict, baseline: dict) -> list[str]:
    """The :data:`BASELINE_ALIKE` entries in which ``baseline`` is not known to match
    ``res`` (different, or not recorded on either side): the runs' training code and
    threads, the packages, the code that read the figures, the files named after --."""
    return [k for k in BASELINE_ALIKE
            if recorded(res, k) is None or recorded(res, k) != recorded(baseline, k)]


def extra_flag_files(extra: list[str], seeds: list[int]) -> dict[str, str]:
    """The SHA-256 of each file that a flag after -- names (``--init_from=weights.h5``; with
    ``{seed}``, each seed's), keyed by the flag as the run got it: code_sha256 covers the
    flagfiles under configs/, not a file given on the command line."""
    from covid_keras.core import files

    out = {}
    for flag in extra:
        for seed in seeds:
            given = flag.replace("{seed}", str(seed))
            value = given.split("=", 1)[1] if given.startswith("-") and "=" in given else given
            if value and os.path.isfile(value):
                out[given] = files.sha256(value)
    return out


def read_result(path: str) -> dict:
    """A RESULT JSON of this script (--output_json), or a ValueError naming the file."""
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        res = None
    models = res.get("models") if isinstance(res, dict) else None
    if not isinstance(models, dict) or not models or not all(
            isinstance(m, dict) and isinstance(m.get("runs"), list) and m["runs"]
            and all(isinstance(r, dict) and RUN_KEYS <= set(r) for r in m["runs"])
            for m in models.values()):
        raise ValueError(f"{path} is not a RESULT JSON of this script (--output_json): "
                         f"each model needs runs with {sorted(RUN_KEYS)}")
    return res


#: What every run of a RESULT holds (summarise reads them).
RUN_KEYS = {"seed", "val", "stability", "best_epoch"}


#: What RESULTs merged by --merge must share (recorded, not None): the same records
#: (whatever the salt), held-out splits, protocol and packages. Every run must also have
#: been trained by the same code (its ``code_sha256``).
MERGED_ALIKE = ("dataset_content_sha256", "read_with_sha256", "held_out", "folds",
                "extra_flags", "packages")
WHAT = {"dataset_content_sha256": "records (other data, or another data_prep or its flags)",
        "read_with_sha256": "code that read the runs' figures (read_with_sha256)",
        "packages": "package versions"}


def runs_code(res: dict) -> str | None:
    """The code_sha256 that trained every run of a RESULT, None unless they share one."""
    codes = {r.get("code_sha256") for m in res["models"].values() for r in m["runs"]}
    code = codes.pop() if len(codes) == 1 else None
    return None if code == "mixed" else code


def runs_threads(res: dict) -> dict | None:
    """The threads (:func:`threads`) that trained every run of a RESULT, None unless they
    share them."""
    found = {json.dumps(r.get("threads"), sort_keys=True)
             for m in res["models"].values() for r in m["runs"]}
    theirs = json.loads(found.pop()) if len(found) == 1 else None
    return theirs if isinstance(theirs, dict) else None  # a "mixed" stamp is a string


def merge_results(paths: list[str]) -> dict:
    """One RESULT from RESULTs of other seeds (e.g. one session each: a run folder does not
    outlive its checkout, its RESULT JSON does): their runs together, the summaries and the
    pairing by seed made again. A ValueError (one line) unless they share
    :data:`MERGED_ALIKE` and their runs' code, the same models and stages, and no seed."""
    if not paths:
        raise ValueError("--merge names no RESULT JSON")
    results = [read_result(p) for p in paths]
    first = results[0]
    for path, res in zip(paths, results):
        for key in MERGED_ALIKE:
            if res.get(key) is None:
                raise ValueError(f"{path} records no {key}: made by an older bench/accuracy.py"
                                 + (" or on a data folder built before data_prep recorded "
                                    "it (build it again)" if key.startswith("dataset") else "")
                                 + "; it cannot be merged")
        if runs_code(res) is None or runs_threads(res) is None:
            raise ValueError(f"{path} has runs that no one code or thread setting trained "
                             f"(a run without {STAMP_FILE}, reused from an older "
                             "bench/accuracy.py, or resumed under other code or threads): "
                             "it cannot be merged")
    for path, res in zip(paths[1:], results[1:]):
        for key in MERGED_ALIKE:
            if res.get(key) != first.get(key):
                raise ValueError(f"--merge: {path} and {paths[0]} differ in their "
                                 f"{WHAT.get(key, key)}: not one protocol")
        if runs_code(res) != runs_code(first):
            raise ValueError(f"--merge: {path} and {paths[0]} were trained by other "
                             "training or evaluation code, flagfiles or train command "
                             "(code_sha256): not one protocol")
        if runs_threads(res) != runs_threads(first):
            raise ValueError(f"--merge: {path} and {paths[0]} were trained on other thread "
                             f"counts ({runs_threads(res)} and {runs_threads(first)}): the "
                             "same seed sums in another order, not one protocol")
        if set(res["models"]) != set(first["models"]) or any(
                res["models"][n].get("classifier_stage") != m.get("classifier_stage")
                for n, m in first["models"].items()):
            raise ValueError(f"--merge: {path} has other models or stages "
                             f"({sorted(res['models'])}) than {paths[0]} "
                             f"({sorted(first['models'])})")
    for path, res in zip(paths, results):
        for name, model in res["models"].items():
            flagfile = str(model.get("flagfile", ""))
            if not Path(flagfile).as_posix().startswith("configs/"):
                raise ValueError(f"--merge: {path}'s model {name} was trained from "
                                 f"{flagfile or 'an unnamed flagfile'}, not one under configs/ "
                                 "(whose content code_sha256 covers): it cannot be merged")
    hashed: dict[str, tuple[str, str]] = {}  # flag -> (sha256, file)
    for path, res in zip(paths, results):
        for flag, digest in (res.get("extra_flag_files") or {}).items():
            if hashed.setdefault(flag, (digest, path))[0] != digest:
                raise ValueError(f"--merge: {flag} named another file's content in {path} "
                                 f"than in {hashed[flag][1]}: not one protocol")
    seen: dict[int, str] = {}
    for path, res in zip(paths, results):
        for seed in {r["seed"] for m in res["models"].values() for r in m["runs"]}:
            if seed in seen:
                raise ValueError(f"--merge: seed {seed} is in {seen[seed]} and {path}")
            seen[seed] = path
    splits = first["held_out"]
    models = {}
    for name, model in first["models"].items():
        runs = sorted((r for res in results for r in res["models"][name]["runs"]),
                      key=lambda r: r["seed"])
        models[name] = {**model, "runs": runs, "summary": summarise(runs, splits)}
    builds = {res.get("dataset_manifest_sha256") for res in results}
    return {**{k: first.get(k) for k in MERGED_ALIKE}, "code_sha256": runs_code(first),
            "threads": runs_threads(first),
            "data_dirs": sorted({str(res.get("data_dir")) for res in results}),
            "dataset_manifest_sha256": builds.pop() if len(builds) == 1 else None,
            "seeds": sorted(seen), "models": models, "paired": paired(models, splits),
            "extra_flag_files": {flag: d for flag, (d, _) in sorted(hashed.items())},
            "merged_from": [Path(p).name for p in paths]}


def print_table(res: dict) -> None:
    def f(ms):
        return "-" if ms["mean"] is None else f"{ms['mean']:.3f} +- {ms['sd']:.3f}"

    chose = ("val = out of fold (chose the folds' checkpoints and the decision); "
             f"{res['folds']}-fold ensembles" if res.get("folds") else "val chose the checkpoint")
    data = res.get("data_dir") or ", ".join(res.get("data_dirs", []))
    print(f"\nData {data}, seeds {res['seeds']}; {chose}, "
          f"held out: {res['held_out'] or 'none'}")
    keys = [k for k in next(iter(res["models"].values()))["summary"]]
    width = max(len(k) for k in keys)
    names = list(res["models"])
    print(" " * width + "  " + "  ".join(f"{n:>24}" for n in names))
    for k in keys:
        print(f"{k:<{width}}  " + "  ".join(f"{f(res['models'][n]['summary'][k]):>24}"
                                            for n in names))
    for label, pair in res.get("paired", {}).items():
        print(f"\npaired by seed, patient AUC of {label}:")
        for split, d in pair.items():
            seeds = ", ".join(f"s{s} {x:+.3f}" for s, x in zip(d["seeds"], d["diffs"]))
            print(f"  {split}: {d['mean']:+.3f} +- {d['sd']:.3f}, higher at {d['wins']} of "
                  f"{d['n']} ({seeds})")


#: The training options, which --merge does not take (their defaults).
DEFAULTS = {"data_dir": None, "flagfiles": None, "seeds": "0,1,2", "work_dir": "runs/accuracy",
            "val_split": "val", "rerun": False, "folds": 0}


def merge_main(p, args) -> int:
    """--merge: the RESULTs' merged RESULT (and, with --baseline_json, each model against
    the baseline's namesake, paired by seed: same records, code and held-out splits)."""
    given = [f"--{k}" for k, default in DEFAULTS.items() if getattr(args, k) != default]
    if given or args.extra:
        p.error(f"--merge takes RESULT JSONs only (and --baseline_json, --output_json): not "
                f"{' '.join(given + args.extra)}")
    try:
        res = merge_results([x for x in args.merge.split(",") if x])
        if args.baseline_json:
            name = args.baseline_json
            baseline = read_result(name)
            for key in ("dataset_content_sha256", "code_sha256", "threads",
                        "read_with_sha256", "packages", "held_out"):
                ours, theirs = res[key], recorded(baseline, key)
                if theirs is None:
                    raise ValueError(f"--baseline_json={name} records no {key} (or its runs "
                                     f"no one {key}): it is not paired with merged RESULTs")
                if theirs != ours:
                    raise ValueError(f"--baseline_json={name} differs from the merged "
                                     f"RESULTs in its {key}: its runs are not paired with these")
            theirs = baseline.get("extra_flag_files") or {}
            if any(theirs[f] != d for f, d in res["extra_flag_files"].items() if f in theirs):
                raise ValueError(f"--baseline_json={name} differs from the merged RESULTs in "
                                 "the content of a file named after --: its runs are not "
                                 "paired with these")
            if not set(baseline["models"]) & set(res["models"]):
                raise ValueError(f"--baseline_json={name} has none of these models (it has "
                                 f"{sorted(baseline['models'])})")
            label = f"baseline ({Path(name).name})"
            res["paired"].update(paired_with_baseline(res["models"], baseline, label,
                                                      res["held_out"], res["folds"]))
    except ValueError as exc:
        p.error(str(exc))
    emit_result(res, print_table, args.output_json)
    return 0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--data_dir", help="data_prep output (train/val[/test]). Required "
                   "unless --merge.")
    p.add_argument("--flagfiles", help="Comma-separated training flagfiles, one model each. "
                   "Required unless --merge.")
    p.add_argument("--merge", default=None,
                   help="Comma-separated RESULT JSONs (--output_json) of other seeds of one "
                   "protocol (e.g. one session each): trains nothing, writes their merged "
                   "RESULT. They must record the same content_sha256 of the data, "
                   "code_sha256 and threads of every run, read_with_sha256, packages, "
                   "held-out splits, --folds, models (flagfiles under configs/) and flags "
                   "after -- (and the content of the files they name).")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (default 0,1,2).")
    p.add_argument("--work_dir", default="runs/accuracy", help="Run folders go here.")
    p.add_argument("--val_split", default="val")
    p.add_argument("--rerun", action="store_true", help="Train again even if finished.")
    p.add_argument("--folds", type=int, default=0, help="Each run a K-fold ensemble (train "
                   "--folds=K); 0: single runs.")
    p.add_argument("--output_json", default=None)
    p.add_argument("--baseline_json", default=None,
                   help="The RESULT JSON (--output_json) of an earlier run of this script, "
                   "e.g. the single models: each model is also compared with its namesake "
                   "there, paired by seed (the 5-fold ensemble against the single model).")
    p.add_argument("extra", nargs="*", help="More train flags after --, for every run "
                   "(e.g. -- --epochs=3); {seed} in them is the run's seed (e.g. -- "
                   "--classifier_dir=runs/acc/covid_ct_resnet50/seed{seed}: a stage shared "
                   "with another flagfile's run of the same seed).")
    args = p.parse_args(argv)
    if args.merge:
        return merge_main(p, args)
    for flag in ("data_dir", "flagfiles"):
        if not getattr(args, flag):
            p.error(f"--{flag} is required (unless --merge)")
    if not os.path.isfile(os.path.join(args.data_dir, "manifest.json")):
        p.error(f"--data_dir={args.data_dir} is not a data_prep output (no manifest.json)")
    # one spelling for every run: a --folds run's folds.json (and so whether another
    # flagfile's --folds run can share its folds as stages) records the path as given
    args.data_dir = os.path.realpath(args.data_dir)
    args.work_dir = os.path.abspath(args.work_dir)  # the trainings run in the repository
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    splits = held_out_splits(args.data_dir, args.val_split)
    if args.folds == 1 or args.folds < 0:
        p.error(f"--folds must be 0 or at least 2. Received: {args.folds}")
    baseline = None
    if args.baseline_json:
        try:
            baseline = read_baseline(args.baseline_json, args.data_dir, splits,
                                     {Path(f).stem for f in args.flagfiles.split(",")})
        except ValueError as exc:
            p.error(str(exc))
    res = {"data_dir": args.data_dir, "dataset_manifest_sha256": manifest_sha256(args.data_dir),
           "dataset_content_sha256": content_sha256(args.data_dir),
           "packages": package_versions(), "read_with_sha256": read_with_sha256(),
           "seeds": seeds, "held_out": splits, "models": {},
           "extra_flags": args.extra, "folds": args.folds,
           "extra_flag_files": extra_flag_files(args.extra, seeds)}
    flagfiles = [f for f in args.flagfiles.split(",") if f]
    for flagfile in flagfiles:
        if not os.path.isfile(flagfile):
            p.error(f"no such flagfile: {flagfile}")
    # --folds too: DRENet's fold k then starts from fold k of the same seed's ResNet-50 run
    # not with flags after --: they reach the other flagfile's runs, never the stage that
    # the trainer runs from the flagfile alone (its --reuse would refuse them, naming them)
    found = shared_stages(flagfiles)
    shared = {} if args.extra else found
    if args.extra and found:
        print(f"flags after -- ({' '.join(args.extra)}): each run trains its own classifier "
              "stage (the stage takes only its flagfile's flags)", flush=True)
    done = {}
    # a flagfile whose run is another's classifier stage trains first; results keep the order
    for flagfile in sorted(flagfiles, key=lambda f: f in shared):
        name = Path(flagfile).stem
        extra = list(args.extra)
        if flagfile in shared:  # the same seed's run of the other flagfile is the stage
            extra.append(f"--classifier_dir={Path(args.work_dir).resolve()}/"
                         f"{Path(shared[flagfile]).stem}/seed{{seed}}")
        runs = [run_one(flagfile, args.data_dir, Path(args.work_dir) / name / f"seed{s}", s,
                        splits, extra, args.rerun, args.folds) for s in seeds]
        where = Path(os.path.abspath(flagfile))
        done[flagfile] = {"flagfile": where.relative_to(REPO).as_posix()
                          if where.is_relative_to(REPO) else str(where), "runs": runs,
                          "summary": summarise(runs, splits)}
        if flagfile in shared:
            done[flagfile]["classifier_stage"] = shared[flagfile]
    res["models"] = {Path(f).stem: done[f] for f in flagfiles}
    res["code_sha256"] = runs_code(res)  # None unless one code trained every run
    res["threads"] = runs_threads(res)  # likewise
    res["paired"] = paired(res["models"], splits)
    if baseline is not None:
        label = f"baseline ({Path(args.baseline_json).name})"
        res["paired"].update(paired_with_baseline(res["models"], baseline, label, splits,
                                                  args.folds))
        res["baseline_differs_in"] = baseline_differences(res, baseline)
        if res["baseline_differs_in"]:
            print(f"{label} is not known to match these runs in: "
                  f"{', '.join(res['baseline_differs_in'])} (recorded as baseline_differs_in: "
                  "its pairs compare those too)", flush=True)
    emit_result(res, print_table, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
