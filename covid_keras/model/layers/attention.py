"""Attention over the K region features: their importance (pure Keras 3).

The paper couples "an attention module to learn the importance" of the top-K details (after
Fu et al.'s RA-CNN) before the MLP head. Here: a relation step (each region attends to the
others with single-head scaled dot-product attention, residual), then an importance weight
per region, ``softmax_k(v . tanh(W f_k))``, which rescales the regions (times K, so equal
weights leave them unchanged). The weights are returned too, for the evidence view.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="covid_keras")
class RegionAttention(keras.layers.Layer):
    """(B, K, D) region features -> dict ``features`` (B, K, D), ``weights`` (B, K).

    Args:
      units: width of the attention's hidden projections.
    """

    def __init__(self, units: int = 256, **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"units must be >= 1. Received: units={units}")
        self.units = int(units)
        self.query = layers.Dense(self.units, use_bias=False, name="query",
                                  dtype=self.dtype_policy)
        self.key = layers.Dense(self.units, use_bias=False, name="key", dtype=self.dtype_policy)
        self.hidden = layers.Dense(self.units, activation="tanh", name="hidden",
                                   dtype=self.dtype_policy)
        self.score = layers.Dense(1, use_bias=False, name="score", dtype=self.dtype_policy)

    def build(self, input_shape):
        for layer in (self.query, self.key, self.hidden):
            layer.build(input_shape)
        self.score.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, x):
        q, k = self.query(x), self.key(x)
        logits = ops.matmul(q, ops.transpose(k, (0, 2, 1))) / float(self.units) ** 0.5
        relation = ops.matmul(ops.softmax(ops.cast(logits, "float32"), axis=-1),
                              ops.cast(x, "float32"))
        related = x + ops.cast(relation, x.dtype)
        importance = ops.squeeze(self.score(self.hidden(related)), axis=-1)
        weights = ops.softmax(ops.cast(importance, "float32"), axis=-1)  # (B, K)
        k_regions = ops.cast(ops.shape(x)[1], "float32")
        scaled = related * ops.cast(weights[..., None] * k_regions, x.dtype)
        return {"features": scaled, "weights": weights}

    def compute_output_shape(self, input_shape):
        return {"features": tuple(input_shape), "weights": tuple(input_shape[:2])}

    def compute_output_spec(self, x):
        return {"features": keras.KerasTensor(x.shape, dtype=x.dtype),
                "weights": keras.KerasTensor(x.shape[:2], dtype="float32")}

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units})
        return config
