"""``covid_keras.train --folds``: folds by patient, each fold's data folder, the ensemble
run folder, the out-of-fold decision, and resuming a killed run (issue 31)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = ("--flagfile=configs/smoke.cfg", "--epochs=1", "--steps_per_epoch=2")
#: the folds of cv_run: two (each fold a training of its own, ~20 s on 2 cores; the
#: folds' assignment is tested on 3 above)
K = 2


@pytest.fixture(scope="module")
def data_dir(tiny_dataset):
    return tiny_dataset(kinds=("normal", "covid", "bacterial"), patients_per_kind=4,
                        num_slices=20, matrix=64, seed=0,
                        flags=("--classes=normal,covid,bacterial",
                               "--split_fractions=0.6,0.2,0.2"))


def folds_doc(data_dir, k: int, seed: int) -> dict:
    """folds.json's content for ``k`` folds of the training patients of ``data_dir``."""
    from covid_keras.training import folds

    table = folds.patient_table(str(data_dir), ["train", "val"])
    return folds.folds_document(folds.assign_folds(table, k, seed=seed), k, seed,
                                str(data_dir), ["train", "val"])


def _patients(data_dir, split) -> dict:
    from covid_keras.training import folds

    return folds.patient_table(str(data_dir), [split])


def test_folds_cover_every_training_patient_once_and_no_held_out_one(data_dir):
    from covid_keras.training import folds

    table = folds.patient_table(str(data_dir), ["train", "val"])
    held_out = _patients(data_dir, "test")
    assert held_out and not set(held_out) & set(table)
    assignment = folds.assign_folds(table, 3, seed=0)
    assert set(assignment) == set(table)                      # everyone, once
    assert set(assignment.values()) == {0, 1, 2}
    sizes = np.bincount(list(assignment.values()))
    assert sizes.max() - sizes.min() <= 1
    for stratum in set(table.values()):                        # stratified by label, site
        per = np.bincount([assignment[k] for k, v in table.items() if v == stratum],
                          minlength=3)
        assert per.max() - per.min() <= 1, (stratum, per)
    assert folds.assign_folds(table, 3, seed=0) == assignment  # deterministic
    others = [folds.assign_folds(table, 3, seed=s) for s in (1, 2, 3)]
    assert any(o != assignment for o in others)                # and seeded
    with pytest.raises(ValueError, match="at least 2"):
        folds.assign_folds(table, 1, seed=0)


def test_a_fold_data_folder_splits_by_patient_and_keeps_the_held_out_split(data_dir,
                                                                          tmp_path):
    from covid_keras.core import files
    from covid_keras.io import data
    from covid_keras.training import folds

    table = folds.patient_table(str(data_dir), ["train", "val"])
    doc = folds.folds_document(folds.assign_folds(table, 3, seed=0), 3, 0, str(data_dir),
                               ["train", "val"])
    out = folds.write_fold_data(str(data_dir), doc, 1, str(tmp_path / "fold_1"))
    fold_1 = set(doc["patients"]["1"])
    assert set(_patients(out, "val")) == fold_1
    assert set(_patients(out, "train")) == set(table) - fold_1
    src = data.shard_files(str(data_dir), "test")
    dst = data.shard_files(out, "test")
    assert [files.sha256(f) for f in src] == [files.sha256(f) for f in dst]
    manifest = data.read_manifest(out)
    for split in ("train", "val"):  # the manifest counts what the records hold
        assert sum(data.split_counts(manifest, split).values()) == data.count_records(
            data.shard_files(out, split))
    assert manifest["folds"]["fold"] == 1 and manifest["classes"] == data.read_manifest(
        str(data_dir))["classes"]
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    assert folds.write_fold_data(str(data_dir), doc, 1, out) == out  # reused as it is
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
    # the same fold written elsewhere, in other bytes (as before folds were serialized
    # deterministically): the same data for --reuse of another run's stage; not another fold
    again = shutil.copytree(out, tmp_path / "again")
    manifest["files"][next(iter(manifest["files"]))]["sha256"] = "0" * 64
    files.write_json(str(again / "manifest.json"), manifest)
    sha = files.sha256(os.path.join(out, "manifest.json"))
    assert folds.same_fold_data(out, sha, str(again))
    assert not folds.same_fold_data(out, "0" * 64, str(again))  # out changed since
    other = folds.write_fold_data(str(data_dir), doc, 2, str(tmp_path / "fold_2"))
    assert not folds.same_fold_data(out, sha, other)
    assert not folds.same_fold_data(out, sha, str(data_dir))  # no folds entry


