"""``covid_keras.train --classifier_flagfile``: a classifier trained first (its own run
folder), then this run from its image backbone; ``--reuse``; the flag checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FORKED_STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(split_dataset):
    return split_dataset


def image_kernels(path: Path) -> dict:
    """The conv kernels of a saved model's image backbone, by layer name."""
    from covid_keras.evaluation.gradcam import image_backbone
    from covid_keras.model import saving

    backbone = image_backbone(saving.load_model(str(path), compile=False))
    return {lay.name: np.asarray(lay.get_weights()[0]) for lay in backbone.layers
            if type(lay).__name__ == "Conv2D"}


def assert_same_kernels(start: Path, end: Path) -> None:
    """The image backbone's conv kernels of two saved models are equal (and there are some)."""
    first, last = image_kernels(start), image_kernels(end)
    assert first and first.keys() == last.keys()
    for name in first:
        np.testing.assert_array_equal(last[name], first[name], err_msg=name)


def stage_flagfiles(tmp_path: Path, *dre_flags: str) -> Path:
    """``configs/cls.cfg`` (a one-epoch classifier) and ``configs/dre.cfg`` (DRENet with it
    as its --classifier_flagfile, learning rate 0: its kernels stay the stage's) in
    ``tmp_path``, on configs/smoke.cfg; returns the folder."""
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    smoke = f"--flagfile={REPO / 'configs' / 'smoke.cfg'}"
    (cfg_dir / "cls.cfg").write_text("\n".join(
        [smoke, "--model=classifier", "--epochs=1", "--steps_per_epoch=2"]) + "\n")
    (cfg_dir / "dre.cfg").write_text("\n".join(
        [smoke, "--classifier_flagfile=cls.cfg", "--epochs=1", "--steps_per_epoch=1",
         "--optimizer=adam", "--learning_rate=0", *dre_flags]) + "\n")
    return cfg_dir


