"""The Keras internals fenced in covid_keras.model.keras_private exist and behave as used, on the
installed Keras; the test is pinned to the Keras version they were read from."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from covid_keras.model import keras_private

pytestmark = pytest.mark.model


def test_keras_version_is_the_one_the_internals_were_checked_against():
    installed = ".".join(keras.__version__.split(".")[:2])
    assert installed == keras_private.KERAS_CHECKED, (
        f"Keras {keras.__version__} is installed; covid_keras/model/keras_private.py was checked "
        f"against {keras_private.KERAS_CHECKED}: re-check each internal it uses, then "
        "update KERAS_CHECKED")


def test_backup_and_restore_has_the_private_members_we_override():
    cb = keras.callbacks.BackupAndRestore("/tmp/unused-backup-dir")
    for name in keras_private.BACKUP_PRIVATE_MEMBERS:
        assert hasattr(cb, name), name
    assert issubclass(keras_private.AtomicBackupAndRestore, keras.callbacks.BackupAndRestore)


def test_fit_starts_at_the_initial_epoch_a_callback_sets():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    seen = []

    class Restore(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            keras_private.set_initial_epoch(self.model, 2)

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    x = np.zeros((4, 2), np.float32)
    model.fit(x, x[:, :1], epochs=4, verbose=0, callbacks=[Restore()])
    assert seen == [2, 3]
    assert keras_private.initial_epoch(model, 0) == 2


def test_scale_loss_for_distribution_is_identity_without_a_strategy():
    assert float(keras_private.scale_loss_for_distribution(keras.ops.convert_to_tensor(
        3.0))) == pytest.approx(3.0)


def test_all_layers_reaches_layers_held_by_a_subclassed_layer():
    class Holder(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.norm = keras.layers.BatchNormalization(name="inner_bn")
            self.dense = keras.layers.Dense(2, name="inner_dense")

        def call(self, x):
            return self.dense(self.norm(x))

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Holder(name="holder")(keras.layers.Dense(3)(inputs)))
    names = [layer.name for layer in keras_private.all_layers(model)]
    assert "inner_bn" in names and "inner_dense" in names and "holder" in names
    assert len(names) == len(set(names))
    assert "inner_bn" not in [layer.name for layer in model.layers]


def test_swap_ema_weights_exchanges_the_weights_and_the_optimizers_averages():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5), "mse")
    x = np.ones((4, 2), np.float32)
    for _ in range(3):  # train_on_batch does not end on the average, as fit does
        model.train_on_batch(x, x[:, :1] * 3.0)
    numpy = keras.ops.convert_to_numpy
    average = [numpy(v) for v in model.optimizer._model_variables_moving_average]
    weights = [numpy(v) for v in model.trainable_variables]
    assert not np.allclose(average[0], weights[0])
    keras_private.swap_ema_weights(model)
    # Under TensorFlow Keras swaps by addition and subtraction (a += b; b = a - b;
    # a -= b): exact up to float32 rounding, one ulp at most.
    for v, a in zip(model.trainable_variables, average):
        np.testing.assert_allclose(numpy(v), a, rtol=1e-6)
    for v, w in zip(model.optimizer._model_variables_moving_average, weights):
        np.testing.assert_allclose(numpy(v), w, rtol=1e-6)