def test_workers_writing_one_fold_folder_at_once_keep_the_first(data_dir, tmp_path,
                                                                 monkeypatch):
    """Two workers of one fold (--strategy=multi_worker) write its data folder at once: the
    one that finds the folder made while it wrote keeps it (the other worker may be reading
    it) and drops its own copy; a folder made from other folds is replaced."""
    from covid_keras.training import folds

    doc = folds_doc(data_dir, 2, 0)
    out = folds.write_fold_data(str(data_dir), doc, 0, str(tmp_path / "fold_0"))
    stamp = os.path.getmtime(os.path.join(out, "manifest.json"))
    real, calls = folds.fold_data_ready, []

    def not_yet_at_first(*args):  # as if the other worker finished while this one wrote
        calls.append(args)
        return len(calls) > 1 and real(*args)

    monkeypatch.setattr(folds, "fold_data_ready", not_yet_at_first)
    assert folds.write_fold_data(str(data_dir), doc, 0, out) == out
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == stamp
    assert sorted(os.listdir(tmp_path)) == ["fold_0"]  # no temporary folder left
    monkeypatch.setattr(folds, "fold_data_ready", real)
    other = folds_doc(data_dir, 2, 1)
    folds.write_fold_data(str(data_dir), other, 0, out)
    assert folds.fold_data_ready(out, other, 0) and not folds.fold_data_ready(out, doc, 0)


