"""bench/accuracy.py's own arithmetic and orchestration (no training): the paired-by-seed
comparison, resuming, and the members of a --folds run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import accuracy  # noqa: E402


def run(seed, val, test):
    return {"seed": seed, "val": {"patient_auc": val}, "test": {"patient_auc": test},
            "stability": {"max_dev": 0.1}, "best_epoch": 2}


def test_paired_differences_match_seeds_and_skip_missing_ones():
    models = {"r50": {"runs": [run(0, 0.7, 0.6), run(1, 0.8, 0.9), run(2, 0.6, 0.5)]},
              "dre": {"runs": [run(1, 0.9, 0.7), run(0, 0.8, 0.8), run(3, 0.5, 0.5),
                               run(2, float("nan"), 0.75)]}}
    out = accuracy.paired(models, ["test"])["dre - r50"]
    assert out["test"]["seeds"] == [1, 0, 2]  # seed 3: no ResNet-50 run to pair with
    assert out["test"]["diffs"] == pytest.approx([-0.2, 0.2, 0.25])
    assert out["test"]["mean"] == pytest.approx(0.25 / 3)
    assert out["test"]["sd"] == pytest.approx(math.sqrt(
        sum((d - 0.25 / 3) ** 2 for d in (-0.2, 0.2, 0.25)) / 2))
    assert out["test"]["wins"] == 2 and out["test"]["n"] == 3
    assert out["val"]["seeds"] == [1, 0]  # seed 2's val is nan
    assert accuracy.paired({"r50": models["r50"]}, ["test"]) == {}


def test_a_baseline_json_pairs_each_model_with_its_namesake_by_seed(tmp_path, monkeypatch,
                                                                    capsys):
    """--baseline_json: the ensembles of this run against the single models of an earlier
    run's RESULT JSON, paired by seed (a seed the baseline lacks is left out; val too, which
    is out of fold on one side and the checkpoint-choosing split on the other); a file that
    is not such a JSON, names none of the flagfiles' models, or was run on other data or
    held-out splits, is a one-line error."""
    import json
    import os

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    (data / "test-00000-of-00001.tfrecord.gz").write_bytes(b"")  # a held-out split
    cfg = tmp_path / "r50.cfg"
    cfg.write_text("--model=classifier\n")
    held = {0: 0.72, 1: 0.70, 2: 0.75}

    given = []

    def fake_run_one(flagfile, data_dir, run_dir, seed, splits, extra, rerun, folds=0):
        given.append(data_dir)
        return {**run(seed, 0.7, held[seed]), "stability": {"max_dev": 0.1}, "best_epoch": 3}

    monkeypatch.setattr(accuracy, "run_one", fake_run_one)
    (tmp_path / "link").symlink_to(data)  # the runs get one spelling of the data folder
    assert accuracy.main([f"--data_dir={tmp_path / 'link'}", f"--flagfiles={cfg}",
                          "--seeds=0", f"--work_dir={tmp_path / 'w'}"]) == 0
    assert given == [os.path.realpath(data)]
    base = tmp_path / "single.json"
    single = {"data_dir": str(data), "held_out": ["test"], "folds": 0,
              "models": {"r50": {"runs": [run(0, 0.6, 0.52), run(1, 0.8, 0.82)]},
                         "other": {"runs": [run(0, 0.1, 0.1)]}}}
    base.write_text(json.dumps(single))
    out = tmp_path / "cv.json"

    def main(*extra):
        return accuracy.main([f"--data_dir={data}", f"--flagfiles={cfg}", "--seeds=0,1,2",
                              f"--work_dir={tmp_path / 'w'}", f"--baseline_json={base}",
                              f"--output_json={out}", *extra])

    assert main("--folds=5") == 0
    pair = json.loads(out.read_text())["paired"]
    assert list(pair) == ["r50 - baseline (single.json)"]
    assert set(pair["r50 - baseline (single.json)"]) == {"test"}  # no val: not alike
    test = pair["r50 - baseline (single.json)"]["test"]
    assert test["seeds"] == [0, 1]  # seed 2: no single model to pair with
    assert test["diffs"] == pytest.approx([0.20, -0.12])
    assert test["mean"] == pytest.approx(0.04) and test["wins"] == 1 and test["n"] == 2
    assert "paired by seed, patient AUC of r50 - baseline (single.json):" in capsys.readouterr().out
    assert main() == 0  # single runs against single runs: val is alike
    # the RESULT records its build; a baseline of the same build (the same manifest) pairs
    assert json.loads(out.read_text())["dataset_manifest_sha256"] == accuracy.manifest_sha256(
        str(data))
    base.write_text(out.read_text())
    assert main() == 0
    base.write_text(json.dumps(single))
    assert set(json.loads(out.read_text())["paired"]["r50 - baseline (single.json)"]) == {
        "val", "test"}
    for doc, message in (
            ("not json", "is not a RESULT JSON"), ([1, 2], "is not a RESULT JSON"),
            ({**single, "models": {"r50": {"runs": [{"val": {}}]}}}, "is not a RESULT JSON"),
            ({**single, "models": {"x": {"runs": [run(0, 0.1, 0.1)]}}}, "has none of these"),
            ({**single, "data_dir": str(tmp_path)}, "was run on another data folder"),
            ({**single, "dataset_manifest_sha256": "0" * 64}, "was run on another build of"),
            ({**single, "held_out": []}, "holds out [], this data folder ['test']")):
        base.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(SystemExit):
            main()
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_listed_classifier_flagfile_is_the_stage_trained_first(tmp_path, monkeypatch):
    """configs/covid_ct_drenet.cfg names covid_ct_resnet50.cfg as its classifier stage: with
    both listed, the ResNet-50 runs train first and each DRENet run reads the same seed's
    ResNet-50 run as --classifier_dir (trained once); the scratch flagfile gets no stage."""
    repo = Path(__file__).resolve().parents[1] / "configs"
    dre, r50, scratch = (str(repo / n) for n in ("covid_ct_drenet.cfg", "covid_ct_resnet50.cfg",
                                                 "covid_ct_drenet_scratch.cfg"))
    assert accuracy.shared_stages([dre, r50, scratch]) == {dre: r50}
    assert accuracy.shared_stages([dre, scratch]) == {}  # its stage is not listed: its own
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    calls = []

    def fake_run_one(flagfile, data_dir, run_dir, seed, splits, extra, rerun, folds=0):
        calls.append((Path(flagfile).name, seed, [e.replace("{seed}", str(seed)) for e in extra]))
        return {**run(seed, 0.5, 0.5), "stability": {"max_dev": 0.1}, "best_epoch": 3}

    monkeypatch.setattr(accuracy, "run_one", fake_run_one)
    work = tmp_path / "w"
    assert accuracy.main([f"--data_dir={data}", f"--flagfiles={dre},{r50},{scratch}",
                          "--seeds=0,1", f"--work_dir={work}"]) == 0
    assert [c[:2] for c in calls] == [("covid_ct_resnet50.cfg", 0), ("covid_ct_resnet50.cfg", 1),
                                      ("covid_ct_drenet_scratch.cfg", 0),
                                      ("covid_ct_drenet_scratch.cfg", 1),
                                      ("covid_ct_drenet.cfg", 0), ("covid_ct_drenet.cfg", 1)]
    assert calls[4][2] == [f"--classifier_dir={work.resolve()}/covid_ct_resnet50/seed0"]
    assert calls[5][2] == [f"--classifier_dir={work.resolve()}/covid_ct_resnet50/seed1"]
    assert all(c[2] == [] for c in calls[:4])
    # a --classifier_dir given after -- wins: nothing added
    calls.clear()
    accuracy.main([f"--data_dir={data}", f"--flagfiles={dre},{r50}", "--seeds=0",
                   f"--work_dir={work}", "--", "--classifier_dir=x{seed}"])
    assert [c[2] for c in calls] == [["--classifier_dir=x0"], ["--classifier_dir=x0"]]
    # other flags after --: not shared (the stage the trainer runs takes only its flagfile's
    # flags, so its --reuse of the ResNet-50 run would refuse them): DRENet trains its own
    calls.clear()
    accuracy.main([f"--data_dir={data}", f"--flagfiles={dre},{r50}", "--seeds=0",
                   f"--work_dir={work}", "--", "--epochs=3"])
    assert [c[2] for c in calls] == [["--epochs=3"], ["--epochs=3"]]
    # --folds: the same, the stage being the ResNet-50 --folds run of the seed (its fold k
    # is DRENet's fold k's stage)
    calls.clear()
    accuracy.main([f"--data_dir={data}", f"--flagfiles={dre},{r50}", "--seeds=3",
                   f"--work_dir={work}", "--folds=5"])
    assert calls == [("covid_ct_resnet50.cfg", 3, []), ("covid_ct_drenet.cfg", 3, [
        f"--classifier_dir={work.resolve()}/covid_ct_resnet50/seed3"])]


def test_an_interrupted_run_resumes_and_a_new_or_rerun_one_starts_again(tmp_path, monkeypatch):
    """A killed single run (run_info.json, no final.keras) is trained again without
    --overwrite, so train resumes it at its epoch and the seed's log is appended to; a new
    run, or any run under --rerun, gets --overwrite and a fresh log."""
    import json
    import subprocess
    import types

    commands = []

    def fake_run(cmd, stdout=None, **kw):
        commands.append(cmd)
        stdout.write("trained\n")
        run_dir = Path(next(a for a in cmd if a.startswith("--run_dir=")).split("=", 1)[1])
        (run_dir / "metrics.json").write_text(json.dumps({"best_epoch": 1, "best": {}}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(accuracy, "stability", lambda path: {"max_dev": None})
    monkeypatch.setattr(accuracy, "trained_with", lambda root=None: {"code_sha256": "c"})
    killed, new = tmp_path / "w" / "seed0", tmp_path / "w" / "seed1"
    killed.mkdir(parents=True)
    (killed / "run_info.json").write_text("{}")
    (tmp_path / "w" / "seed0.log").write_text("epoch 3 of 12\n")
    new.mkdir()
    for run_dir, seed in ((killed, 0), (new, 1)):
        accuracy.run_one("f.cfg", "d", run_dir, seed, [], [], rerun=False)
    assert "--overwrite" not in commands[0] and "--overwrite" in commands[1]
    assert (tmp_path / "w" / "seed0.log").read_text() == "epoch 3 of 12\ntrained\n"
    (killed / "metrics.json").unlink()
    accuracy.run_one("f.cfg", "d", killed, 0, [], [], rerun=True)
    assert "--overwrite" in commands[2]
    assert (tmp_path / "w" / "seed0.log").read_text() == "trained\n"
    # --folds: train resumes a folds run by itself; --rerun replaces a finished one
    for rerun in (False, True):
        cmd, _ = accuracy.train_command("f.cfg", "d", new, 1, [], [], rerun, folds=5)
        assert "--folds=5" in cmd and ("--overwrite" in cmd) == rerun
    assert cmd[3] == f"--flagfile={Path('f.cfg').resolve()}"  # the trainings run in the repo


def test_a_finished_run_of_another_build_of_the_data_is_not_reused(tmp_path, monkeypatch):
    """A finished run is reused only on the build it trained on (run_info.json's manifest
    SHA-256; a --folds run's in folds.json): another build in the folder (a new salt,
    another record order) is a one-line error naming --rerun."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"build": 1}')
    run_dir = tmp_path / "w" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"best_epoch": 1, "best": {}}))
    (run_dir / "run_info.json").write_text(json.dumps(
        {"dataset_manifest_sha256": accuracy.manifest_sha256(str(data))}))
    monkeypatch.setattr(accuracy, "stability", lambda path: {"max_dev": None})
    assert accuracy.run_one("f.cfg", str(data), run_dir, 0, [], [], rerun=False)["seed"] == 0
    (data / "manifest.json").write_text('{"build": 2}')
    with pytest.raises(SystemExit, match="trained on another build of .*--rerun"):
        accuracy.run_one("f.cfg", str(data), run_dir, 0, [], [], rerun=False)
    (run_dir / "folds.json").write_text(json.dumps({"dataset_manifest_sha256": "f" * 64}))
    assert accuracy.trained_on(run_dir, folds=5) == "f" * 64
    assert accuracy.trained_on(tmp_path, folds=5) is None  # not recorded: not checked


