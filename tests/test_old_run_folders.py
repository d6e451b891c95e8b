"""Old run folders still load (issue 28 item 3): every run folder made before models
normalised their own input holds a model without ``BackboneNormalization`` that takes the
pixel values normalised as its backbone expects. Such a folder, made here by the current
code as the trainer made it then (the builders' ``include_preprocessing=False``, the key
absent from best.keras as in every file saved before it), is evaluated, exported and
predicted by the commands in processes of their own, and each answers what the model
answers on inputs normalised by ``keras.applications``' own preprocessing (what the tools
fed it before the switch: a reference independent of covid_keras); and an interrupted
run of the trainer before the switch resumes as it was (no layer, normalised input)."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_run

pytestmark = pytest.mark.slow  # the commands on a run folder, and two short trainings
REPO = Path(__file__).resolve().parents[1]
SIZE = 64
DECISION = {"rule": "mean", "threshold": 0.3, "positive_class": "covid"}

EXPORT_CALL = """
import sys
import numpy as np
import tensorflow as tf
images = np.load(sys.argv[2])
sig = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
np.save(sys.argv[3], sig(images=tf.constant(images, tf.float32))["probabilities"].numpy())
"""


def strip_include_preprocessing(path: Path) -> None:
    """Rewrites a .keras file as one saved before ``include_preprocessing`` existed (no key
    in its covid_keras.json nor in a DRENet's build_config)."""
    from covid_keras.model.saving import INFO_ENTRY

    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    info = json.loads(entries[INFO_ENTRY])
    assert info.pop("include_preprocessing") is False
    entries[INFO_ENTRY] = json.dumps(info).encode()
    config = json.loads(entries["config.json"])
    assert config["config"]["build_config"].pop("include_preprocessing") is False
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)


def _reference_input(images_u8: np.ndarray, backbone: str) -> np.ndarray:
    """What the tools fed a model before the switch: keras.applications' preprocessing."""
    from keras.applications import imagenet_utils

    from covid_keras.model.backbones import PREPROCESSING

    return imagenet_utils.preprocess_input(np.asarray(images_u8, np.float32).copy(),
                                           data_format="channels_last",
                                           mode=PREPROCESSING[backbone])


def _probs(model, x: np.ndarray) -> np.ndarray:
    from covid_keras.evaluation.metrics import softmax

    return softmax(np.asarray(model(x, training=False)["logits"], np.float64))


@pytest.fixture(scope="module")
def old_run(tiny_dataset, tmp_path_factory):
    """(run folder, data folder, {sop_key: uint8 image}, records in order, the reference
    probabilities in that order): a tiny DRENet run folder as the trainer made it before
    BackboneNormalization, on the dataset tests/test_predict.py predicts from."""
    import tensorflow as tf

    from covid_keras.core import schema
    from covid_keras.io import data
    from covid_keras.model.saving import load_model, model_spec

    data_dir = tiny_dataset(kinds=("normal", "covid"), patients_per_kind=1, num_slices=20,
                            matrix=128, seed=0, flags=("--classes=normal,covid,bacterial",
                                                       "--split_fractions=1,0,0"))
    root = tmp_path_factory.mktemp("old_run")
    run = make_run(root / "run", "drenet", DECISION, data_dir, include_preprocessing=False)
    strip_include_preprocessing(run / "best.keras")
    model = load_model(str(run / "best.keras"), compile=False)
    assert model_spec(model)["include_preprocessing"] is False
    assert "include_preprocessing" not in model.covid_keras_info
    sops, images = [], []
    for f in data.shard_files(str(data_dir), "train"):
        for raw in tf.data.TFRecordDataset(f, compression_type="GZIP"):
            r = schema.parse(raw.numpy())
            sops.append(r[schema.SOP_KEY].decode())
            images.append(data.decode_image(r[schema.IMAGE], SIZE).numpy())
    images = np.stack(images)
    want = _probs(model, _reference_input(images, "tiny"))
    # the check can fail: the same model on the raw pixel values answers otherwise
    assert np.abs(_probs(model, images.astype(np.float32)) - want).max() > 1e-3
    return run, data_dir, dict(zip(sops, images)), sops, want