@pytest.mark.slow
def test_drenet_starts_from_the_classifier_stage_which_is_reused_and_checked(data_dir,
                                                                            tmp_path,
                                                                            commands):
    """The stage trains a classifier into <run_dir>/classifier (the flagfile read beside the
    flagfile that names it, with this run's seed and splits); DRENet starts from its chosen
    checkpoint's backbone (with a zero learning rate, DRENet's final conv kernels are the
    classifier's); a second run reuses the finished stage; a shared stage folder
    (--classifier_dir) with other flags is a one-line error, not silently reused."""
    cfg_dir = stage_flagfiles(tmp_path, "--report_splits=test")
    run = tmp_path / "run"

    def train(*extra, ok=True):
        proc = commands.run("covid_keras.train", f"--flagfile={cfg_dir / 'dre.cfg'}",
                            f"--data_dir={data_dir}", f"--run_dir={run}", *extra, cwd=tmp_path,
                            env=FORKED_STAGES)
        assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    train()
    stage = run / "classifier"
    weights = stage / "classifier_backbone.weights.h5"
    assert (stage / "final.keras").is_file() and weights.is_file()
    stage_info = json.loads((stage / "run_info.json").read_text())
    assert stage_info["flags"]["model"] == "classifier"
    assert stage_info["flags"]["report_splits"] == ["test"]
    assert "best_on_test" in json.loads((stage / "metrics.json").read_text())
    info = json.loads((run / "run_info.json").read_text())
    assert info["backbone_weights"]["path"] == str(weights)
    assert f"--classifier_flagfile={cfg_dir / 'cls.cfg'}\n" in (run / "flags.cfg").read_text()
    chosen = stage / ("best.keras" if (stage / "best.keras").exists() else "final.keras")
    assert_same_kernels(chosen, run / "final.keras")

    mtime = chosen.stat().st_mtime_ns
    again = train("--overwrite")
    assert "holds a finished run with these flags: reused" in again.stderr
    assert chosen.stat().st_mtime_ns == mtime

    # a stage folder named with --classifier_dir may be shared: never replaced silently
    other = train("--overwrite", "--seed=1", f"--classifier_dir={stage}", ok=False)
    errors = [ln for ln in other.stderr.splitlines() if "error" in ln.lower()]
    assert any("--reuse" in ln and "--seed: 0 -> 1" in ln for ln in errors), other.stderr
    assert chosen.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_fold_starts_from_the_same_fold_of_the_classifiers_folds_run(data_dir, tmp_path,
                                                                       commands):
    """--folds --classifier_dir=<a --folds run of the classifier flagfile with the same
    folds> (bench/accuracy.py --folds: DRENet after the ResNet-50 ensemble of the seed):
    fold k's stage is that run's fold_<k>, reused (not trained again, nothing in
    fold_<k>/classifier) through the stage's --reuse check of flags and data, and the fold
    starts from its chosen checkpoint's backbone (learning rate 0: the kernels are equal).
    Other folds (another seed) and an unfinished stage fold are one-line errors before
    anything is written."""
    cfg_dir = stage_flagfiles(tmp_path)
    stages = tmp_path / "cls_cv"

    def train(flagfile, run, *extra):
        return commands.run("covid_keras.train", f"--flagfile={cfg_dir / flagfile}",
                            f"--data_dir={data_dir}", f"--run_dir={run}", "--folds=2",
                            *extra, cwd=tmp_path, env=FORKED_STAGES)

    proc = train("cls.cfg", stages, "--fold=0")  # the classifier's fold 0, a job of its own
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = stages / "fold_0"
    chosen = stage / ("best.keras" if (stage / "best.keras").exists() else "final.keras")
    mtime = chosen.stat().st_mtime_ns
    run = tmp_path / "dre_cv"
    proc = train("dre.cfg", run, "--fold=0", f"--classifier_dir={stages}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--reuse: {stage} holds a finished run with these flags: reused" in proc.stderr
    assert chosen.stat().st_mtime_ns == mtime
    assert not (run / "fold_0" / "classifier").exists()
    info = json.loads((run / "fold_0" / "run_info.json").read_text())
    assert info["backbone_weights"]["path"] == str(stage / "classifier_backbone.weights.h5")
    assert_same_kernels(chosen, run / "fold_0" / "final.keras")

    # refused in one line before anything is written: other folds (another seed), and a
    # stage fold that is not finished (never trained inside the classifier's run)
    for extra, message in ((["--seed=1"], "other folds than this run's (seed: 0 there, 1 here"),
                           ([], "its folds [1] are not finished")):
        other = train("dre.cfg", tmp_path / "other", "--fold=1", *extra,
                      f"--classifier_dir={stages}")
        assert other.returncode == 1
        assert message in other.stderr.strip().splitlines()[-1], other.stderr[-2000:]
        assert not (tmp_path / "other").exists()
        assert not (stages / "fold_1").exists()


def config(**kw):
    from covid_keras.training.trainer import TrainConfig

    return TrainConfig(**{"data_dir": "d", "run_dir": "r", **kw})


@pytest.mark.parametrize("extra, message", [
    ({"backbone_weights": "w.weights.h5"}, "takes no --pretrain_flagfile"),
    ({"pretrain_flagfile": "p.cfg"}, "takes no --pretrain_flagfile"),
    ({"strategy": "multi_worker"}, "not supported with --strategy=multi_worker"),
])
def test_classifier_stage_flag_conflicts_are_one_line_errors(tmp_path, extra, message):
    from covid_keras.training.trainer import check_recipe

    flagfile = tmp_path / "cls.cfg"
    flagfile.write_text("--model=classifier\n")
    with pytest.raises(ValueError, match=message):
        check_recipe(config(classifier_flagfile=str(flagfile), **extra))


def test_classifier_stage_flags_without_the_stage_or_with_no_data_are_errors(tmp_path):
    from covid_keras.training.trainer import check_recipe

    with pytest.raises(ValueError, match="needs --classifier_flagfile"):
        check_recipe(config(classifier_data_dir=str(tmp_path)))
    check_recipe(config(classifier_dir=str(tmp_path)))  # where a stage would go: ignored
    flagfile = tmp_path / "cls.cfg"
    flagfile.write_text("--model=classifier\n")
    with pytest.raises(FileNotFoundError, match="is not a data_prep output"):
        check_recipe(config(classifier_flagfile=str(flagfile),
                            classifier_data_dir=str(tmp_path)))


def test_where_the_stage_lives_is_not_what_a_run_is():
    """--classifier_dir may differ between a finished stage run and the command that reuses
    it (bench/accuracy.py passes it to every flagfile of a protocol): not run-defining."""
    from covid_keras.training.trainer import changed_flags

    assert changed_flags({"classifier_dir": "/a", "seed": 0},
                         {"classifier_dir": None, "seed": 0}) == []
    assert changed_flags({"classifier_flagfile": "/a.cfg"}, {"classifier_flagfile": None})


def test_a_missing_classifier_flagfile_is_named(tmp_path):
    from covid_keras.training.trainer import check_recipe

    with pytest.raises(FileNotFoundError, match="--classifier_flagfile=.*nope.cfg: no such"):
        check_recipe(config(classifier_flagfile=str(tmp_path / "nope.cfg")))


def test_folds_train_a_classifier_stage_per_fold_or_take_a_folds_run(tmp_path):
    from covid_keras.training.cross_validation import check_fold_flags, check_fold_stages

    with pytest.raises(ValueError, match="fold k's classifier stage is <classifier_dir>/"
                                         "fold_<k>.*x holds no folds.json"):
        check_fold_stages(config(folds=3, classifier_flagfile="c.cfg", classifier_dir="x"),
                          [0])
    check_fold_flags(config(folds=3, classifier_flagfile="c.cfg", classifier_dir="x",
                            ensemble_only=True))  # trains no fold: needs no stage
    # a classifier flagfile with a pretraining stage: its --folds run started each fold from
    # the pretrained weights (init_from), so its folds cannot be this run's checked stages
    stages = tmp_path / "cls_cv"
    stages.mkdir()
    (stages / "folds.json").write_text("{}")
    (tmp_path / "base.cfg").write_text("--pretrain_flagfile=p.cfg\n")
    (tmp_path / "cls.cfg").write_text("--flagfile=base.cfg\n--model=classifier\n")
    with pytest.raises(ValueError, match="has a pretraining stage"):
        check_fold_flags(config(folds=3, classifier_flagfile=str(tmp_path / "cls.cfg"),
                                classifier_dir=str(stages)))
    (tmp_path / "base.cfg").write_text("--backbone=tiny\n")
    check_fold_flags(config(folds=3, classifier_flagfile=str(tmp_path / "cls.cfg"),
                            classifier_dir=str(stages)))
    check_fold_flags(config(folds=3, classifier_flagfile="c.cfg"))  # per fold: fine
    check_fold_flags(config(folds=3, classifier_flagfile="c.cfg", classifier_dir="x",
                            classifier_data_dir="phantoms"))  # other data: one shared stage
    check_fold_flags(config(folds=3, classifier_dir="x"))  # no stage: where it would go
    for stage in ({"classifier_flagfile": "c.cfg"}, {"pretrain_flagfile": "p.cfg"}):
        with pytest.raises(ValueError, match="takes no stage"):  # every worker would run it
            check_fold_flags(config(folds=3, fold=0, strategy="multi_worker", **stage))


def test_the_classifier_flagfile_is_read_beside_the_flagfile_that_names_it(tmp_path):
    from covid_keras.core import cli

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.cfg").write_text("--classifier_flagfile=cls.cfg\n")
    argv = cli.expand_flagfiles(["p", f"--flagfile={tmp_path / 'sub' / 'a.cfg'}"])
    assert argv == ["p", f"--classifier_flagfile={tmp_path / 'sub' / 'cls.cfg'}"]


@pytest.mark.parametrize("other_data", [False, True])
def test_the_stage_command_takes_this_runs_seed_and_splits_or_the_other_datas(
        tmp_path, monkeypatch, other_data):
    """On the same data the stage gets this run's seed, val split and held-out splits; on
    --classifier_data_dir that folder, its own val split and no held-out split. A failed
    stage is an error that says how to resume it."""
    import subprocess

    from covid_keras.training import trainer

    calls = []
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 3))
    extra = {"classifier_data_dir": str(tmp_path / "phantoms")} if other_data else {}
    cfg = config(classifier_flagfile="cls.cfg", seed=7, val_split="tune",
                 report_splits=("test",), **extra)
    with pytest.raises(RuntimeError, match="classifier stage failed .exit 3; its error is "
                                           "the line above.: rerun") as failed:
        trainer.classifier_stage(cfg, str(tmp_path / "run"))
    (cmd,) = calls
    # the command that shows why is the stage's own, data and --reuse included
    assert str(failed.value).endswith(f"python {' '.join(cmd[1:])} --verbosity=1")
    assert cmd[1:4] == ["-m", "covid_keras.train", "--flagfile=cls.cfg"]
    assert f"--run_dir={tmp_path / 'run' / 'classifier'}" in cmd
    assert "--seed=7" in cmd and "--reuse" in cmd
    if other_data:
        assert f"--data_dir={tmp_path / 'phantoms'}" in cmd and "--report_splits=" in cmd
        assert not any(c.startswith("--val_split") for c in cmd)
    else:
        assert {"--data_dir=d", "--val_split=tune", "--report_splits=test"} <= set(cmd)