def test_folds_runs_report_each_member_alone_and_reuse_its_evaluation(tmp_path, monkeypatch):
    """--folds: every fold model is evaluated alone on each held-out split (evaluate, a
    process of its own, into a folder beside the run, never in it), once while its
    checkpoint is unchanged; the summary gives the members' mean, their spread within a
    seed and what the ensemble added over them, per seed. The ensemble itself is evaluated
    at its own decision (the out-of-fold threshold) the same way: does it transfer?"""
    import json
    import os
    import subprocess
    import types

    calls = []
    member_auc = {0: [0.5, 0.7], 1: [0.6, 0.8]}  # seed -> fold -> patient AUC

    def fake_run(cmd, stdout=None, **kw):
        calls.append(cmd)
        arg = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd
               if a.startswith("--") and "=" in a}
        run = Path(arg["--run_dir"])
        out = Path(arg["--output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        seed, k = int(run.parent.name[4:]), int(run.name[5:])
        auc = member_auc[seed][k]
        (out / "metrics.json").write_text(json.dumps(
            {"patient": {"auc": {"value": auc}}, "slice": {"auc": {"value": auc - 0.1}}}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(accuracy, "stability", lambda path: {"max_dev": 0.1})
    runs = []
    for seed, ensemble in ((0, 0.65), (1, 0.75)):
        run_dir = tmp_path / "w" / f"seed{seed}"
        for k in range(2):
            (run_dir / f"fold_{k}").mkdir(parents=True)
            (run_dir / f"fold_{k}" / "best.keras").write_text("model")
        decided = {"decision": {"threshold": 0.4 + seed / 10},  # as train writes it
                   "patient": {k: {"value": v + seed / 10} for k, v in (
                       ("sensitivity", 0.6), ("specificity", 0.5), ("accuracy", 0.55))}}
        (run_dir / "metrics.json").write_text(json.dumps({
            "folds": 2, "decision_on_test": decided,
            "best": {"patient_auc": 0.7}, "best_on_test": {"patient_auc": ensemble},
            "fold_runs": [{"best_epoch": 3}, {"best_epoch": 5}],
            "fold_val_patient_auc": {"mean": 0.7, "sd": 0.05, "values": [0.65, 0.75]}}))
        runs.append(accuracy.run_one("f.cfg", "d", run_dir, seed, ["test"], [], rerun=False,
                                     folds=2))
    assert len(calls) == 4 and all("covid_keras.evaluate" in c for c in calls)
    assert all("--split=test" in c and "--bootstrap=0" in c for c in calls)
    for c in calls:  # beside the run folder, never inside it
        out = next(a for a in c if a.startswith("--output_dir=")).split("=", 1)[1]
        assert "_members" in out and "/fold_" in out and not out.startswith(
            next(a for a in c if a.startswith("--run_dir=")).split("=", 1)[1])
    # the ensemble at its own (out-of-fold) decision on the held-out split, as train
    # evaluated it
    assert runs[1]["decision"] == {"test": {"sensitivity": pytest.approx(0.7),
                                            "specificity": pytest.approx(0.6),
                                            "accuracy": pytest.approx(0.65),
                                            "threshold": pytest.approx(0.5)}}
    assert runs[0]["members"] == {"test": {"patient_auc": [0.5, 0.7],
                                           "slice_auc": pytest.approx([0.4, 0.6])}}
    summary = accuracy.summarise(runs, ["test"])
    assert summary["member_test_patient_auc"]["mean"] == pytest.approx(0.65)  # 0.6, 0.7
    assert summary["member_test_patient_auc_sd"]["mean"] == pytest.approx(math.sqrt(0.02))
    assert summary["ensemble_minus_members_test_patient_auc"]["mean"] == pytest.approx(0.05)
    assert summary["test_decision_patient_sensitivity"]["mean"] == pytest.approx(0.65)
    assert summary["test_decision_patient_specificity"]["sd"] == pytest.approx(math.sqrt(0.005))
    accuracy.run_one("f.cfg", "d", tmp_path / "w" / "seed0", 0, ["test"], [], False, folds=2)
    assert len(calls) == 4  # reused: the checkpoints did not change
    found = tmp_path / "w" / "seed0_members" / "fold_1_test" / "metrics.json"
    os.utime(found, (found.stat().st_atime, found.stat().st_mtime - 60))  # fold 1 retrained
    accuracy.run_one("f.cfg", "d", tmp_path / "w" / "seed0", 0, ["test"], [], False, folds=2)
    assert len(calls) == 5 and "fold_1" in next(a for a in calls[-1] if "--run_dir" in a)
    # a protocol's work_dir holds one kind of run: a single run is not reused as folds
    with pytest.raises(SystemExit, match="holds a run with --folds=2, not --folds=0"):
        accuracy.run_one("f.cfg", "d", tmp_path / "w" / "seed0", 0, ["test"], [], False)


def test_a_run_without_a_decision_has_no_decision_figures():
    """decision_on_<split> is what train evaluated at the run's decision.json; a run where
    no threshold could be chosen has none, and the summary leaves the keys out."""
    decided = {"decision": {"threshold": 0.3},
               "patient": {k: {"value": 0.5} for k in accuracy.DECISION_KEYS}}
    assert accuracy.decision_figures({"decision_on_test": decided}, ["test"]) == {
        "test": {"sensitivity": 0.5, "specificity": 0.5, "accuracy": 0.5, "threshold": 0.3}}
    assert accuracy.decision_figures({}, ["test"]) == {}
    runs = [{**run(0, 0.7, 0.6), "decision": {}, "stability": {"max_dev": 0.1},
             "best_epoch": 3},
            {**run(1, 0.7, 0.6), "decision": accuracy.decision_figures(
                {"decision_on_test": decided}, ["test"]), "stability": {"max_dev": 0.1},
             "best_epoch": 3}]
    assert not any("decision" in k for k in accuracy.summarise(runs, ["test"]))
    assert accuracy.summarise(runs[1:], ["test"])["test_decision_patient_sensitivity"][
        "mean"] == 0.5


def test_the_members_vote_at_the_out_of_fold_threshold_is_reported_as_a_diagnostic(tmp_path):
    """--folds: each member's patient score by the ensemble's rule (from its own held-out
    slices.csv) against the ensemble's out-of-fold threshold; positive when at least half
    of the members are. Held out, so it is reported and chooses nothing."""
    import json

    # patient -> label, then each member's two slice probabilities of covid
    scores = {"p1": ("covid", [(0.5, 0.7), (0.7, 0.7), (0.4, 0.4)]),  # mean: 2 of 3 vote
              "p2": ("covid", [(0.4, 0.4), (0.3, 0.9), (0.6, 0.6)]),  # mean 0.6 at member 1
              "p3": ("non_covid", [(0.2, 0.2), (0.55, 0.55), (0.1, 0.1)]),
              "p4": ("non_covid", [(0.6, 0.6), (0.6, 0.6), (0.2, 0.2)])}
    run_dir = tmp_path / "w" / "seed0"
    for k in range(3):
        folder = tmp_path / "w" / "seed0_members" / f"fold_{k}_test"
        folder.mkdir(parents=True)
        rows = ["patient_key,study_key,slice_index,label,prob_non_covid,prob_covid"]
        for key, (label, members) in scores.items():
            for i, p in enumerate(members[k]):
                rows.append(f"{key},s{key},{i},{label},{1 - p},{p}")
        (folder / "slices.csv").write_text("\n".join(rows) + "\n")

    def metrics(rule):
        return {"decision_on_test": {"positive_class": "covid",
                                     "decision": {"rule": rule, "threshold": 0.5}}}

    # mean rule: p1 2 of 3 (positive), p2 2 of 3 (0.4, 0.6, 0.6), p3 1, p4 2
    vote = accuracy.vote_figures(run_dir, 3, ["test"], metrics("mean"))["test"]
    assert vote == {"sensitivity": 1.0, "specificity": 0.5, "accuracy": 0.75}
    # any rule (the highest slice): p2's member 1 reaches 0.9 too: the same calls here
    assert accuracy.vote_figures(run_dir, 3, ["test"], metrics("any"))["test"] == vote
    assert accuracy.vote_figures(run_dir, 3, ["test"], {}) == {}  # no decision: no entry
    assert accuracy.vote_figures(run_dir, 4, ["test"], metrics("mean")) == {}  # no fold 3
    runs = [{"seed": 0, "val": {}, "test": {}, "stability": {"max_dev": None},
             "best_epoch": 1, "vote": {"test": vote}}]
    summary = accuracy.summarise(runs, ["test"])
    assert summary["test_vote_patient_accuracy"]["mean"] == pytest.approx(0.75)
    assert json.dumps(summary)  # the RESULT line's JSON


def test_results_of_other_sessions_merge_only_on_the_same_records_and_code(tmp_path, capsys):
    """--merge: RESULTs of other seeds (a session each) become one RESULT, the summaries
    and the pairing by seed made again over every seed, the models in the first file's
    order; RESULTs of other records (content digest), runs of other code, other packages,
    models or held-out splits, an older RESULT without the digests, or one seed twice are a
    one-line error. A --baseline_json of a rebuild with another salt, in another folder
    (same content digest, another manifest), pairs."""
    import json

    def seed_run(seed, val, test, code="d" * 64):
        return {**run(seed, val, test), "stability": {"max_dev": 0.1}, "best_epoch": 2,
                "code_sha256": code, "threads": {"cores": 2, "OMP_NUM_THREADS": None}}

    def result(seeds_figures, names=("r50", "dre"), code="d" * 64, **over):
        models = {name: {"flagfile": f"configs/{name}.cfg",
                         "runs": [seed_run(s, v + bump, t + bump, code)
                                  for s, (v, t) in seeds_figures.items()]}
                  for name, bump in ((n, 0.05 if n == "dre" else 0.0) for n in names)}
        return {"data_dir": "/data", "dataset_manifest_sha256": "a" * 64,
                "dataset_content_sha256": "c" * 64, "code_sha256": code,
                "read_with_sha256": "e" * 64,
                "packages": {"python": "3.11", "keras": "3"}, "held_out": ["test"],
                "folds": 5, "extra_flags": [],
                "models": {n: models[n] for n in names},
                "seeds": sorted(seeds_figures), **over}

    def write(name, doc):
        (tmp_path / name).write_text(json.dumps(doc))
        return str(tmp_path / name)

    a = write("a.json", result({0: (0.7, 0.6), 1: (0.8, 0.9)}))
    b = write("b.json", result({2: (0.6, 0.75)}, names=("dre", "r50"),
                               dataset_manifest_sha256="b" * 64, data_dir="/elsewhere"))
    out = tmp_path / "merged.json"
    assert accuracy.main([f"--merge={a},{b}", f"--output_json={out}"]) == 0
    merged = json.loads(out.read_text())
    assert merged["seeds"] == [0, 1, 2] and merged["merged_from"] == ["a.json", "b.json"]
    assert merged["dataset_manifest_sha256"] is None  # two salts, one content
    assert merged["data_dirs"] == ["/data", "/elsewhere"]
    assert merged["dataset_content_sha256"] == "c" * 64 and merged["folds"] == 5
    assert merged["code_sha256"] == "d" * 64 and set(merged["models"]) == {"r50", "dre"}
    assert merged["threads"] == {"cores": 2, "OMP_NUM_THREADS": None}
    r50 = merged["models"]["r50"]
    assert [r["seed"] for r in r50["runs"]] == [0, 1, 2]
    assert r50["summary"]["test_patient_auc"]["mean"] == pytest.approx(0.75)
    assert r50["summary"]["test_patient_auc"]["n"] == 3
    pair = merged["paired"]["dre - r50"]["test"]  # against the first file's first model
    assert pair["seeds"] == [0, 1, 2] and pair["diffs"] == pytest.approx([0.05] * 3)
    assert "RESULT " in capsys.readouterr().out

    # the single models of the same records and code pair with the merged ensembles
    single = write("single.json", result({0: (0.7, 0.5), 2: (0.6, 0.8)}, folds=0,
                                         dataset_manifest_sha256="e" * 64))
    assert accuracy.main([f"--merge={a},{b}", f"--baseline_json={single}",
                          f"--output_json={out}"]) == 0
    against = json.loads(out.read_text())["paired"]["r50 - baseline (single.json)"]
    assert set(against) == {"test"} and against["test"]["seeds"] == [0, 2]
    assert against["test"]["diffs"] == pytest.approx([0.1, -0.05])
    capsys.readouterr()

    def refused(argv: list[str], message: str) -> None:
        with pytest.raises(SystemExit):
            accuracy.main(argv)
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and message in err[0], (message, err)

    mixed = result({2: (0.6, 0.7)})
    mixed["models"]["dre"]["runs"][0]["code_sha256"] = "mixed"
    unstamped = result({2: (0.6, 0.7)})
    unstamped["models"]["r50"]["runs"][0]["code_sha256"] = None
    one_thread = result({2: (0.6, 0.7)})
    for m in one_thread["models"].values():
        m["runs"][0]["threads"] = {"cores": 2, "OMP_NUM_THREADS": "1"}
    for name, doc, message in (
            ("code.json", result({2: (0.6, 0.7)}, code="0" * 64),
             "were trained by other training or evaluation code"),
            ("mixed.json", mixed, "has runs that no one code or thread setting trained"),
            ("unstamped.json", unstamped, "has runs that no one code or thread setting"),
            ("threads.json", one_thread, "were trained on other thread counts"),
            ("data.json", result({2: (0.6, 0.7)}, dataset_content_sha256="0" * 64),
             "differ in their records"),
            ("read.json", result({2: (0.6, 0.7)}, read_with_sha256="0" * 64),
             "differ in their code that read the runs' figures"),
            ("extra.json", result({2: (0.6, 0.7)}, extra_flags=["--epochs=3"]), "extra_flags"),
            ("outside.json", {**result({2: (0.6, 0.7)}), "models": {
                n: {**m, "flagfile": "/tmp/" + n + ".cfg"}
                for n, m in result({2: (0.6, 0.7)})["models"].items()}}, "not one under configs/"),
            ("old.json", result({2: (0.6, 0.7)}, dataset_content_sha256=None),
             "records no dataset_content_sha256"),
            ("pkg.json", result({2: (0.6, 0.7)}, packages={"python": "3.12"}),
             "package versions"),
            ("held.json", result({2: (0.6, 0.7)}, held_out=[]), "held_out"),
            ("models.json", result({2: (0.6, 0.7)}, names=("r50",)), "has other models"),
            ("twice.json", result({1: (0.6, 0.7)}), "seed 1 is in "),
            ("stage.json", {**result({2: (0.6, 0.7)}), "models": {
                n: {**m, "classifier_stage": "configs/r50.cfg" if n == "dre" else None}
                for n, m in result({2: (0.6, 0.7)})["models"].items()}}, "other models or stages"),
            ("notone.json", [1], "is not a RESULT JSON")):
        refused([f"--merge={a},{write(name, doc)}"], message)
    refused(["--merge=,"], "--merge names no RESULT JSON")
    other = write("other.json", result({0: (0.7, 0.5)}, dataset_content_sha256="0" * 64))
    refused([f"--merge={a}", f"--baseline_json={other}"],
            "differs from the merged RESULTs in its dataset_content_sha256")
    refused([f"--merge={a}", f"--baseline_json={write('unstamped.json', unstamped)}"],
            "records no code")
    refused([f"--merge={a}", f"--baseline_json={write('t.json', one_thread)}"],
            "differs from the merged RESULTs in its threads")
    other_python = write("p.json", result({0: (0.7, 0.5)}, packages={"python": "3.12"}))
    refused([f"--merge={a}", f"--baseline_json={other_python}"],
            "differs from the merged RESULTs in its packages")
    x = write("x.json", result({0: (0.7, 0.5)}, names=("x",)))
    refused([f"--merge={a}", f"--baseline_json={x}"], "has none of these models")
    refused([f"--merge={a}", "--flagfiles=x.cfg", "--seeds=3"],
            "--merge takes RESULT JSONs only (and --baseline_json, --output_json): not "
            "--flagfiles --seeds")

    # a training run's baseline: a rebuild with another salt, in another folder (another
    # manifest, the same content digest) pairs; another content digest is another build
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"content_sha256": "c" * 64}))
    base = {**result({0: (0.7, 0.5)}), "data_dir": "/elsewhere/data", "folds": 0}
    accuracy.read_baseline(write("rebuilt.json", base), str(data), ["test"], {"r50"})
    with pytest.raises(ValueError, match="another data folder"):
        accuracy.read_baseline(write("rebuilt.json", {**base, "dataset_content_sha256": "0" * 64}),
                               str(data), ["test"], {"r50"})


def test_a_run_records_the_code_and_threads_that_trained_it(tmp_path, monkeypatch):
    """run_one stamps what trains a run (the code digest and the threads) into its folder
    before it trains; a reused run reports its own stamp (not today's); a run killed under
    one code and resumed under another is "mixed", and so is a resumed run that this script
    did not start (no stamp: unknown), so --merge refuses them; --rerun stamps afresh."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    run_dir = tmp_path / "w" / "seed0"
    now = {"code_sha256": "code-1", "threads": {"cores": 2}}
    monkeypatch.setattr(accuracy, "trained_with", lambda root=None: json.loads(json.dumps(now)))
    monkeypatch.setattr(accuracy, "stability", lambda path: {"max_dev": None})
    killed = [True]

    def fake_logged(cmd, log_path, what, append=True):
        (run_dir / "run_info.json").write_text("{}")
        if killed[0]:
            raise SystemExit("killed")
        (run_dir / "metrics.json").write_text(json.dumps({"best_epoch": 1, "best": {}}))

    def stamp_of(out):
        return out["code_sha256"], out["threads"]

    monkeypatch.setattr(accuracy, "run_logged", fake_logged)
    monkeypatch.setattr(accuracy, "interrupted", lambda d: (d / "run_info.json").exists()
                        and not (d / "metrics.json").exists())
    args = ("f.cfg", str(data), run_dir, 0, [], [])
    with pytest.raises(SystemExit):  # killed under code-1, after its stamp
        accuracy.run_one(*args, rerun=False)
    assert json.loads((run_dir / accuracy.STAMP_FILE).read_text())["code_sha256"] == "code-1"
    now["code_sha256"], killed[0] = "code-2", False  # resumed under code-2
    assert stamp_of(accuracy.run_one(*args, rerun=False)) == ("mixed", {"cores": 2})
    assert stamp_of(accuracy.run_one(*args, rerun=True)) == ("code-2", {"cores": 2})
    now["code_sha256"] = "code-3"  # reused by later code: still its own
    assert stamp_of(accuracy.run_one(*args, rerun=False)) == ("code-2", {"cores": 2})
    (run_dir / accuracy.STAMP_FILE).unlink()
    assert stamp_of(accuracy.run_one(*args, rerun=False)) == (None, None)  # not stamped
    (run_dir / "metrics.json").unlink()  # interrupted, no stamp: started by whom?
    assert stamp_of(accuracy.run_one(*args, rerun=False)) == ("mixed", "mixed")
    assert set(accuracy.threads()) == {"cores", "cpu", *accuracy.THREAD_VARIABLES}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert accuracy.threads()["OMP_NUM_THREADS"] == "1"


def test_the_code_digest_covers_training_and_evaluation_code_and_flagfiles(tmp_path):
    """code_sha256: a changed line of training or evaluation code, a flagfile or this
    script's train command changes it; a comment, a docstring, blank lines, the serving
    wing, predict, a test, another bench script or another function of this script do
    not."""
    files = {"covid_keras/training/trainer.py": 'def f():\n    """Doc."""\n    return 1\n',
             "covid_keras/serving/exporter.py": "x = 1\n", "covid_keras/web.py": "x = 1\n",
             "covid_keras/predict.py": "x = 1\n", "configs/a.cfg": "# how\n--epochs=3\n",
             "bench/accuracy.py": "def train_command():\n    return 1\n\n\n"
                                  "def other():\n    return 1\n",
             "bench/serve.py": "x = 1\n", "tests/test_x.py": "x = 1\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    before = accuracy.code_sha256(tmp_path)
    assert len(before) == 64 and before == accuracy.code_sha256(tmp_path)
    same = {"covid_keras/training/trainer.py":
            'def f():\n    """Another doc."""\n\n    # a comment\n    return (1)\n',
            "configs/a.cfg": "# another header\n\n--epochs=3\n",
            "bench/accuracy.py": "def train_command():\n    return 1\n\n\n"
                                 "def other():\n    return 2\n",
            "covid_keras/serving/exporter.py": "x = 2\n", "covid_keras/web.py": "x = 2\n",
            "covid_keras/predict.py": "x = 2\n", "bench/serve.py": "x = 2\n",
            "tests/test_x.py": "x = 2\n"}
    for rel, text in same.items():
        (tmp_path / rel).write_text(text)
        assert accuracy.code_sha256(tmp_path) == before, rel
    for rel, text in (("covid_keras/training/trainer.py", "def f():\n    return 2\n"),
                      ("configs/a.cfg", "--epochs=4\n"),
                      ("bench/accuracy.py", "def train_command():\n    return 2\n")):
        (tmp_path / rel).write_text(text)
        assert accuracy.code_sha256(tmp_path) != before, rel
        before = accuracy.code_sha256(tmp_path)


def test_files_after_the_flags_are_digested_and_a_baseline_says_what_it_does_not_share(
        tmp_path, monkeypatch, capsys):
    """A file that a flag after -- names (its {seed} expanded) is recorded by its SHA-256,
    so two RESULTs whose runs started from other weights under one flag never merge; a
    training run's --baseline_json trained by other code still pairs (a flagfile against
    its from-scratch self), and the RESULT says in what it is not known to match."""
    import hashlib
    import json

    for seed, content in ((0, b"weights of seed 0"), (1, b"weights of seed 1")):
        (tmp_path / f"w{seed}.h5").write_bytes(content)
    digests = accuracy.extra_flag_files(
        [f"--init_from={tmp_path}/w{{seed}}.h5", "--epochs=3", f"--nothing={tmp_path}/no.h5"],
        [0, 1])
    assert digests == {f"--init_from={tmp_path}/w{s}.h5": hashlib.sha256(
        f"weights of seed {s}".encode()).hexdigest() for s in (0, 1)}

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    (data / "test-00000-of-00001.tfrecord.gz").write_bytes(b"")
    cfg = tmp_path / "r50.cfg"
    cfg.write_text("--model=classifier\n")

    def fake_run_one(flagfile, data_dir, run_dir, seed, splits, extra, rerun, folds=0):
        return {**run(seed, 0.7, 0.7), "code_sha256": "new", "threads": {"cores": 2}}

    monkeypatch.setattr(accuracy, "run_one", fake_run_one)
    monkeypatch.setattr(accuracy, "read_with_sha256", lambda: "r" * 64)
    monkeypatch.setattr(accuracy, "package_versions", lambda: {"keras": "3"})
    out = tmp_path / "out.json"

    def main(*extra, baseline=None):
        return accuracy.main([f"--data_dir={data}", f"--flagfiles={cfg}", "--seeds=0",
                              f"--work_dir={tmp_path / 'runs'}", f"--output_json={out}",
                              *([f"--baseline_json={baseline}"] if baseline else []),
                              *extra])

    assert main("--", f"--init_from={tmp_path}/w0.h5") == 0
    first = json.loads(out.read_text())
    assert first["extra_flag_files"] == {f"--init_from={tmp_path}/w0.h5": digests[
        f"--init_from={tmp_path}/w0.h5"]}
    baseline = tmp_path / "first.json"
    baseline.write_text(json.dumps(first))
    capsys.readouterr()
    assert main(baseline=baseline) == 0  # the same code, threads and packages; no file here
    assert json.loads(out.read_text())["baseline_differs_in"] == ["extra_flag_files"]
    old = {**first, "models": {"r50": {**first["models"]["r50"], "runs": [
        {**first["models"]["r50"]["runs"][0], "code_sha256": "old"}]}}}
    del old["packages"]
    baseline.write_text(json.dumps(old))
    assert main("--", f"--init_from={tmp_path}/w0.h5", baseline=baseline) == 0
    said = capsys.readouterr().out
    assert json.loads(out.read_text())["baseline_differs_in"] == ["code_sha256", "packages"]
    assert "is not known to match these runs in: code_sha256, packages" in said
    assert json.loads(out.read_text())["paired"]  # still paired

    # --merge: one flag, other content in two RESULTs: refused, naming the flag
    stamped = {**first, "dataset_content_sha256": "c" * 64, "seeds": [0]}
    stamped["models"]["r50"]["flagfile"] = "configs/r50.cfg"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(stamped))
    b.write_text(json.dumps({**stamped, "models": {"r50": {**stamped["models"]["r50"], "runs": [
        {**stamped["models"]["r50"]["runs"][0], "seed": 1}]}}}))
    merged = tmp_path / "merged.json"
    assert accuracy.main([f"--merge={a},{b}", f"--output_json={merged}"]) == 0
    assert json.loads(merged.read_text())["extra_flag_files"] == first["extra_flag_files"]
    (tmp_path / "w0.h5").write_bytes(b"other weights")
    b.write_text(json.dumps({**json.loads(b.read_text()), "extra_flag_files": accuracy.
                             extra_flag_files([f"--init_from={tmp_path}/w0.h5"], [0])}))
    with pytest.raises(SystemExit):
        accuracy.main([f"--merge={a},{b}", f"--output_json={merged}"])
    assert "named another file's content" in capsys.readouterr().err
