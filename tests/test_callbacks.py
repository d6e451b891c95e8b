"""Checkpoint choice, validation losses and the optimiser recipes (no training run)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from covid_keras.model.optimizers import build_optimizer
from covid_keras.training import recipes
from covid_keras.training.callbacks import BestCheckpoint, SwapEMA, head_health, validation_losses


def _feed(cb, rows):
    saved = []
    for epoch, row in enumerate(rows):
        before = cb.best_epoch
        cb.on_epoch_end(epoch, dict(row))
        saved.append(cb.best_epoch != before)
    return saved


def test_checkpoint_on_smoothed_patient_auc_by_default(tmp_path):
    """One lucky epoch of a noisy AUC does not win alone: the mean of the last three does,
    ties broken by the lower prediction loss."""
    cb = BestCheckpoint(str(tmp_path / "best.keras"), write=False)
    aucs = [0.60, 0.88, 0.17, 0.76, 0.78, 0.80, 0.70]
    losses = [0.9, 0.8, 0.8, 0.7, 0.6, 0.6, 0.5]
    logs = []
    for epoch, (a, loss) in enumerate(zip(aucs, losses)):
        row = {"val_patient_auc": a, "val_prediction_loss": loss}
        cb.on_epoch_end(epoch, row)
        logs.append(row["val_patient_auc_smoothed"])
    np.testing.assert_allclose(logs[:3], [0.60, 0.74, (0.60 + 0.88 + 0.17) / 3])
    assert cb.best_epoch == 6  # (0.76 + 0.78 + 0.80) / 3, not the window of the lone 0.88
    tie = BestCheckpoint(str(tmp_path / "b2.keras"), write=False)
    _feed(tie, [{"val_patient_auc": 0.8, "val_prediction_loss": 0.9},
                {"val_patient_auc": 0.8, "val_prediction_loss": 0.5}])
    assert tie.best_epoch == 2


def test_checkpoint_on_prediction_loss_ties_broken_by_patient_auc(tmp_path):
    cb = BestCheckpoint(str(tmp_path / "best.keras"), monitor="prediction_loss", write=False)
    rows = [{"val_prediction_loss": 0.60, "val_patient_auc": 0.90},
            {"val_prediction_loss": 0.55, "val_patient_auc": 0.70},
            {"val_prediction_loss": 0.55, "val_patient_auc": 0.80},  # tie: higher AUC wins
            {"val_prediction_loss": 0.55, "val_patient_auc": 0.80},  # full tie: the first
            {"val_prediction_loss": float("nan"), "val_patient_auc": 1.0}]
    assert _feed(cb, rows) == [True, True, True, False, False]
    assert cb.best_epoch == 3  # epochs on record are 1-based, as Keras prints them


def test_checkpoint_on_patient_auc_breaks_ties_by_lower_loss(tmp_path):
    """The old rule kept the first of equal AUCs (strict >): epoch 1 of ResNet-50 on
    COVID-CT, which called every held-out slice negative."""
    cb = BestCheckpoint(str(tmp_path / "best.keras"), monitor="patient_auc", write=False)
    rows = [{"val_prediction_loss": 0.90, "val_patient_auc": 0.88},
            {"val_prediction_loss": 0.50, "val_patient_auc": 0.88},
            {"val_prediction_loss": 0.40, "val_patient_auc": 0.80}]
    assert _feed(cb, rows) == [True, True, False]
    assert cb.best == 0.88 and cb.best_tie == 0.5 and cb.best_epoch == 2


def test_checkpoint_state_records_the_epoch_and_survives_a_resume(tmp_path):
    path = tmp_path / "best.keras"
    cb = BestCheckpoint(str(path), monitor="prediction_loss")
    cb.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    cb.on_epoch_end(0, {"val_prediction_loss": 0.7, "val_patient_auc": 0.6})
    cb.on_epoch_end(1, {"val_prediction_loss": 0.5, "val_patient_auc": 0.6})
    state = json.loads((tmp_path / "best.keras.json").read_text())
    assert state["epoch"] == 2 and state["monitor"] == "val_prediction_loss"
    assert state["best"] == 0.5 and state["tie_break"] == 0.6
    resumed = BestCheckpoint(str(path), monitor="prediction_loss")
    assert resumed.best == 0.5 and resumed.best_epoch == 2
    assert not resumed._better(0.6)
    with pytest.raises(ValueError, match="monitor must be one of"):
        BestCheckpoint(str(path), monitor="auc")


def test_validation_losses_match_the_training_loss_definition():
    from covid_keras import build_drenet

    keras.utils.set_random_seed(0)
    model = build_drenet(2, input_size=64, backbone="tiny")
    x = np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0])
    out = {k: np.asarray(v) for k, v in model(x, training=False).items()}
    got = validation_losses(model, out, y)
    expected = float(np.asarray(model.compute_loss(x, y, model(x, training=False))))
    assert got["loss"] == pytest.approx(expected, rel=1e-4)
    assert got["prediction_loss"] == pytest.approx(got["concat_loss"], rel=1e-6)
    logp = out["logits"] - np.log(np.exp(out["logits"]).sum(1, keepdims=True))
    assert got["prediction_loss"] == pytest.approx(-logp[np.arange(4), y].mean(), rel=1e-4)
    health = head_health(model, out)
    assert set(health) == {"logits_spread", "raw_logits_spread", "region_logits_spread"}


def test_coupled_weight_decay_is_pytorchs():
    """torch.optim.SGD(lr, momentum=0.9, weight_decay=wd): buf = 0.9 buf + (g + wd w);
    w -= lr buf. Zero gradients: only the decay acts, through the momentum."""
    lr, wd, w0 = 0.1, 0.01, 2.0
    v = keras.Variable(np.array([w0], np.float32))
    opt = recipes.make_optimizer("sgd", lr, momentum=0.9, weight_decay=wd)
    assert isinstance(opt, recipes.CoupledSGD)
    w, buf = w0, 0.0
    for _ in range(3):
        opt.apply([keras.ops.zeros((1,))], [v])
        buf = 0.9 * buf + wd * w
        w = w - lr * buf
    np.testing.assert_allclose(np.asarray(v), [w], rtol=1e-6)
    # Keras's decoupled decay of the same number is ~1/(1 - momentum) weaker in the long run
    d = keras.Variable(np.array([w0], np.float32))
    dec = recipes.make_optimizer("sgd", lr, momentum=0.9, weight_decay=wd,
                                 weight_decay_type="decoupled")
    for _ in range(3):
        dec.apply([keras.ops.zeros((1,))], [d])
    assert float(np.asarray(d)[0]) > float(np.asarray(v)[0])
    adam = recipes.make_optimizer("adam", 1e-3, weight_decay=wd)
    assert isinstance(adam, recipes.CoupledAdam) and adam.get_config()["coupled_decay"] == wd
    with pytest.raises(ValueError, match="weight_decay_type"):
        recipes.make_optimizer("sgd", lr, weight_decay_type="l2")


def test_ema_momentum_must_be_a_fraction():
    assert recipes.make_optimizer("adam", 1e-3, ema_momentum=0.99).use_ema
    assert not recipes.make_optimizer("adam", 1e-3).use_ema
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_momentum"):
            recipes.make_optimizer("sgd", 1e-3, ema_momentum=bad)


def test_swap_ema_pair_shows_the_average_and_training_follows_the_raw_weights():
    """One step per epoch. The callbacks between the two SwapEMA see the optimiser's moving
    average of the weights; those after them, and the next step, the raw weights: the
    raw trajectory is the one a run without the average takes. fit ends on the average."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype(np.float32)
    momentum, epochs = 0.6, 4

    def run(ema_momentum, callbacks):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(recipes.make_optimizer("sgd", 0.05, momentum=0.0, weight_decay=0.0,
                                             ema_momentum=ema_momentum), "mse")
        build_optimizer(model)
        model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=callbacks)
        return model

    def recorder(into):
        class Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                into.append([np.array(w) for w in self.model.get_weights()])
        return Record()

    seen, after, plain = [], [], []
    model = run(momentum, [SwapEMA(), recorder(seen), SwapEMA(), recorder(after)])
    run(0.0, [recorder(plain)])
    average = None
    for step in range(epochs):
        for a, p in zip(after[step], plain[step]):  # the raw weights: as without the EMA
            np.testing.assert_allclose(a, p, rtol=1e-5, atol=1e-6)
        average = (after[step] if average is None else
                   [momentum * m + (1 - momentum) * w for m, w in zip(average, after[step])])
        for s, m in zip(seen[step], average):
            np.testing.assert_allclose(s, m, rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen[-1][0], after[-1][0])  # the average is not the raw weights
    for w, m in zip(model.get_weights(), average):  # fit leaves the average in the model
        np.testing.assert_allclose(w, m, rtol=1e-5, atol=1e-6)


