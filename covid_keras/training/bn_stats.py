"""Population batch-norm statistics ("precise BN", Wu & Johnson 2021, arXiv:2105.07576).

A batch norm's moving statistics are an exponential average of the last few training
batches' statistics (momentum 0.9: about the last 10 batches of 8 augmented images), taken
while the weights were still moving. At evaluation they can sit far from the statistics
that the final weights produce, and differ from one epoch's end to the next by more than
the weights do. :func:`set_population_statistics` replaces them with the statistics of the
final weights over a set of batches (the training images): each batch norm's mean and
variance in training mode, pooled over the batches (the variance as E[x^2] - E[x]^2 over
all of them, not an average of per-batch variances).

Pure Keras 3: works on the TensorFlow and JAX backends.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np

from covid_keras.model.keras_private import all_layers


def batch_norm_layers(model: keras.layers.Layer) -> list:
    """Every ``BatchNormalization`` inside ``model`` that updates its statistics in
    training (trainable; a frozen one keeps its statistics)."""
    return [la for la in all_layers(model)
            if isinstance(la, keras.layers.BatchNormalization) and la.trainable]


def population_statistics(model: keras.Model, batches: Iterable,
                          forward=None) -> tuple[list, int]:
    """Training-mode statistics of ``model``'s batch norms over ``batches`` (model inputs).

    ``forward``: a compiled ``x -> model(x, training=True)`` (e.g. a ``tf.function``) for
    every batch after the first (which runs eagerly, to count each batch norm's runs); it
    must be traced while this function runs (the momenta are 0 here) or retraced per call.
    Default: ``model`` called eagerly.

    Returns ``([(layer, mean, variance), ...], number of batches)``; each batch weighs as
    many examples as it holds (a last partial batch counts for less). The model is left as it
    was: weights, moving statistics, momenta and every other non-trainable variable (e.g.
    random-seed states) are restored.

    Raises ValueError when a batch norm runs more than once per forward pass (one layer
    shared by several inputs, e.g. DRENet built with ``branch_bn=False``: each run would
    overwrite the last, and the statistics would be its last input's alone) or when the
    statistics are not finite (weights that diverged).
    """
    forward = forward or (lambda x: model(x, training=True))
    bns = batch_norm_layers(model)
    saved = [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.non_trainable_variables]
    momenta = [la.momentum for la in bns]
    sums = [[0.0, 0.0] for _ in bns]
    n, total = 0, 0
    try:
        for la in bns:
            la.momentum = 0.0  # each forward pass leaves exactly its batch's statistics
        for xb in batches:
            if n == 0:
                _check_one_run_each(model, bns, xb)
            else:
                forward(xb)
            size = int(keras.tree.flatten(xb)[0].shape[0])
            n, total = n + 1, total + size
            for acc, la in zip(sums, bns):
                m = keras.ops.convert_to_numpy(la.moving_mean).astype(np.float64)
                v = keras.ops.convert_to_numpy(la.moving_variance).astype(np.float64)
                acc[0] = acc[0] + size * m
                acc[1] = acc[1] + size * (v + m * m)
    finally:
        for la, mo in zip(bns, momenta):
            la.momentum = mo
        for v, val in zip(model.non_trainable_variables, saved):
            v.assign(val)
    if not n:
        return [], 0
    out = []
    for (s1, s2), la in zip(sums, bns):
        mean = s1 / total
        out.append((la, mean, np.maximum(s2 / total - mean * mean, 0.0)))
    bad = [la.name for la, mean, var in out
           if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)))]
    if bad:
        raise ValueError(f"population batch-norm statistics are not finite in {len(bad)} of "
                         f"{len(out)} batch norms (first: {bad[0]!r}): the weights have "
                         "diverged")
    return out, n


def _check_one_run_each(model: keras.Model, bns: list, xb) -> None:
    """Runs ``model`` on ``xb`` in training mode, counting each batch norm's runs (its
    ``call`` wrapped for this one pass); raises ValueError if one ran more than once."""
    runs = {id(la): 0 for la in bns}

    def counted(la):
        call = la.call

        def wrapper(*args, **kwargs):
            runs[id(la)] += 1
            return call(*args, **kwargs)
        return wrapper

    for la in bns:
        object.__setattr__(la, "call", counted(la))
    try:
        model(xb, training=True)
    finally:
        for la in bns:
            object.__delattr__(la, "call")
    shared = [(la.name, runs[id(la)]) for la in bns if runs[id(la)] > 1]
    if shared:
        raise ValueError(
            f"{len(shared)} batch norms run more than once per forward pass (first: "
            f"{shared[0][0]!r}, {shared[0][1]} times): one layer normalises several inputs "
            "(DRENet: build it with branch_bn=True), so population statistics would be its "
            "last input's alone")


def set_population_statistics(model: keras.Model, batches: Iterable, forward=None) -> int:
    """Sets every trainable batch norm's moving mean and variance to its training-mode
    statistics over ``batches`` (see the module; ``forward`` as there). Returns the number
    of batch norms set. Raises ValueError when ``batches`` is empty."""
    stats, n = population_statistics(model, batches, forward)
    if not n:
        raise ValueError("population batch-norm statistics need at least one batch")
    for la, mean, var in stats:
        la.moving_mean.assign(mean.astype(la.moving_mean.dtype))
        la.moving_variance.assign(var.astype(la.moving_variance.dtype))
    return len(stats)