def test_an_old_run_folder_evaluates_as_before(old_run, commands, tmp_path):
    run, data_dir, _, _, want = old_run
    out = tmp_path / "eval"
    proc = commands.run("covid_keras.evaluate", f"--run_dir={run}", f"--data_dir={data_dir}",
                        "--split=train", f"--output_dir={out}", "--bootstrap=0",
                        "--max_explained_patients=1", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["include_preprocessing"] is False
    with open(out / "slices.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = ["normal", "covid", "bacterial"]
    got = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-4)  # records in order, as the reference
    assert len(list((out / "explanations").glob("*.png"))) == 1  # Grad-CAM on its input


def test_an_old_run_folder_exports_and_predicts_as_before(old_run, commands, tmp_path):
    run, data_dir, by_sop, sops, want = old_run
    base = tmp_path / "exports"
    proc = commands.run("covid_keras.export", f"--run_dir={run}", f"--export_base={base}",
                        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = base / "drenet" / "1"
    info = json.loads((version / "assets.extra" / "covid_keras.json").read_text())
    assert info["include_preprocessing"] is False  # the serving graph normalises for it
    images = np.stack([by_sop[s] for s in sops]).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    called = commands.run_code(EXPORT_CALL, str(version), str(tmp_path / "images.npy"),
                               str(tmp_path / "probs.npy"), timeout=600)
    assert called.returncode == 0, called.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), want, atol=1e-4)

    # predict: a DICOM study of the dataset, through the export
    study = next((data_dir.parent / "studies" / "covid").iterdir())
    out = tmp_path / "predict"
    proc = commands.run("covid_keras.predict", f"--study={study}",
                        f"--model={base / 'drenet'}", f"--output_dir={out}",
                        f"--salt_file={data_dir.parent / 'salt.key'}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    answer = json.loads((out / "prediction.json").read_text())
    classes = answer["model"]["class_names"]
    row = {s: i for i, s in enumerate(sops)}
    slices = answer["slices"]
    assert len(slices) >= 3 and all(s["sop_key"] in row for s in slices)
    got = np.array([[s["probabilities"][c] for c in classes] for s in slices])
    np.testing.assert_allclose(got, want[[row[s["sop_key"]] for s in slices]], atol=1e-4)


class Killed(Exception):
    """The stand-in for a kill at the start of epoch 1 (after epoch 0's checkpoint)."""


def test_an_interrupted_old_run_resumes_without_the_layer(tiny_dataset, tmp_path,
                                                          monkeypatch):
    """A run the trainer started before the switch (its best.keras without the layer) and
    that was interrupted: resumed by the current trainer, it goes on with such a model and
    normalised input, so that best.keras, final.keras and the validation agree."""
    import keras

    from covid_keras.io import data
    from covid_keras.io.run_dir import RunDir
    from covid_keras.model import saving
    from covid_keras.training import callbacks as cbs
    from covid_keras.training import trainer

    data_dir = tiny_dataset(kinds=("normal", "covid", "bacterial"), patients_per_kind=3,
                            num_slices=20, matrix=64, seed=0,
                            flags=("--classes=normal,covid,bacterial",
                                   "--split_fractions=0.6,0.2,0.2", "--shard_size_mb=0.05"))
    cfg = trainer.TrainConfig(data_dir=str(data_dir), run_dir=str(tmp_path / "run"),
                              backbone="tiny", input_size=64, batch_size=2, epochs=2,
                              steps_per_epoch=3, learning_rate=0.01, lr_decay_epochs=(),
                              num_display_images=0, shuffle_buffer=64, verbose=0,
                              deterministic=False)

    class KillAtEpoch1(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise Killed()

    stage_callbacks, made = trainer.stage_callbacks, []

    def killed_in_epoch_1(*args):
        made.extend(stage_callbacks(*args) + [KillAtEpoch1()])
        return made

    with monkeypatch.context() as m:  # the trainer before the switch, killed in epoch 1
        m.setattr(trainer, "stage_callbacks", killed_in_epoch_1)
        m.setattr(trainer, "run_preprocessing", lambda cfg, run: False)
        keras.utils.set_random_seed(0)
        with pytest.raises(Killed):
            trainer.train(cfg)
    for cb in made:  # what a killed process's exit closes
        if isinstance(cb, keras.callbacks.CSVLogger) and cb.csv_file is not None:
            cb.csv_file.close()
    run = RunDir(cfg.run_dir)
    assert run.has("best.keras") and not run.is_finished()
    strip_include_preprocessing(Path(run.best_path))  # as that trainer saved it

    seen = {}
    finish_run = trainer.finish_run

    def spy(r, model, validation):
        seen.update(normalize=r.pipeline.normalize,
                    own=saving.model_spec(model)["include_preprocessing"])
        return finish_run(r, model, validation)

    monkeypatch.setattr(trainer, "finish_run", spy)
    keras.utils.set_random_seed(0)
    results = trainer.train(cfg)
    assert seen == {"normalize": True, "own": False}
    assert run.is_finished()
    for name in ("best.keras", "final.keras"):
        assert saving.model_spec(run.file(name))["include_preprocessing"] is False, name
    with open(run.log_path, newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]  # epoch 0 not redone
    # the validation the trainer reported is final.keras's on normalised input, and not
    # what it answers on the raw pixel values
    final = saving.load_model(run.final_path, compile=False)
    for normalize, same in ((True, True), (False, False)):
        ev = cbs.Evaluator(cfg.data_dir, "val", 2, data.PipelineConfig(
            input_size=64, backbone="tiny", normalize=normalize), 0)
        loss = cbs.validation_losses(final, ev.predict(final), ev.labels)["prediction_loss"]
        assert (abs(loss - results["final"]["prediction_loss"]) < 1e-4) is same, (
            normalize, loss, results["final"]["prediction_loss"])
    # and a new run in a fresh folder normalises its own input (stopped where it would
    # finish: its end is the resumed run's, tested above)
    def spy_and_stop(r, model, validation):
        seen.update(normalize=r.pipeline.normalize,
                    own=saving.model_spec(model)["include_preprocessing"])
        raise Killed()

    monkeypatch.setattr(trainer, "finish_run", spy_and_stop)
    fresh = cfg.replace(run_dir=str(tmp_path / "new"), epochs=1)
    keras.utils.set_random_seed(0)
    with pytest.raises(Killed):
        trainer.train(fresh)
    assert seen == {"normalize": False, "own": True}
    assert saving.model_spec(str(tmp_path / "new" / "best.keras"))["include_preprocessing"]