def test_a_model_saved_with_the_recipe_optimiser_reloads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from covid_keras import build_classifier

    model = build_classifier("tiny", 2, 32)
    model.compile(optimizer=recipes.make_optimizer("adam", 1e-3, weight_decay=1e-4),
                  loss={"logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    build_optimizer(model)
    model.fit(np.zeros((2, 32, 32, 3), np.float32), np.array([0, 1]), verbose=0)
    model.save(tmp_path / "m.keras")
    # the one loader registers the optimisers; the model code itself imports nothing from
    # training (issue 28: optimisers are registered where models are loaded)
    code = ("import sys, covid_keras.model.baselines, covid_keras.model.drenet; "
            "print('recipes' if 'covid_keras.training.recipes' in sys.modules else 'none'); "
            "from covid_keras.model import saving; m = saving.load_model(%r); "
            "print(type(m.optimizer).__name__, m.optimizer.coupled_decay)" % str(
                tmp_path / "m.keras"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["none", "CoupledAdam", "0.0001"]


def test_tensorboard_steps_are_the_consoles_epochs(tmp_path):
    """The console's "epoch 18" (and best.keras.json's epoch 18) is TensorBoard's step 18,
    for the per-epoch scalars and the chosen epoch's best/* alike."""
    import glob

    import tensorflow as tf

    from covid_keras.training.callbacks import GroupedTensorBoard, PatientValidation, close_writers

    tb = GroupedTensorBoard(str(tmp_path))
    tb.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    for epoch in range(3):  # Keras's 0-based epochs: the console prints epoch 1, 2, 3
        tb.on_epoch_end(epoch, {"loss": 1.0, "val_patient_auc": 0.5})
    PatientValidation(None, ["normal", "covid"], str(tmp_path)).write_best(
        {"patient_auc": 0.9}, 2)  # train.py: metrics.json's best_epoch (1-based)
    close_writers()
    steps: dict = {}
    for path in glob.glob(str(tmp_path / "*" / "events.out.*")):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(int(event.step))
    assert sorted(steps["loss/total"]) == [1, 2, 3]
    assert sorted(steps["val/patient_auc"]) == [1, 2, 3]
    assert steps["best/patient_auc"] == [2]
