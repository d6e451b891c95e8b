"""covid_keras.training.bn_stats: population batch-norm statistics (on the TF and JAX backends)."""

import keras
import numpy as np
import pytest

from covid_keras.model.drenet import build_drenet
from covid_keras.training.bn_stats import (
    batch_norm_layers,
    population_statistics,
    set_population_statistics,
)

pytestmark = pytest.mark.model


def _dense_bn_model(frozen_second: bool = False) -> keras.Model:
    inp = keras.Input((5,))
    h = keras.layers.Dense(4, name="d1")(inp)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(h)
    h = keras.layers.Dense(3, name="d2")(h)
    bn2 = keras.layers.BatchNormalization(momentum=0.9, name="bn2")
    bn2.trainable = not frozen_second
    return keras.Model(inp, bn2(h))


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v))


def test_statistics_are_the_pooled_ones_and_the_model_is_left_as_it_was():
    keras.utils.set_random_seed(0)
    model = _dense_bn_model()
    rng = np.random.default_rng(0)
    # batches with different means (an average of per-batch variances would be too small),
    # the last one partial (it weighs its 3 rows, not a quarter)
    batches = [rng.normal(loc=20.0 * k, size=(6 if k < 3 else 3, 5)).astype("float32")
               for k in range(4)]
    before = [_np(v) for v in model.non_trainable_variables]
    weights = [_np(v) for v in model.trainable_variables]
    stats, n = population_statistics(model, batches)
    assert n == 4 and [la.name for la, _, _ in stats] == ["bn1", "bn2"]
    for v, b in zip(model.non_trainable_variables, before):
        np.testing.assert_array_equal(_np(v), b)
    assert all(la.momentum == 0.9 for la in batch_norm_layers(model))
    # bn1's input is d1's output: its statistics over all 21 rows
    d1 = model.get_layer("d1")
    h = np.concatenate([_np(d1(b)) for b in batches])
    _, mean, var = stats[0]
    np.testing.assert_allclose(mean, h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, h.var(0), rtol=1e-3, atol=1e-5)
    assert var.mean() > 1.5 * np.mean([_np(d1(b)).var(0) for b in batches])
    assert set_population_statistics(model, batches) == 2
    np.testing.assert_allclose(_np(model.get_layer("bn1").moving_mean), h.mean(0), rtol=1e-4,
                               atol=1e-5)
    for v, w in zip(model.trainable_variables, weights):
        np.testing.assert_array_equal(_np(v), w)


def test_a_given_forward_runs_every_batch_but_the_first_with_the_same_statistics():
    """``forward`` (the trainer passes a compiled one) replaces the eager call for every
    batch after the first, which runs eagerly to count each batch norm's runs."""
    keras.utils.set_random_seed(0)
    model = _dense_bn_model()
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=5.0 * k, size=(4, 5)).astype("float32") for k in range(3)]
    eager, _ = population_statistics(model, batches)
    seen = []

    def forward(x):
        seen.append(x)
        return model(x, training=True)

    given, n = population_statistics(model, batches, forward=forward)
    assert n == 3 and [id(x) for x in seen] == [id(b) for b in batches[1:]]
    for (_, m1, v1), (_, m2, v2) in zip(eager, given):
        np.testing.assert_allclose(m2, m1, rtol=1e-6)
        np.testing.assert_allclose(v2, v1, rtol=1e-6)
    # a forward that does not run the model leaves only the first batch's statistics
    skipped, _ = population_statistics(model, batches, forward=lambda x: None)
    assert not np.allclose(skipped[0][1], eager[0][1])


def test_one_batch_makes_inference_equal_training_and_frozen_norms_are_kept():
    keras.utils.set_random_seed(1)
    model = _dense_bn_model(frozen_second=True)
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(16, 5)).astype("float32")
    frozen = [_np(v) for v in model.get_layer("bn2").non_trainable_variables]
    assert not np.allclose(_np(model(x, training=False)), _np(model(x, training=True)),
                           atol=1e-2)
    assert set_population_statistics(model, [x]) == 1
    np.testing.assert_allclose(_np(model(x, training=False)), _np(model(x, training=True)),
                               atol=1e-3)
    for v, f in zip(model.get_layer("bn2").non_trainable_variables, frozen):
        np.testing.assert_array_equal(_np(v), f)
    with pytest.raises(ValueError, match="at least one batch"):
        set_population_statistics(model, [])


def test_drenet_branches_each_get_their_own_statistics():
    """Every batch norm of DRENet (backbone, the crops' and generated image's branch views,
    the head) is set: on the batch they came from, inference = training mode."""
    keras.utils.set_random_seed(2)
    model = build_drenet(2, input_size=64, backbone="tiny", head_hidden_units=0)
    x = np.random.default_rng(2).uniform(-100, 150, size=(4, 64, 64, 3)).astype("float32")
    train = _np(model(x, training=True)["logits"])
    assert not np.allclose(_np(model(x, training=False)["logits"]), train, atol=1e-3)
    n = set_population_statistics(model, [x])
    assert n == len(batch_norm_layers(model)) > 3
    np.testing.assert_allclose(_np(model(x, training=False)["logits"]), train, atol=1e-3,
                               rtol=1e-3)


def test_a_batch_norm_shared_by_several_inputs_is_refused():
    """DRENet with branch_bn=False runs each backbone batch norm three times a pass (image,
    crops, generated image): population statistics would be the last input's alone."""
    keras.utils.set_random_seed(3)
    model = build_drenet(2, input_size=64, backbone="tiny", head_hidden_units=0,
                         branch_bn=False)
    x = np.random.default_rng(3).uniform(-100, 150, size=(2, 64, 64, 3)).astype("float32")
    before = [_np(v) for v in model.non_trainable_variables]
    with pytest.raises(ValueError, match=r"more than once per forward pass .*3 times"):
        set_population_statistics(model, [x])
    for v, b in zip(model.non_trainable_variables, before):  # left as it was
        np.testing.assert_array_equal(_np(v), b)
    # the count is undone: the same layers run normally afterwards
    assert all("call" not in vars(la) for la in batch_norm_layers(model))


def test_statistics_of_diverged_weights_are_refused():
    keras.utils.set_random_seed(4)
    model = _dense_bn_model()
    d1 = model.get_layer("d1")
    d1.kernel.assign(np.full(d1.kernel.shape, np.nan, "float32"))
    x = np.ones((4, 5), "float32")
    moving = _np(model.get_layer("bn1").moving_mean)
    with pytest.raises(ValueError, match=r"not finite in 2 of 2 batch norms \(first: 'bn1'\)"):
        set_population_statistics(model, [x])
    np.testing.assert_array_equal(_np(model.get_layer("bn1").moving_mean), moving)