@pytest.mark.parametrize("overwrite, shared", [(True, False), (True, True), (False, False)])
def test_the_runs_own_stage_starts_again_with_its_overwrite_a_shared_one_never(
        tmp_path, monkeypatch, overwrite, shared):
    """--overwrite starts the run again from scratch, its own stage (<run_dir>/classifier)
    included unless it is the same (--reuse --overwrite); a --classifier_dir stage is shared
    (e.g. the ResNet-50 run of the seed) and never replaced from here."""
    import subprocess

    from covid_keras.training import trainer

    calls = []
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    extra = {"classifier_dir": str(tmp_path / "shared")} if shared else {}
    cfg = config(classifier_flagfile="cls.cfg", overwrite=overwrite, **extra)
    with pytest.raises(RuntimeError):
        trainer.classifier_stage(cfg, str(tmp_path / "run"))
    assert ("--overwrite" in calls[0]) == (overwrite and not shared)
    assert "--reuse" in calls[0]


def test_reuse_with_overwrite_replaces_a_finished_run_with_other_flags(tmp_path):
    """--reuse alone: a finished run with other flags is an error naming them; with
    --overwrite it is replaced (None: train as a new run); the same run is reused."""
    from covid_keras.core import files
    from covid_keras.training.trainer import TrainConfig, resolved_flags, reused_run
    from tests.helpers import fake_manifest

    data = fake_manifest(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.keras").write_bytes(b"a finished run's file")
    (run / "metrics.json").write_text('{"best_epoch": 3}')
    done = TrainConfig(data_dir=str(data), run_dir=str(run), seed=0)
    files.write_json(str(run / "run_info.json"), {
        "flags": resolved_flags(done),
        "dataset_manifest_sha256": files.sha256(str(data / "manifest.json"))})
    assert reused_run(done.replace(reuse=True)) == {"best_epoch": 3}
    assert reused_run(done.replace(reuse=True, overwrite=True)) == {"best_epoch": 3}
    other = done.replace(reuse=True, seed=1)
    with pytest.raises(ValueError, match="--seed: 0 -> 1"):
        reused_run(other)
    assert reused_run(other.replace(overwrite=True)) is None
    assert reused_run(done) is None  # no --reuse: the trainer's own checks decide


def test_folds_refuse_a_shared_stage_on_their_own_data(tmp_path):
    """--folds with --classifier_data_dir naming the folds' own data (the same folder, or a
    copy of its manifest): the one shared stage would train on every fold's validation
    patients. Other data is fine."""
    import shutil

    from covid_keras.training.cross_validation import check_shared_stage_data
    from tests.helpers import fake_manifest

    data = fake_manifest(tmp_path / "data")
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    other = fake_manifest(tmp_path / "other", image_size=128)
    for stage_data in (data, copy):
        with pytest.raises(ValueError, match="every fold's validation patients"):
            check_shared_stage_data(config(folds=3, classifier_flagfile="c.cfg",
                                           data_dir=str(data),
                                           classifier_data_dir=str(stage_data)))
    check_shared_stage_data(config(folds=3, classifier_flagfile="c.cfg", data_dir=str(data),
                                   classifier_data_dir=str(other)))


def test_folds_refuse_a_shared_stage_on_another_preparation_of_their_patients(data_dir,
                                                                              tmp_path):
    """The same patients in another data folder (e.g. prepared again with other split
    fractions: the same pseudonymous keys, another manifest) are refused too."""
    import shutil

    from covid_keras.training.cross_validation import check_shared_stage_data

    again = Path(shutil.copytree(data_dir, tmp_path / "again"))
    manifest = json.loads((again / "manifest.json").read_text())
    (again / "manifest.json").write_text(json.dumps({**manifest, "dataset": "rebuilt"}))
    with pytest.raises(ValueError, match=r"it holds \d+ patients of --data_dir"):
        check_shared_stage_data(config(folds=3, classifier_flagfile="c.cfg",
                                       data_dir=str(data_dir), classifier_data_dir=str(again)))