def test_a_killed_writers_copy_is_removed_and_a_live_ones_kept(data_dir, tmp_path):
    from covid_keras.training import folds

    doc = folds_doc(data_dir, 2, 0)
    out = tmp_path / "fold_0"
    old, live = tmp_path / "fold_0.tmp-1-a", tmp_path / "fold_0.tmp-2-b"
    for copy in (old, live):
        copy.mkdir()
        (copy / "train-00000-of-00001.tfrecord.gz").write_bytes(b"partial")
    hours_ago = time.time() - 2 * folds.STALE_COPY_S
    for path in (old, old / "train-00000-of-00001.tfrecord.gz"):
        os.utime(path, (hours_ago, hours_ago))
    folds.write_fold_data(str(data_dir), doc, 0, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold_0", live.name]


def test_a_stale_fold_folder_replaced_meanwhile_by_another_worker_is_not_deleted(
        data_dir, tmp_path, monkeypatch):
    """The folder is stale (made from other folds) when this worker checks it, and another
    worker of the fold replaces it by its ready copy right after that check: this worker
    must not delete the other's folder (it may be reading it), only its own copy."""
    from covid_keras.training import folds

    doc, other = folds_doc(data_dir, 2, 0), folds_doc(data_dir, 2, 1)
    theirs = folds.write_fold_data(str(data_dir), doc, 0, str(tmp_path / "theirs"))
    (Path(theirs) / "theirs.txt").write_text("the other worker's folder")
    out = folds.write_fold_data(str(data_dir), other, 0, str(tmp_path / "fold_0"))  # stale
    real, calls = folds.fold_data_ready, []

    def other_worker_renames_after_the_check(path, *args):
        calls.append(path)
        ready = real(path, *args)
        if path == out and len(calls) == 2:  # this worker's last look before replacing
            assert not ready  # still the stale folder
            folds.files.rmtree(out)  # the other worker: stale folder out, its own in
            os.rename(theirs, out)
        return ready

    monkeypatch.setattr(folds, "fold_data_ready", other_worker_renames_after_the_check)
    assert folds.write_fold_data(str(data_dir), doc, 0, out) == out
    assert len(calls) >= 2 and calls[:2] == [out, out]  # the interleaving did happen
    assert (Path(out) / "theirs.txt").is_file()  # the other worker's folder, kept
    assert real(out, doc, 0)
    assert sorted(os.listdir(tmp_path)) == ["fold_0"]  # nothing left aside


@pytest.mark.slow
def test_two_workers_train_one_fold_together(data_dir, tmp_path):
    """--fold=k under --strategy=multi_worker (TF_CONFIG, two workers on localhost): both
    workers make the same folds and fold data, train fold k as one run of 2 replicas over
    two epochs and hold the same weights (the same val figures), and only the chief writes
    its model. (The suite's one two-worker training: a fold is an ordinary run of the
    trainer, which is what multi_worker changes.)"""
    from tests.helpers import free_port, user_env

    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    run = tmp_path / "run"
    procs = []
    for i in range(2):
        env = dict(user_env(), KERAS_BACKEND="tensorflow", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "covid_keras.train", *QUICK, f"--data_dir={data_dir}",
             f"--run_dir={run}", "--folds=2", "--fold=0", "--strategy=multi_worker",
             "--epochs=2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
        # TensorFlow's INFO lines (the cluster, each all-reduce) stay out of the console
        assert "all_reduce" not in err and "MirroredStrategy" not in err, err[-4000:]
    lines = [[ln for ln in out.splitlines() if ln.startswith("val: ")] for out, _ in outs]
    assert len(lines[0]) == 1 and lines[0] == lines[1]  # both hold the same weights
    info = json.loads((run / "fold_0" / "run_info.json").read_text())
    assert info["strategy"] == "multi_worker" and info["replicas"] == 2
    assert info["strategy_class"] == "CollectiveAllReduceStrategy"  # MWMS's class in TF 2
    with open(run / "fold_0" / "log.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    assert (run / "fold_0" / "final.keras").exists()
    assert not (run / "fold_0" / ".worker-1" / "final.keras").exists()
    assert not (run / "fold_1").exists() and not (run / "best.keras").exists()
    assert [p.name for p in (run / "folds_data").iterdir()] == ["fold_0"]  # no tmp left


def _train(commands, *args):
    proc = commands.run("covid_keras.train", *QUICK, *args, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cv_run(data_dir, tmp_path_factory, commands):
    """A K-fold run made the cluster way: each fold a job of its own (--fold=k, out of
    order: the last fold first), then --ensemble_only. (The one-command way, all folds then
    the ensemble, is the kill / resume test's.)"""
    run = tmp_path_factory.mktemp("cv") / "run"
    common = (f"--data_dir={data_dir}", f"--run_dir={run}", f"--folds={K}",
              "--report_splits=test")
    _train(commands, *common, f"--fold={K - 1}")
    assert (run / f"fold_{K - 1}" / "final.keras").exists()
    assert not any((run / f"fold_{k}").exists() for k in range(K - 1))
    assert not (run / "best.keras").exists()
    for k in range(K - 1):
        _train(commands, *common, f"--fold={k}")
    proc = _train(commands, *common, "--ensemble_only")
    return run, proc


def test_folds_train_each_fold_and_the_ensemble_is_their_mean(cv_run, data_dir):
    from covid_keras.evaluation.evaluation import SplitPredictor
    from covid_keras.io import data
    from covid_keras.model import saving
    from covid_keras.model.ensemble import members

    run, proc = cv_run
    assert f"ensemble of {K} folds" in proc.stdout
    doc = json.loads((run / "folds.json").read_text())
    for k in range(K):  # each fold an ordinary finished run, choosing on its own fold
        fold = run / f"fold_{k}"
        assert (fold / "final.keras").exists() and (fold / "metrics.json").exists()
        fold_data = json.loads((fold / "run_info.json").read_text())["flags"]["data_dir"]
        assert set(_patients(fold_data, "val")) == set(doc["patients"][str(k)])
        assert not set(_patients(fold_data, "train")) & set(doc["patients"][str(k)])
    dealt = {p for keys in doc["patients"].values() for p in keys}
    assert not dealt & set(_patients(str(data_dir), "test"))  # never a held-out patient
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["folds"] == K and len(metrics["fold_runs"]) == K
    # out-of-fold metrics with their patient-bootstrap intervals
    oof_auc = metrics["decision_on_out_of_fold"]["patient"]["auc"]
    assert metrics["decision_on_out_of_fold"]["bootstrap"]["resamples"] > 0
    assert oof_auc["ci95"][0] <= oof_auc["value"] <= oof_auc["ci95"][1], oof_auc
    assert metrics["best"]["patients"] == sum(len(v) for v in doc["patients"].values())
    assert "best_on_test" in metrics
    assert (run / "flags.cfg").read_text().count(f"--folds={K}") == 1
    # the ensemble, reloaded here (another process made it): the members' mean
    model = saving.load_model(str(run / "best.keras"), compile=False)
    assert len(members(model)) == K
    pipeline = data.PipelineConfig.for_model(saving.model_spec(model))
    test = SplitPredictor(str(data_dir), "test", 4, pipeline)
    probs = test.predictions(model, ["normal", "covid", "bacterial"]).probs
    mean = np.mean([test.predictions(m, ["normal", "covid", "bacterial"]).probs
                    for m in _fold_models(run)], axis=0)
    np.testing.assert_allclose(probs, mean, atol=1e-5)


def _checkpoint(fold: Path) -> str:
    return "best.keras" if (fold / "best.keras").exists() else "final.keras"


def _fold_models(run: Path) -> list:
    """The K fold models of ``run``, each from its checkpoint, in fold order."""
    from covid_keras.model import saving

    return [saving.load_model(str(run / f"fold_{k}" / _checkpoint(run / f"fold_{k}")),
                              compile=False) for k in range(K)]


def _members_mean(fold_models: list, x: np.ndarray) -> np.ndarray:
    """The fold models' mean class probability on ``x`` (the members' input)."""
    return np.mean([_softmax(m.predict(x, verbose=0)["logits"]) for m in fold_models], axis=0)


def test_the_decision_comes_from_out_of_fold_predictions_only(cv_run):
    """Each training slice's probability in the out-of-fold table is the one of the fold
    model that did not train on it. A planted check: for every patient, the members that
    trained on it give other probabilities, so a decision made from them would differ."""
    from covid_keras.evaluation.evaluation import SplitPredictor
    from covid_keras.io import data
    from covid_keras.model import saving

    run, _ = cv_run
    doc = json.loads((run / "folds.json").read_text())
    fold_of = {p: int(k) for k, keys in doc["patients"].items() for p in keys}
    classes = ["normal", "covid", "bacterial"]
    with open(run / "out_of_fold_slices.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["patient_key"] for r in rows} == set(fold_of)
    def key_of(r):
        return r["patient_key"], r["study_key"], int(r["slice_index"])

    table = {key_of(r): np.array([float(r[f"prob_{c}"]) for c in classes]) for r in rows}
    label_of = {key_of(r): classes.index(r["label"]) for r in rows}
    planted, in_sample = 0, {}
    for k, model in enumerate(_fold_models(run)):
        info = json.loads((run / f"fold_{k}" / "run_info.json").read_text())["flags"]
        pipeline = data.PipelineConfig.for_model(saving.model_spec(model))
        for split in ("val", "train"):
            preds = SplitPredictor(info["data_dir"], split, 4, pipeline).predictions(
                model, classes)
            for i, key in enumerate(zip(preds.patient_keys, preds.study_keys,
                                        preds.slice_index.tolist())):
                if split == "val":  # this member never trained on it: its probability
                    assert fold_of[key[0]] == k
                    np.testing.assert_allclose(table[key], preds.probs[i], atol=1e-6)
                else:  # a member that trained on it: not the out-of-fold probability
                    assert fold_of[key[0]] != k
                    planted += not np.allclose(table[key], preds.probs[i], atol=1e-6)
                    in_sample[key] = (preds.labels[i], preds.probs[i])
    assert planted > 0
    decision = json.loads((run / "decision.json").read_text())
    assert decision["split"] == "out_of_fold"
    assert decision["val_patients"] == len(fold_of)
    # decision.json is the one chosen on the out-of-fold table; the same choice made on the
    # probabilities of members that trained on each patient gives another threshold
    from covid_keras.evaluation.decision import choose_decision

    keys = sorted(table)
    assert set(in_sample) == set(keys)

    def chosen(probs_of):
        return choose_decision(np.stack([probs_of[k] for k in keys]),
                               np.array([label_of[k] for k in keys]), [k[0] for k in keys],
                               classes)

    oof = chosen(table)
    assert (oof["rule"], oof["val_patients"]) == (decision["rule"], decision["val_patients"])
    assert np.isclose(oof["threshold"], decision["threshold"], rtol=0, atol=1e-6), (
        oof["threshold"], decision["threshold"])
    assert all(in_sample[k][0] == label_of[k] for k in keys)
    trained_on = chosen({k: v[1] for k, v in in_sample.items()})
    assert not np.isclose(trained_on["threshold"], decision["threshold"], rtol=0, atol=1e-6)


def test_evaluate_warns_on_a_split_that_trained_the_folds(cv_run, commands, tmp_path):
    # the warnings are chosen before the bootstrap and the report (plots, report.html):
    # neither is needed for metrics.json's warnings
    run, _ = cv_run
    proc = commands.run("covid_keras.evaluate", f"--run_dir={run}", "--split=val",
                        f"--output_dir={tmp_path / 'ev'}", "--max_explained_patients=0",
                        "--bootstrap=0", "--noreport", cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = json.loads((tmp_path / "ev" / "metrics.json").read_text())["warnings"]
    assert any("trained the ensemble's folds" in w for w in warnings), warnings


def test_reuse_keeps_a_finished_folds_run_and_names_a_changed_flag(cv_run, data_dir,
                                                                    commands):
    run, _ = cv_run
    common = (f"--data_dir={data_dir}", f"--run_dir={run}", f"--folds={K}",
              "--report_splits=test", "--reuse")

    def stamps():
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}

    before = stamps()
    _train(commands, *common)  # nothing trains, nothing is written
    _train(commands, *common, "--overwrite")  # the same flags: kept, not replaced
    assert stamps() == before
    proc = commands.run("covid_keras.train", *QUICK, *common, "--epochs=2", cwd=REPO,
                        timeout=600)
    assert proc.returncode == 1 and "--epochs: 1 -> 2" in proc.stderr, proc.stderr[-2000:]
    assert stamps() == before


def test_fold_flags_are_checked_before_anything_runs(data_dir, tmp_path, commands):
    for args, message in ((["--folds=1"], "--folds must be 0"),
                          (["--fold=1"], "--fold and --ensemble_only need --folds"),
                          (["--folds=3", "--fold=3"], "--fold must be in"),
                          (["--folds=3", "--strategy=multi_worker"], "pass --fold=k"),
                          (["--folds=3", "--ensemble_only"], "are not finished")):
        proc = commands.run("covid_keras.train", *QUICK, f"--data_dir={data_dir}",
                            f"--run_dir={tmp_path / 'r'}", *args, cwd=REPO, timeout=600)
        assert proc.returncode == 1, (args, proc.stderr[-2000:])
        assert message in proc.stderr.strip().splitlines()[-1], (args, proc.stderr[-2000:])


@pytest.mark.slow
def test_a_folds_run_killed_inside_fold_2_resumes_to_the_same_folds(data_dir, tmp_path,
                                                                    commands):
    """Killed: a process of its own; resumed: a command of helpers.Commands (a fork, no
    interpreter start)."""
    run = tmp_path / "run"
    args = ["--flagfile=configs/smoke.cfg", "--epochs=3", f"--data_dir={data_dir}",
            f"--run_dir={run}", "--folds=2"]
    proc = subprocess.Popen([sys.executable, "-m", "covid_keras.train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while not (run / "fold_1" / "backup").exists():  # inside fold 2 (of 1, 2, 3)
            assert proc.poll() is None and time.time() < deadline, "fold 2 never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    folds = (run / "folds.json").read_text()
    fold_0 = os.path.getmtime(run / "fold_0" / "final.keras")
    assert not (run / "fold_1" / "final.keras").exists()
    done = commands.run("covid_keras.train", *args, cwd=REPO, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fold 1/2 finished in an earlier run" in done.stderr
    assert "resuming it" in done.stderr  # fold 2 resumed from its backup
    # the console names the fold that runs; TensorBoard shows each fold as its own run
    assert "fold 2/2: training on the other folds, choosing on fold 2" in done.stdout
    assert "fold 1/2: training" not in done.stdout
    from covid_keras.io.run_dir import RunDir

    for k in range(2):
        events = list(Path(RunDir(run / f"fold_{k}").tensorboard_dir).rglob("events.out.*"))
        assert events, f"fold_{k} wrote no TensorBoard events"
    assert (run / "folds.json").read_text() == folds
    assert os.path.getmtime(run / "fold_0" / "final.keras") == fold_0
    for k in range(2):  # each fold's epochs once: fold 2 went on from where it was killed
        with open(run / f"fold_{k}" / "log.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2], k

    from covid_keras.model import saving
    from covid_keras.model.ensemble import members

    model = saving.load_model(str(run / "best.keras"), compile=False)
    assert [m.name for m in members(model)] == ["member_0", "member_1"]


EXPORT_CALL = """
import json, sys
import numpy as np
import tensorflow as tf
images = np.load(sys.argv[2])
sigs = tf.saved_model.load(sys.argv[1]).signatures
out = sigs["serving_default"](images=tf.constant(images, tf.float32))
np.save(sys.argv[3], out["probabilities"].numpy())
cam = sigs["gradcam"](images=tf.constant(images, tf.float32),
                      class_index=tf.ones([len(images)], tf.int32))
np.save(sys.argv[4], cam["heatmaps"].numpy())
"""


def test_the_export_is_one_savedmodel_whose_output_is_the_members_mean(cv_run, data_dir,
                                                                       commands, tmp_path):
    from covid_keras.evaluation.evaluation import SplitPredictor
    from covid_keras.io import data

    run, _ = cv_run
    proc = commands.run("covid_keras.export", f"--run_dir={run}",
                        f"--export_base={tmp_path / 'export'}", cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = tmp_path / "export" / "drenet" / "1"
    info = json.loads((version / "assets.extra" / "covid_keras.json").read_text())
    assert info["ensemble"]["members"] == K  # the model card's entry: K and the spread
    metrics = json.loads((run / "metrics.json").read_text())
    assert info["ensemble"]["fold_val_patient_auc"] == metrics["fold_val_patient_auc"]
    assert len(metrics["fold_val_patient_auc"]["values"]) == K
    pipeline = data.PipelineConfig.for_model(info)  # the export's info: the model's spec
    shown = SplitPredictor(str(data_dir), "test", 4, pipeline).images_u8(range(4))
    u8 = np.stack([shown[i] for i in sorted(shown)]).astype(np.float32)
    np.save(tmp_path / "images.npy", u8)
    called = commands.run_code(EXPORT_CALL, str(version), str(tmp_path / "images.npy"),
                               str(tmp_path / "probs.npy"), str(tmp_path / "cams.npy"),
                               timeout=600)
    assert called.returncode == 0, called.stderr[-3000:]
    from covid_keras.evaluation.gradcam import GradCAM

    x = np.asarray(data.model_input(u8, pipeline))  # what the members take
    fold_models = _fold_models(run)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), _members_mean(fold_models, x),
                               atol=1e-5)
    # the gradcam signature: the mean of the members' maps (each on its own logit)
    cams = np.mean([GradCAM(m)(x, 1) for m in fold_models], axis=0)
    np.testing.assert_allclose(np.load(tmp_path / "cams.npy"), cams, atol=1e-4)
    # the page's model card names the ensemble and its spread
    from covid_keras.serving import web_app

    card = web_app.card_html(web_app.model_card(info, {"kind": "export"}))
    assert f"{K} fold models" in card and "heat maps the mean of the members" in card
    spread = metrics["fold_val_patient_auc"]
    assert f"val patient AUC {spread['mean']:.3f} +- {spread['sd']:.3f}" in card


def test_predict_and_the_page_answer_with_the_ensemble_run_folder(cv_run, data_dir, commands,
                                                                  tmp_path):
    """covid_keras.predict (the command) and the page (its app, in-process) take the
    ensemble's run folder: each slice's probabilities are the members' mean on that slice's
    record, the patient is decided by the out-of-fold decision, and the two agree."""
    from covid_keras.core import schema
    from covid_keras.io import data
    from covid_keras.model import saving
    from covid_keras.serving import predictor, web_app
    from tests.helpers import post, read_records, study_files

    run, _ = cv_run
    root = Path(data_dir).parent
    study = sorted((root / "studies" / "covid").iterdir())[0]
    out = tmp_path / "predict"
    proc = commands.run("covid_keras.predict", f"--model={run}", f"--study={study}",
                        f"--output_dir={out}", f"--salt_file={root / 'salt.key'}", cwd=REPO,
                        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads((out / "prediction.json").read_text())
    classes = answer["model"]["class_names"]
    by_sop = {r[schema.SOP_KEY].decode(): r for r in read_records(Path(data_dir))}
    slices = answer["slices"]
    assert slices and all(s["sop_key"] in by_sop for s in slices)
    u8 = np.stack([data.decode_image(by_sop[s["sop_key"]][schema.IMAGE], 64).numpy()
                   for s in slices]).astype(np.float32)
    fold_models = _fold_models(run)
    x = np.asarray(data.model_input(u8, data.PipelineConfig.for_model(
        saving.model_spec(fold_models[0]))))  # the members share one spec
    got = np.array([[s["probabilities"][c] for c in classes] for s in slices])
    np.testing.assert_allclose(got, _members_mean(fold_models, x), atol=1e-4)
    decision = json.loads((run / "decision.json").read_text())
    patient = answer["patient"]
    assert (patient["method"], patient["rule"]) == ("threshold", decision["rule"])
    assert patient["threshold"] == decision["threshold"]
    # the page on the same run folder: its card names the ensemble, its answer is predict's
    local = predictor.LocalModel(str(run))
    card = web_app.build_card(local, str(run), None, None)
    assert f"{K} fold models" in web_app.card_html(card)
    (tmp_path / "webtmp").mkdir()
    app = web_app.create_app(local, card, predictor.read_salt(str(root / "salt.key")),
                             tmp_dir=str(tmp_path / "webtmp"))
    r = post(app, study_files(study))
    assert r.status_code == 200, r.text
    page = r.json()["prediction"]
    assert page["patient"]["decision"] == patient["decision"]
    np.testing.assert_allclose([page["patient"]["probabilities"][c] for c in classes],
                               [patient["probabilities"][c] for c in classes], atol=1e-5)


def _softmax(logits):
    from covid_keras.evaluation.metrics import softmax

    return softmax(np.asarray(logits, np.float64))


def stand_in_trainer(trained: list):
    """The trainer module with its ``train`` replaced by a stand-in that records the fold
    in ``trained`` and writes a finished run folder: the orchestration alone."""
    import types

    from covid_keras.training import trainer

    def fake_train(cfg, command=None):
        trained.append(int(cfg.run_dir.rsplit("_", 1)[1]))
        assert cfg.folds == 0 and cfg.val_split == "val" and not cfg.overwrite
        assert cfg.data_dir.endswith(f"fold_{trained[-1]}")
        os.makedirs(cfg.run_dir, exist_ok=True)
        Path(cfg.run_dir, "final.keras").write_text("stand-in")
        return {}

    mod = types.SimpleNamespace(**{n: getattr(trainer, n) for n in dir(trainer)
                                   if not n.startswith("__")})
    mod.train = fake_train
    return mod


def test_fold_jobs_reuse_retrain_with_overwrite_and_drop_a_stale_ensemble(data_dir, tmp_path):
    """The orchestration alone (the training replaced by a stand-in that writes a finished
    run folder): --fold=k trains fold k once and reuses it after; a finished ensemble
    refuses more fold jobs without --overwrite; --fold=k --overwrite trains fold k again
    and removes the ensemble it made stale."""
    from covid_keras.io.run_dir import RunDir
    from covid_keras.training import cross_validation, trainer

    trained = []
    mod = stand_in_trainer(trained)
    cfg = trainer.TrainConfig(data_dir=str(data_dir), run_dir=str(tmp_path / "cv"), folds=3,
                              backbone="tiny", input_size=64, batch_size=2)
    cross_validation.cross_validate(cfg.replace(fold=1), mod)
    cross_validation.cross_validate(cfg.replace(fold=1), mod)  # finished: reused
    assert trained == [1]
    run = RunDir(cfg.run_dir)
    for path in (run.best_path, run.metrics_path, run.decision_path):  # an ensemble
        Path(path).write_text("{}")
    with pytest.raises(ValueError, match="finished cross-validation run"):
        cross_validation.cross_validate(cfg.replace(fold=0), mod)
    Path(cfg.run_dir, "fold_1", "final.keras").write_text("trained before")
    cross_validation.cross_validate(cfg.replace(fold=1, overwrite=True), mod)
    assert trained == [1, 1]
    assert Path(cfg.run_dir, "fold_1", "final.keras").read_text() == "stand-in"
    assert not any(os.path.exists(p) for p in (run.best_path, run.metrics_path,
                                               run.decision_path))
    assert json.loads(Path(run.folds_path).read_text())["folds"] == 3  # the folds stay


def test_a_folds_run_refuses_a_stage_flagfile_edited_since_its_first_fold(data_dir, tmp_path):
    """Each fold trains its own classifier stage from --classifier_flagfile, which the run's
    flags record as a path only: a fold job after the flagfile changed is refused, naming
    the change (its stage would not be the other folds')."""
    from covid_keras.training import cross_validation, trainer

    trained = []
    mod = stand_in_trainer(trained)
    stage = tmp_path / "cls.cfg"
    stage.write_text("--model=classifier\n--backbone=tiny\n")
    cfg = trainer.TrainConfig(data_dir=str(data_dir), run_dir=str(tmp_path / "cv"), folds=3,
                              backbone="tiny", input_size=64, batch_size=2,
                              classifier_flagfile=str(stage))
    cross_validation.cross_validate(cfg.replace(fold=0), mod)
    cross_validation.cross_validate(cfg.replace(fold=1), mod)  # the same flags
    stage.write_text("--model=classifier\n--backbone=tiny\n--epochs=2\n")
    with pytest.raises(ValueError, match=rf"--classifier_flagfile={stage}: its flags "
                                         r"changed since the first fold \(\+--epochs=2\)"):
        cross_validation.cross_validate(cfg.replace(fold=2), mod)
    assert trained == [0, 1]


def test_finished_folds_need_their_shared_stages_no_more(data_dir, tmp_path):
    """Fold k started from fold k of another --folds run (--classifier_dir): once every fold
    is finished, a rerun (e.g. after a kill while the ensemble was assembled) does not need
    that run any more; a fold still to train does."""
    import shutil

    from covid_keras.core import files
    from covid_keras.training import cross_validation, trainer

    trained = []
    mod = stand_in_trainer(trained)
    stages = tmp_path / "cls_cv"
    (tmp_path / "cls.cfg").write_text("--model=classifier\n")
    cfg = trainer.TrainConfig(data_dir=str(data_dir), run_dir=str(tmp_path / "cv"), folds=2,
                              backbone="tiny", input_size=64, batch_size=2,
                              classifier_flagfile=str(tmp_path / "cls.cfg"),
                              classifier_dir=str(stages))
    stages.mkdir()
    files.write_json(str(stages / "folds.json"), folds_doc(data_dir, 2, 0))
    for k in range(2):
        (stages / f"fold_{k}").mkdir()
        (stages / f"fold_{k}" / "final.keras").write_text("stage")
    cross_validation.cross_validate(cfg.replace(fold=0), mod)
    shutil.rmtree(stages)
    with pytest.raises(ValueError, match="holds no folds.json"):  # fold 1 needs its stage
        cross_validation.cross_validate(cfg.replace(fold=1), mod)
    cross_validation.cross_validate(cfg.replace(fold=0), mod)  # finished: reused
    assert trained == [0]


def test_the_same_data_folder_through_a_link_makes_the_same_folds(data_dir, tmp_path):
    """A --folds run may name its data folder through a symbolic link and take its stages
    from a --folds run that named the real folder (or the other way round)."""
    from covid_keras.training import cross_validation
    from covid_keras.training.trainer import TrainConfig

    link = tmp_path / "data_link"
    link.symlink_to(data_dir, target_is_directory=True)
    assert folds_doc(link, 3, 0) == folds_doc(data_dir, 3, 0)
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "folds.json").write_text(json.dumps(folds_doc(data_dir, 3, 0)))
    cfg = TrainConfig(data_dir=str(link), run_dir=str(tmp_path / "run"), folds=3,
                      classifier_flagfile="c.cfg", classifier_dir=str(stages))
    cross_validation.check_fold_stages(cfg, [])  # no error: the same folds
    (stages / "folds.json").write_text(json.dumps(folds_doc(data_dir, 3, 1)))
    with pytest.raises(ValueError, match="holds other folds than this run's .seed: 1 there"):
        cross_validation.check_fold_stages(cfg, [])
    # folds made before patients were ordered by their records' content (ordered by their
    # salted keys: other folds for the same seed) are not this run's
    old = {k: v for k, v in folds_doc(data_dir, 3, 0).items() if k != "order"}
    (stages / "folds.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="holds other folds than this run's .order: None "
                                         "there, 'content' here"):
        cross_validation.check_fold_stages(cfg, [])
