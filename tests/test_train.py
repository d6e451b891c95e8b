"""The trainer end to end on generated TFRecords (tiny DRENet, CPU)."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_no_tf_notices, user_env

pytestmark = pytest.mark.slow  # real training runs: minutes, not seconds
REPO = Path(__file__).resolve().parents[1]
# TF_CPP_MIN_LOG_LEVEL unset: the entry points quieten TensorFlow themselves (tested)
ENV = user_env()
ENV["KERAS_BACKEND"] = "tensorflow"


@pytest.fixture(scope="module")
def data_dir(tiny_dataset):
    return tiny_dataset(kinds=("normal", "covid", "bacterial"), patients_per_kind=3,
                        num_slices=20, matrix=64, seed=0,
                        flags=("--classes=normal,covid,bacterial",
                               "--split_fractions=0.6,0.2,0.2", "--shard_size_mb=0.05"))


#: helpers.Commands of the session: ``python -m covid_keras.train`` without an interpreter
#: start each (set by the autouse fixture below)
COMMANDS = None


@pytest.fixture(autouse=True)
def _commands(commands):
    global COMMANDS
    COMMANDS = commands


def train_cmd(data_dir, run_dir, *extra):
    """The command line, for the runs that need a process of their own (kill, TF_CONFIG
    workers, the console check of a real interpreter start)."""
    return [sys.executable, "-m", "covid_keras.train", *train_args(data_dir, run_dir, *extra)]


def train_args(data_dir, run_dir, *extra):
    return ["--flagfile=configs/smoke.cfg", f"--data_dir={data_dir}", f"--run_dir={run_dir}",
            *extra]


def train(data_dir, run_dir, *extra, timeout=300):
    """``python -m covid_keras.train`` (helpers.Commands): its CompletedProcess."""
    return COMMANDS.run("covid_keras.train", *train_args(data_dir, run_dir, *extra),
                        timeout=timeout)


def run_train(data_dir, run_dir, *extra, timeout=900):
    proc = train(data_dir, run_dir, *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_log(run_dir):
    with open(Path(run_dir) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mirrored_run(data_dir, tmp_path_factory, commands):
    run_dir = tmp_path_factory.mktemp("mirrored")
    proc = commands.run("covid_keras.train", *train_args(data_dir, run_dir, "--cpu_devices=2"),
                        timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run_dir, proc


def test_smoke_mirrored_two_cpu_replicas(mirrored_run, data_dir):
    run_dir, proc = mirrored_run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["strategy_class"] == "MirroredStrategy" and info["replicas"] == 2
    assert info["global_batch"] == 4
    for key in ("flags", "versions", "git_sha", "dataset_manifest_sha256", "seed"):
        assert key in info
    import hashlib

    assert info["dataset_manifest_sha256"] == hashlib.sha256(
        (data_dir / "manifest.json").read_bytes()).hexdigest()
    for name in ("best.keras", "final.keras", "flags.cfg", "metrics.json", "log.csv"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "backup").exists()  # removed when the run finished
    log = read_log(run_dir)
    assert [int(r["epoch"]) for r in log] == [0, 1]
    assert "val: patients" in proc.stdout
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["final"]["patients"] == 3 and "best" in m
    flags_cfg = (run_dir / "flags.cfg").read_text()
    assert "--cpu_devices=2" in flags_cfg and f"--data_dir={data_dir}" in flags_cfg
    assert "test_random_seed" not in flags_cfg and "--alsologtostderr" not in flags_cfg
    chosen = json.loads((run_dir / "best.keras.json").read_text())
    assert m["best_epoch"] == chosen["epoch"] in (1, 2)
    assert m["checkpoint_monitor"] == chosen["monitor"] == "val_patient_auc_smoothed"
    for key in ("loss", "prediction_loss", "concat_loss", "head_active_units",
                "logits_spread"):
        assert key in m["best"], key
    # the end of the run scored best.keras's weights (loaded into the trained, mirrored
    # model): the val loss the checkpoint recorded when it was chosen
    assert chosen["tie_break_monitor"] == "val_prediction_loss"
    assert m["best"]["prediction_loss"] == pytest.approx(chosen["tie_break"], abs=1e-6)
    # the patient decision, chosen on val at the end of training
    decision = json.loads((run_dir / "decision.json").read_text())
    assert decision["split"] == "val" and decision["rule"] in ("mean", "any")
    assert 0.0 <= decision["threshold"] <= 1.0 and decision["positive_class"] == "covid"
    assert m["decision"]["rule"] == decision["rule"]
    assert f"decision: {decision['rule']} rule" in proc.stdout


def test_a_run_is_repeated_from_its_flags_cfg(mirrored_run, data_dir, tmp_path):
    run_dir, _ = mirrored_run
    run_train(data_dir, tmp_path / "again", f"--flagfile={run_dir / 'flags.cfg'}",
              f"--run_dir={tmp_path / 'again'}", "--cpu_devices=0", "--epochs=1",
              "--steps_per_epoch=1")
    assert (tmp_path / "again" / "final.keras").exists()


def test_an_out_of_range_intensity_augmentation_is_refused(data_dir, tmp_path):
    # (the flags in a run: test_flags_cfg_records_the_run_and_is_reused_from_another_folder)
    proc = train(data_dir, tmp_path / "bad", "--zoom_jitter=1.5")
    assert proc.returncode != 0 and "zoom_jitter" in proc.stderr


def test_population_bn_stats_are_those_of_the_saved_weights(mirrored_run, data_dir,
                                                            tmp_path):
    """--bn_stats=population (two mirrored replicas, a weight average): the saved model's
    batch-norm statistics are the population statistics of its own (averaged) weights over
    the unaugmented training split in per-replica batches; with the default moving
    averages (``mirrored_run``: two mirrored replicas, the default --bn_stats) they are
    not."""
    import keras
    import numpy as np

    from covid_keras.io import data
    from covid_keras.model import saving
    from covid_keras.training.bn_stats import population_statistics

    # population: two epochs, the second reuses the compiled pass that the first traced;
    # with the average, statistics of the raw weights would not match the saved ones (no
    # display images: not what is checked here). moving: the module's finished run, trained
    # with the default --bn_stats=moving
    population = tmp_path / "population"
    run_train(data_dir, population, "--bn_stats=population", "--cpu_devices=2",
              "--epochs=2", "--ema_momentum=0.5", "--num_display_images=0")
    recorded = json.loads((mirrored_run[0] / "run_info.json").read_text())["flags"]
    assert recorded["bn_stats"] == "moving" and recorded["cpu_devices"] == 2
    for run_dir, want_equal in ((population, True), (mirrored_run[0], False)):
        model = saving.load_model(str(run_dir / "final.keras"))
        # the trainer's pipeline (smoke.cfg): the input the model takes, by its spec
        cfg = data.PipelineConfig.for_model(saving.model_spec(model), shuffle_buffer=64)
        assert not cfg.normalize  # a new model normalises its own input
        # the trainer's global seed (--seed=0): tf.data's seeded shuffle combines it with
        # the op's seed, so the same order needs the same global seed
        keras.utils.set_random_seed(0)
        batches = (x for x, _ in data.make_dataset(str(data_dir), "train", 2, training=False,
                                                     cfg=cfg, order_seed=0))
        pooled, n = population_statistics(model, batches)
        assert n >= 3 and len(pooled) > 3
        gaps = [float(np.max(np.abs(np.asarray(la.moving_mean) - mean)))
                for la, mean, _ in pooled]
        assert (max(gaps) < 1e-3) is want_equal, (run_dir.name, max(gaps))
        if want_equal:
            for la, _, var in pooled:
                np.testing.assert_allclose(np.asarray(la.moving_variance), var, rtol=1e-3,
                                           atol=1e-4)
    proc = train(data_dir, tmp_path / "bad", "--bn_stats=population",
                 "--strategy=multi_worker")
    assert proc.returncode != 0 and "--bn_stats=population" in proc.stderr


def test_order_seed_mixes_studies_in_a_fixed_order(data_dir):
    from covid_keras.io import data

    cfg = data.PipelineConfig(input_size=64, backbone="tiny")

    def meta(**kw):
        out = [m for _, m in data.make_dataset(str(data_dir), "train", 4, training=False,
                                               cfg=cfg, with_meta=True, **kw)]
        return ([k for m in out for k in m["sop_key"].numpy().tolist()],
                [k for m in out for k in m["study_key"].numpy().tolist()])

    def changes(studies):
        return sum(a != b for a, b in zip(studies, studies[1:]))

    plain, plain_studies = meta()
    mixed, mixed_studies = meta(order_seed=3)
    assert sorted(mixed) == sorted(plain) and len(set(plain)) == len(plain)  # each once
    assert meta(order_seed=3)[0] == mixed  # the same order every pass
    assert changes(mixed_studies) > 3 * changes(plain_studies)  # studies mixed
    with pytest.raises(ValueError, match="order_seed"):
        data.make_dataset(str(data_dir), "train", 4, training=True, cfg=cfg, order_seed=1)


@pytest.mark.parametrize("input_norm", ["none", "per_image"])
def test_init_from_reads_the_saved_models_input_norm(input_norm, tmp_path):
    from covid_keras import build_classifier, build_drenet
    from covid_keras.model.saving import saved_model_spec

    build_drenet(2, input_size=64, backbone="tiny", input_norm=input_norm).save(
        tmp_path / "d.keras")
    build_classifier("tiny", 2, 64, input_norm=input_norm).save(tmp_path / "c.keras")
    for name, model in (("d", "drenet"), ("c", "classifier")):
        spec = saved_model_spec(str(tmp_path / f"{name}.keras"))
        assert spec == {"backbone": "tiny", "input_size": 64, "num_classes": 2,
                        "model": model, "input_norm": input_norm,
                        "include_preprocessing": True}
    (tmp_path / "bad.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="bad.keras is not a readable .keras model"):
        saved_model_spec(str(tmp_path / "bad.keras"))


def _events(run_dir, sub) -> dict:
    """tag -> list of summary values, read from the event files with tf.data."""
    import tensorflow as tf

    out: dict = {}
    for path in sorted(glob.glob(str(run_dir / "tensorboard" / sub / "events.out.*"))):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(value)
    return out


def test_tensorboard_events_have_the_grouped_scalars_and_images(mirrored_run):
    run_dir, _ = mirrored_run
    train = _events(run_dir, "train")
    for tag in ("loss/total", "loss/raw", "loss/concat", "loss/region", "loss/rank",
                "optimizer/learning_rate"):
        assert tag in train, (tag, sorted(train))
    assert len(train["loss/rank"]) == 2  # one per epoch
    assert not [t for t in train if t.startswith("epoch_")]  # Keras's ungrouped tags
    val = _events(run_dir, "validation")
    # the validation loss beside the training loss (same tag, validation run), the head's
    # health each epoch, the metrics under val/, the chosen epoch's under best/
    for tag in ("val/patient_auc", "val/patient_sensitivity", "val/patient_specificity",
                "val/slice_auc", "val/slice_sensitivity", "val/slice_specificity",
                "val/patient_auc_smoothed", "loss/total", "loss/concat", "loss/prediction",
                "head/active_units", "head/logits_spread", "head/raw_logits_spread",
                "head/region_logits_spread", "best/patient_auc", "best/slice_auc"):
        assert tag in val, (tag, sorted(val))
    assert len(val["loss/total"]) == 2 and len(val["best/patient_auc"]) == 1
    assert {"val/slice_pr_curve/pr_curves", "val/patient_pr_curve/pr_curves",
            "val/slices_with_top_k_boxes", "_hparams_/session_start_info",
            "_hparams_/experiment"} <= set(val)
    assert val["val/slice_pr_curve/pr_curves"][0].metadata.plugin_data.plugin_name == \
        "pr_curves"
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        val["_hparams_/session_start_info"][0].metadata.plugin_data.content)
    hparams = start.session_start_info.hparams
    assert hparams["backbone"].string_value == "tiny" and "dataset" in hparams
    image = val["val/slices_with_top_k_boxes"][-1].tensor
    # width, height, then the PNG-encoded images (num_display_images=2 in smoke.cfg)
    assert image.string_val[:2] == [b"64", b"64"] and len(image.string_val) == 4
    assert image.string_val[2].startswith(b"\x89PNG")


def test_box_images_come_from_different_patients_of_each_class():
    from covid_keras.training.callbacks import display_indices

    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 0])
    keys = ["a", "a", "a", "b", "b", "c", "d", "d", "e", "e"]
    idx = display_indices(labels, keys, 5)
    assert [int(labels[i]) for i in idx] == [0, 1, 2, 0, 1]
    assert len({keys[i] for i in idx}) == 5  # five patients
    assert idx[0] == 1  # the middle slice of patient a
    assert len(display_indices(labels, keys, 20)) == 5  # one slice per patient at most
    assert len(display_indices(labels, keys, 0)) == 0


def kill_when(cmd, ready, timeout: float = 600, stderr: Path | None = None) -> None:
    """Starts ``cmd`` and SIGKILLs it as soon as ``ready()`` is true (before it ends); its
    stderr goes to the file ``stderr`` if given."""
    with open(stderr or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and not ready():
                assert proc.poll() is None, "training ended before it could be killed"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_kill_mid_epoch_and_resume(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    extra = ("--epochs=3", "--steps_per_epoch=6", "--backup_every_steps=2")
    meta = run_dir / "backup" / "stage0" / "training_metadata.json"

    def committed_in_epoch_1():  # a committed backup from inside epoch 1
        try:
            return json.loads(meta.read_text())["epoch"] == 1
        except (OSError, ValueError):
            return False

    kill_when(train_cmd(data_dir, run_dir, *extra), committed_in_epoch_1)
    assert [int(r["epoch"]) for r in read_log(run_dir)] == [0]
    assert not (run_dir / "final.keras").exists()
    proc = run_train(data_dir, run_dir, *extra)
    assert "resuming from epoch 2" in proc.stderr, proc.stderr[-2000:]
    log = read_log(run_dir)
    assert [int(r["epoch"]) for r in log] == [0, 1, 2]  # resumed at epoch 1, not 0

    from covid_keras.model import saving

    model = saving.load_model(str(run_dir / "final.keras"))
    # The resumed run restarts epoch 1 from the mid-epoch backup's weights and optimizer
    # state: more steps than an uninterrupted run, i.e. the killed run's steps were kept.
    assert int(model.optimizer.iterations.numpy()) > 3 * 6


#: A run of two stages (SGD for an epoch, then Adam for two), a backup every step, with the
#: weights' moving average
TWO_STAGES = ("--stages=sgd@0.01:1,adam@0.001:2", "--steps_per_epoch=4",
              "--backup_every_steps=1", "--ema_momentum=0.5")


@pytest.fixture(scope="module")
def killed_in_stage_two(data_dir, tmp_path_factory):
    """A :data:`TWO_STAGES` run killed (a process of its own) as soon as its second stage
    committed a backup: the folder, which tests copy (``_copy_run``) and never change; its
    stderr (a real interpreter start's) is ``stderr.txt`` beside it."""
    run_dir = tmp_path_factory.mktemp("killed_in_stage_two") / "run"
    meta = run_dir / "backup" / "stage1" / "training_metadata.json"
    kill_when(train_cmd(data_dir, run_dir, *TWO_STAGES), meta.exists,
              stderr=run_dir.parent / "stderr.txt")
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_two_stage_run_killed_in_stage_two_does_not_redo_stage_one(killed_in_stage_two,
                                                                   data_dir, tmp_path):
    """With --ema_momentum too: after the kill and the resume, the last epoch's validation
    saw the weights final.keras holds (the moving average, which fit leaves in the model),
    and the checkpoints' optimisers keep the average."""
    run_dir = _copy_run(killed_in_stage_two, tmp_path / "run")
    assert (run_dir / "backup" / "stage0.done.weights.h5").exists()
    assert [int(r["epoch"]) for r in read_log(run_dir)] == [0]
    run_train(data_dir, run_dir, *TWO_STAGES)
    log = read_log(run_dir)
    assert [int(r["epoch"]) for r in log] == [0, 1, 2]  # stage 0 not redone
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    for key in ("prediction_loss", "concat_loss", "raw_loss"):
        assert final[key] == pytest.approx(float(log[-1]["val_" + key]), rel=1e-4), key

    from covid_keras.model import saving

    for name in ("best.keras", "final.keras"):
        optimizer = saving.load_model(str(run_dir / name)).optimizer
        assert optimizer.use_ema and optimizer.ema_momentum == 0.5, name


def test_interrupted_run_refuses_other_flags_and_overwrite_restarts_it(killed_in_stage_two,
                                                                      data_dir, tmp_path):
    run_dir = _copy_run(killed_in_stage_two, tmp_path / "run")
    meta = run_dir / "backup" / "stage1" / "training_metadata.json"
    assert meta.exists() and not (run_dir / "final.keras").exists()
    # other run-defining flags: refused, nothing changed
    proc = train(data_dir, run_dir, *TWO_STAGES, "--steps_per_epoch=5")
    assert proc.returncode != 0 and "--steps_per_epoch: 4 -> 5" in proc.stderr, \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and meta.exists()
    # the same flags on another build of the data (as a build into a new folder with a new
    # salt, another record order, makes): refused too, not resumed
    rebuilt = _copy_run(killed_in_stage_two, tmp_path / "rebuilt")
    info = json.loads((rebuilt / "run_info.json").read_text())
    (rebuilt / "run_info.json").write_text(json.dumps({**info,
                                                       "dataset_manifest_sha256": "0" * 64}))
    proc = train(data_dir, rebuilt, *TWO_STAGES)
    assert proc.returncode != 0 and "trained on another build of" in proc.stderr, \
        proc.stderr[-2000:]
    assert "--salt_file" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr and "resuming" not in proc.stderr
    # --overwrite: a fresh run with the new flags (not a resume)
    proc = run_train(data_dir, run_dir, "--stages=sgd@0.01:1", "--steps_per_epoch=2",
                     "--overwrite")
    assert "resuming" not in proc.stderr
    assert [int(r["epoch"]) for r in read_log(run_dir)] == [0]
    flags = json.loads((run_dir / "run_info.json").read_text())["flags"]
    assert flags["steps_per_epoch"] == 2 and flags["ema_momentum"] != 0.5


def test_run_killed_after_its_last_stage_resumes(killed_in_stage_two, data_dir, tmp_path):
    run_dir = _copy_run(killed_in_stage_two, tmp_path / "run")
    backup = run_dir / "backup"
    assert (backup / "stage1").is_dir()  # killed in the last stage
    # What a kill between the last stage's marker and final.keras leaves behind
    import shutil

    shutil.copy(backup / "stage0.done.weights.h5", backup / "stage1.done.weights.h5")
    proc = run_train(data_dir, run_dir, *TWO_STAGES)
    assert (run_dir / "final.keras").exists() and (run_dir / "metrics.json").exists()
    assert "val: patients" in proc.stdout


def test_user_errors_are_one_line_and_verbosity_shows_the_traceback(data_dir, tmp_path):
    cases = [
        (["--data_dir=" + str(tmp_path / "missing")], "manifest.json is missing"),
        (["--stages=adam@x"], "A stage is OPTIMIZER@LR:EPOCHS"),
        (["--backbone_weights=" + str(tmp_path / "none.h5")], "no such file"),
        (["stray"], "unexpected argument(s) 'stray'"),
        (["--init_from=" + str(tmp_path / "notes.keras")], "is not a readable .keras model"),
    ]
    (tmp_path / "notes.keras").write_text("not a zip")
    for extra, message in cases:
        run_dir = tmp_path / "run"
        proc = train(data_dir, run_dir, *extra)
        assert proc.returncode != 0, extra
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        others = [ln for ln in proc.stderr.splitlines()
                  if ln.strip() and ln not in errors and "Warning" not in ln]
        assert not others, proc.stderr[-2000:]  # no log line after it ("took N s")
        assert not run_dir.exists(), extra  # nothing written before the arguments are valid
    proc = train(data_dir, tmp_path / "run", "--stages=adam@x", "--verbosity=1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_is_quiet_and_the_epoch_line_short(mirrored_run, killed_in_stage_two):
    # TensorFlow's start-up notices: a real interpreter start's (a command of helpers.Commands
    # is a fork of a process that imported TensorFlow, quietened, already)
    started = (killed_in_stage_two.parent / "stderr.txt").read_text()
    assert "stage 0: sgd lr 0.01" in started, started[-2000:]  # its log, captured
    assert_no_tf_notices(started)
    _, proc = mirrored_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and all(len(ln) < 130 for ln in lines), lines
    assert "val patient AUC" in lines[0] and "val loss" in lines[0]
    assert "best checkpoint: epoch" in proc.stdout and "positive class: 'covid'" in proc.stdout


def test_evaluation_counts_every_record_once(data_dir):
    from covid_keras.io import data
    from covid_keras.training.callbacks import Evaluator

    manifest = data.read_manifest(str(data_dir))
    for split in ("train", "val", "test"):
        expected = sum(data.split_counts(manifest, split).values())
        files = data.shard_files(str(data_dir), split)
        assert data.count_records(files) == expected
        cfg = data.PipelineConfig(input_size=64, backbone="tiny")
        for batch in (1, 3, 7):
            ds = data.make_dataset(str(data_dir), split, batch, training=False, cfg=cfg,
                                   with_meta=True)
            sops = [k for _, m in ds for k in m["sop_key"].numpy()]
            assert len(sops) == expected and len(set(sops)) == expected
        ev = Evaluator(str(data_dir), split, 5, cfg, num_display=0)
        assert len(ev) == expected


def test_multi_worker_shards_are_disjoint_and_complete(data_dir):
    from covid_keras.io import data

    cfg = data.PipelineConfig(input_size=64, backbone="tiny")
    files = data.shard_files(str(data_dir), "train")
    assert len(files) >= 2  # the fixture's small --shard_size_mb: sharding by file is tested
    for count in (2, len(files) + 1):  # by file; by record (more workers than files)
        seen = []
        for index in range(count):
            ds = data.make_dataset(str(data_dir), "train", 1, training=False, cfg=cfg,
                                   with_meta=True, shard=(index, count))
            seen.append({k for _, m in ds for k in m["sop_key"].numpy()})
        union = set().union(*seen)
        assert sum(len(s) for s in seen) == len(union) == data.count_records(files)


RAM_RUN = """
import json, os, sys
import tensorflow as tf
from absl import flags
from covid_keras.core import cli
from covid_keras.model import saving
from covid_keras import train
src = sys.argv[1]
tf.io.gfile.makedirs("ram://data")
for name in tf.io.gfile.listdir(src):
    if name.endswith(".tfrecord.gz") or name == "manifest.json":
        tf.io.gfile.copy(os.path.join(src, name), "ram://data/" + name)
train.define_flags()
flags.FLAGS(cli.expand_flagfiles(["prog", "--flagfile=configs/smoke.cfg",
                                  "--data_dir=ram://data", "--run_dir=ram://runs/smoke",
                                  "--report_splits=test", "--epochs=1"]))
train.main([])
run = "ram://runs/smoke"
model = saving.load_model(run + "/best.keras")
print("RESULT " + json.dumps({
    "names": sorted(n.rstrip("/") for n in tf.io.gfile.listdir(run)),
    "tensorboard": sorted(n.rstrip("/") for n in tf.io.gfile.listdir(run + "/tensorboard")),
    "classes": model.covid_keras_info["class_names"],
    "metrics": json.loads(tf.io.gfile.GFile(run + "/metrics.json").read())["best_epoch"]}))
"""


def test_data_and_run_folders_on_another_file_system(data_dir):
    # TensorFlow's in-memory ram:// file system, in one process: what gs:// users get
    proc = COMMANDS.run_code(RAM_RUN, str(data_dir), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert {"run_info.json", "flags.cfg", "best.keras", "best.keras.json", "final.keras",
            "log.csv", "metrics.json", "tensorboard", "decision.json"} <= set(got["names"]), \
        got["names"]
    assert "backup" not in got["names"]
    assert set(got["tensorboard"]) == {"train", "validation"}
    assert got["classes"] == ["normal", "covid", "bacterial"] and got["metrics"] == 1
    assert not (REPO / "ram:").exists()  # nothing fell back to a local path


def test_train_pipeline_batches_and_augments(data_dir):
    from covid_keras.io import data

    cfg = data.PipelineConfig(input_size=64, backbone="resnet50", rotation_degrees=10, seed=1)
    ds = data.make_dataset(str(data_dir), "train", 4, training=True, cfg=cfg, repeat=True)
    x, y = next(iter(ds))
    assert x.shape == (4, 64, 64, 3) and y.shape == (4,)
    # caffe normalisation: BGR minus the ImageNet mean
    assert float(x.numpy().min()) >= -123.68 - 1e-3 and float(x.numpy().max()) <= 255 - 103.9
    balanced = data.make_dataset(str(data_dir), "train", 8, training=True,
                                 cfg=data.PipelineConfig(input_size=64, backbone="tiny",
                                                         class_balanced=True, num_classes=3))
    labels = np.concatenate([b[1].numpy() for b in balanced.take(30)])
    counts = np.bincount(labels, minlength=3) / len(labels)
    assert np.all(np.abs(counts - 1 / 3) < 0.1), counts


def test_finetune_head_only_from_a_trained_model(mirrored_run, data_dir, tmp_path):

    from covid_keras.model import saving

    src = mirrored_run[0] / "final.keras"
    # --backbone=resnet50 (configs/finetune_new_hospital.cfg's) must not normalise the
    # inputs of the tiny model it loads: the model's own backbone and size win
    run_train(data_dir, tmp_path / "ft", f"--init_from={src}", "--trainable=head",
              "--epochs=1", "--steps_per_epoch=2", "--learning_rate=0.1",
              "--backbone=resnet50", "--input_size=448")
    recorded = json.loads((tmp_path / "ft" / "run_info.json").read_text())["flags"]
    assert recorded["backbone"] == "tiny" and recorded["input_size"] == 64
    before = saving.load_model(str(src))
    after = saving.load_model(str(tmp_path / "ft" / "final.keras"))
    changed = {}
    for a, b in zip(before.weights, after.weights):
        assert a.path == b.path
        changed[a.path] = not np.array_equal(np.asarray(a), np.asarray(b))
    moved = sorted(p for p, c in changed.items() if c and "optimizer" not in p)
    assert moved and all(p.startswith("head/") for p in moved), moved


def test_finished_run_dir_needs_overwrite(mirrored_run, data_dir):
    run_dir, _ = mirrored_run
    proc = train(data_dir, run_dir, "--epochs=1")
    assert proc.returncode != 0 and "--overwrite" in proc.stderr


def test_flags_cfg_records_the_run_and_is_reused_from_another_folder(data_dir, tmp_path):
    """A run as `make demo` makes it (relative paths, --overwrite), with per-image input
    normalisation and the intensity augmentations: flags.cfg records it, repeats it from
    another folder, and the repeat's losses and metrics are the same (deterministic,
    augmentations included)."""
    from covid_keras.model import saving

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    proc = COMMANDS.run(
        "covid_keras.train", f"--flagfile={REPO / 'configs/smoke.cfg'}",
        f"--data_dir={os.path.relpath(data_dir, first)}",
        "--run_dir=runs/r", "--overwrite", "--epochs=1", "--steps_per_epoch=3",
        "--input_norm=per_image", "--zoom_jitter=0.2", "--gamma_jitter=0.3", cwd=first)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run_dir = first / "runs" / "r"
    model = saving.load_model(str(run_dir / "final.keras"))
    assert model.get_layer("input_norm").scale > 0  # saved with the model
    flags_cfg = (run_dir / "flags.cfg").read_text()
    assert "--input_norm=per_image" in flags_cfg and "--zoom_jitter=0.2" in flags_cfg
    assert "overwrite" not in flags_cfg, flags_cfg  # a one-shot action, not the run
    assert f"--run_dir={run_dir}\n" in flags_cfg, flags_cfg  # absolute
    assert f"--data_dir={data_dir}\n" in flags_cfg, flags_cfg
    assert json.loads((run_dir / "metrics.json").read_text())["deterministic"] is True
    # the same flags into the same folder: one line, the run untouched
    stamp = (run_dir / "best.keras").stat().st_mtime_ns
    proc = COMMANDS.run("covid_keras.train", f"--flagfile={run_dir / 'flags.cfg'}", cwd=other,
                        timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1 and "holds a finished run" in lines[0], proc.stderr[-2000:]
    assert "covid_keras.evaluate" in lines[0] and "--overwrite" in lines[0]
    assert (run_dir / "best.keras").stat().st_mtime_ns == stamp
    # from another working directory into a new folder: the recorded paths still resolve
    proc = COMMANDS.run("covid_keras.train", f"--flagfile={run_dir / 'flags.cfg'}",
                        "--run_dir=again", cwd=other)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (other / "again" / "final.keras").exists()
    # deterministic by default: the same flags and seed repeat the run's losses and metrics
    assert (other / "again" / "log.csv").read_text() == (run_dir / "log.csv").read_text()


@pytest.mark.parametrize("flag,message", [
    ("--report_splits=tset", "the split 'tset' has no slices"),
    ("--report_splits=val", "must not include the val split"),
    ("--val_split=valid", "the split 'valid' has no slices"),
])
def test_bad_splits_fail_before_anything_is_written(data_dir, tmp_path, flag, message):
    run_dir = tmp_path / "run"
    proc = train(data_dir, run_dir, flag)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_an_empty_split_error_gives_data_preps_reason(data_dir, tmp_path):
    # data_prep records why a split is empty (manifest empty_splits); train's one-line error
    # repeats it instead of guessing.
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["counts"].pop("val", None)
    reason = "6 patients at 60/10/30 leave none for val"
    manifest["empty_splits"] = {"val": reason}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    proc = train(copy, run_dir)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "the split 'val' has no slices" in proc.stderr and reason in proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())
