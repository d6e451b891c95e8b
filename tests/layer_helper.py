"""The one shared check every custom layer goes through (DESIGN convention 3)."""

from __future__ import annotations

import keras
import numpy as np
from keras import tree


def _to_numpy(x):
    return tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)


def run_layer_test(tmp_path, layer_cls, init_kwargs: dict, inputs, expected_output_shape,
                   expected_trainable_weights: int, expected_non_trainable_weights: int = 0):
    """Output shapes, weight counts, get_config round trip, `.keras` save -> reload -> the
    same outputs. ``inputs``: an array or a list of arrays; ``expected_output_shape``: a
    shape tuple or a dict of them (for dict outputs). Returns the layer's outputs."""
    layer = layer_cls(**init_kwargs)
    outputs = layer(inputs)
    shapes = tree.map_structure(lambda t: tuple(t.shape), outputs)
    if isinstance(expected_output_shape, dict):
        assert shapes == expected_output_shape, shapes
    else:
        assert shapes == tuple(expected_output_shape), shapes
    symbolic_in = tree.map_structure(lambda a: keras.Input(a.shape[1:], batch_size=a.shape[0],
                                                           dtype=str(a.dtype)), inputs)
    symbolic_out = layer(symbolic_in)
    sym_shapes = tree.map_structure(lambda t: tuple(t.shape), symbolic_out)
    assert sym_shapes == shapes, (sym_shapes, shapes)
    assert len(layer.trainable_weights) == expected_trainable_weights
    assert len(layer.non_trainable_weights) == expected_non_trainable_weights

    config = layer.get_config()
    for key, value in init_kwargs.items():
        got = config[key]
        if isinstance(value, (tuple, list)):
            assert np.array_equal(np.asarray(got, dtype=object), np.asarray(value, dtype=object)) \
                or [list(v) if isinstance(v, (tuple, list)) else v for v in value] == got, key
        else:
            assert got == value, (key, got, value)
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config

    model = keras.Model(symbolic_in, symbolic_out)
    path = str(tmp_path / f"{layer_cls.__name__}.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    expected = _to_numpy(model(inputs))
    got = _to_numpy(reloaded(inputs))
    tree.map_structure(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), expected, got)
    return _to_numpy(outputs)
