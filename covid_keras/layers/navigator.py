"""The proposal (navigator) head: one informativeness score per anchor (pure Keras 3).

On the backbone's conv5 map (14 x 14 x 2048 at 448 px), gradient stopped as in the paper
and the authors' code (the navigator learns only from the ranking loss):
Conv3x3 128 s1 + ReLU (level 1, 14 x 14) -> Conv3x3 128 s2 + ReLU (level 2, 7 x 7)
[-> Conv3x3 128 s2 + ReLU (level 3, 4 x 4): the authors' code]; on each level a 1x1 conv
gives one score per cell. Scores are concatenated level by level, row-major, in the order
of :func:`covid_keras.layers.anchors.anchor_boxes`.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="covid_keras")
class ProposalHead(keras.layers.Layer):
    """conv5 features (B, h, w, C) -> anchor scores (B, A), float32.

    Args:
      num_levels: 2 (paper) or 3 (authors' code).
      filters: channels of the down convolutions (128).
    """

    def __init__(self, num_levels: int = 2, filters: int = 128, **kwargs):
        super().__init__(**kwargs)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1. Received: num_levels={num_levels}")
        self.num_levels = int(num_levels)
        self.filters = int(filters)
        self.down = [
            layers.Conv2D(self.filters, 3, strides=1 if i == 0 else 2, padding="same",
                          activation="relu", name=f"down{i + 1}", dtype=self.dtype_policy)
            for i in range(self.num_levels)
        ]
        self.tidy = [layers.Conv2D(1, 1, name=f"tidy{i + 1}", dtype=self.dtype_policy)
                     for i in range(self.num_levels)]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for down, tidy in zip(self.down, self.tidy):
            down.build(shape)
            shape = down.compute_output_shape(shape)
            tidy.build(shape)

    def call(self, features):
        x = ops.stop_gradient(features)
        scores = []
        for down, tidy in zip(self.down, self.tidy):
            x = down(x)
            s = tidy(x)
            scores.append(ops.reshape(s, (ops.shape(s)[0], -1)))
        return ops.cast(ops.concatenate(scores, axis=1), "float32")

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        total = 0
        for i in range(self.num_levels):
            if i > 0:
                h, w = (h + 1) // 2, (w + 1) // 2
            total += h * w
        return (input_shape[0], total)

    def get_config(self):
        config = super().get_config()
        config.update({"num_levels": self.num_levels, "filters": self.filters})
        return config
