"""The proposal (navigator) head: one informativeness score per anchor (pure Keras 3).

On the backbone's conv5 map (14 x 14 x 2048 at 448 px), gradient stopped as in the paper
and the authors' code (the navigator learns only from the ranking loss):
Conv3x3 128 s1 + ReLU (level 1, 14 x 14) -> Conv3x3 128 s2 + ReLU (level 2, 7 x 7)
[-> Conv3x3 128 s2 + ReLU (level 3, 4 x 4): the authors' code]; on each level a 1x1 conv
gives one score per cell. Scores are concatenated level by level, row-major, in the order
of :func:`covid_keras.model.layers.anchors.anchor_boxes`.

The anchor layout is the same at every input size (14x14, 7x7 [, 4x4] cells): when conv5 is
not ``grid_size`` cells wide (a 128 px input gives 4x4), it is resized (bilinear) to
``grid_size`` first, so each anchor has a score of its own.
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
      grid_size: cells per side of the first level (14, the 448 px conv5); None keeps
        conv5's own size.
    """

    def __init__(self, num_levels: int = 2, filters: int = 128, grid_size: int | None = 14,
                 **kwargs):
        super().__init__(**kwargs)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1. Received: num_levels={num_levels}")
        if grid_size is not None and int(grid_size) < 1:
            raise ValueError(f"grid_size must be >= 1 or None. Received: grid_size={grid_size}")
        self.num_levels = int(num_levels)
        self.filters = int(filters)
        self.grid_size = None if grid_size is None else int(grid_size)
        self.down = [
            layers.Conv2D(self.filters, 3, strides=1 if i == 0 else 2, padding="same",
                          activation="relu", name=f"down{i + 1}", dtype=self.dtype_policy)
            for i in range(self.num_levels)
        ]
        self.tidy = [layers.Conv2D(1, 1, name=f"tidy{i + 1}", dtype=self.dtype_policy)
                     for i in range(self.num_levels)]

    def _grid_shape(self, input_shape):
        shape = tuple(input_shape)
        if self.grid_size is not None:
            shape = (shape[0], self.grid_size, self.grid_size) + shape[3:]
        return shape

    def build(self, input_shape):
        shape = self._grid_shape(input_shape)
        for down, tidy in zip(self.down, self.tidy):
            down.build(shape)
            shape = down.compute_output_shape(shape)
            tidy.build(shape)

    def call(self, features):
        x = ops.stop_gradient(features)
        g = self.grid_size
        if g is not None and (x.shape[1] != g or x.shape[2] != g):
            x = ops.image.resize(x, (g, g), interpolation="bilinear")
        scores = []
        for down, tidy in zip(self.down, self.tidy):
            x = down(x)
            s = tidy(x)
            scores.append(ops.reshape(s, (ops.shape(s)[0], -1)))
        return ops.cast(ops.concatenate(scores, axis=1), "float32")

    def compute_output_shape(self, input_shape):
        h, w = self._grid_shape(input_shape)[1:3]
        if h is None or w is None:
            return (input_shape[0], None)
        total = 0
        for i in range(self.num_levels):
            if i > 0:
                h, w = (h + 1) // 2, (w + 1) // 2
            total += h * w
        return (input_shape[0], total)

    def get_config(self):
        config = super().get_config()
        config.update({"num_levels": self.num_levels, "filters": self.filters,
                       "grid_size": self.grid_size})
        return config
