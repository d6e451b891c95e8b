"""The anchor grid: one square anchor per feature-map cell, per level (pure Keras 3).

The paper: 48 px anchors on the 14x14 map (stride 32) and 96 px on the 7x7 map (stride 64)
of a 448 px input - 245 anchors; the authors' code adds 192 px at stride 128 (4x4, 16
anchors). Sizes AND strides are given for a 448 px input and scale together with
``input_size``: every input size gets the same layout, shrunk (a 128 px model has 245
anchors of 13.7 and 27.4 px at strides 9.1 and 18.3, tiling its image as 448 px does; the
proposal head reads a 14x14 map, resized from the backbone's conv5 when that is smaller).
With the backbone's own strides at 128 px there would be 20 anchors covering 30 % of the
image: measured, it starves the navigator. A layout that leaves most of the image outside
every anchor is refused (:func:`check_coverage`). Boxes are ``(y0, x0, y1, x1)`` in
input-image pixels and may extend past the image: crops read zeros there (the authors pad
the image by 224 px).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

REFERENCE_SIZE = 448
PAPER_LEVELS = ((32, 48.0), (64, 96.0))  # (stride, anchor size), both at 448 px
CODE_LEVELS = ((32, 48.0), (64, 96.0), (128, 192.0))
MIN_COVERAGE = 0.5  # of the image inside at least one anchor


def level_grid(stride_at_448: int) -> int:
    """Cells per side of a level (14, 7, 4 for strides 32, 64, 128): the same at any size."""
    return math.ceil(REFERENCE_SIZE / stride_at_448)


def anchor_boxes(input_size: int, levels) -> np.ndarray:
    """(A, 4) float32 boxes (y0, x0, y1, x1), level by level, row-major within a level."""
    boxes = []
    scale = input_size / REFERENCE_SIZE
    for stride_at_448, size_at_448 in levels:
        n = level_grid(stride_at_448)
        size = size_at_448 * scale
        # Centres of the cells of the level's n x n map over the input.
        centres = (np.arange(n, dtype=np.float64) + 0.5) * stride_at_448 * scale
        cy, cx = np.meshgrid(centres, centres, indexing="ij")
        half = size / 2.0
        level = np.stack([cy - half, cx - half, cy + half, cx + half], axis=-1).reshape(-1, 4)
        boxes.append(level)
    return np.concatenate(boxes, axis=0).astype(np.float32)


def coverage(input_size: int, levels) -> float:
    """Share of the image's pixels inside at least one anchor of ``levels``."""
    covered = np.zeros((input_size, input_size), bool)
    for y0, x0, y1, x1 in anchor_boxes(input_size, levels):
        covered[max(int(np.floor(y0)), 0):max(int(np.ceil(y1)), 0),
                max(int(np.floor(x0)), 0):max(int(np.ceil(x1)), 0)] = True
    return float(covered.mean())


def check_coverage(input_size: int, levels) -> None:
    """Refuses an anchor layout that leaves most of the image outside every anchor."""
    share = coverage(input_size, levels)
    if share < MIN_COVERAGE:
        raise ValueError(f"The anchors cover {share:.0%} of a {input_size} px image (at least "
                         f"{MIN_COVERAGE:.0%} needed): the navigator could never pick most "
                         f"of it. Received: input_size={input_size}, levels={list(levels)}")


def iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """(A, A) IoU of every pair of boxes (float32)."""
    y0, x0, y1, x1 = (boxes[:, i][:, None] for i in range(4))
    iy = np.clip(np.minimum(y1, y1.T) - np.maximum(y0, y0.T), 0, None)
    ix = np.clip(np.minimum(x1, x1.T) - np.maximum(x0, x0.T), 0, None)
    inter = iy * ix
    area = (y1 - y0) * (x1 - x0)
    return (inter / (area + area.T - inter)).astype(np.float32)


def _grid(input_size, levels) -> tuple[int, tuple]:
    """A layer's anchor grid arguments, checked and normalised."""
    if int(input_size) <= 0:
        raise ValueError(f"input_size must be positive. Received: input_size={input_size}")
    return int(input_size), tuple((int(s), float(a)) for s, a in levels)


@keras.saving.register_keras_serializable(package="covid_keras")
class AnchorGrid(keras.layers.Layer):
    """Returns the anchors tiled over the batch: any input (B, ...) -> (B, A, 4) float32.

    Args:
      input_size: the model's square input size in pixels.
      levels: ``[(stride, anchor_size_at_448), ...]``.
    """

    def __init__(self, input_size: int, levels=PAPER_LEVELS, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.input_size, self.levels = _grid(input_size, levels)
        check_coverage(self.input_size, self.levels)
        self.boxes = anchor_boxes(self.input_size, self.levels)

    @property
    def num_anchors(self) -> int:
        return int(self.boxes.shape[0])

    def call(self, x):
        boxes = ops.convert_to_tensor(self.boxes, dtype="float32")
        batch = ops.shape(x)[0]
        return ops.broadcast_to(boxes[None], (batch, self.num_anchors, 4))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_anchors, 4)

    def get_config(self):
        config = super().get_config()
        config.update({"input_size": self.input_size,
                       "levels": [list(level) for level in self.levels]})
        return config


def _pixel_overlaps(lo: np.ndarray, hi: np.ndarray, size: int) -> np.ndarray:
    """(A,) intervals [lo, hi) -> (A, size): the length of each inside pixel [p, p + 1)."""
    p = np.arange(size, dtype=np.float64)[None]
    return np.clip(np.minimum(hi[:, None], p + 1.0) - np.maximum(lo[:, None], p), 0.0, 1.0)


@keras.saving.register_keras_serializable(package="covid_keras")
class AnchorLungOverlap(keras.layers.Layer):
    """A lung mask (B, S, S[, 1]), values 0..1 (1 = lung), at the model's input size ->
    (B, A) float32: the share of each anchor's area inside the image that is lung (the
    mask's mean over the anchor), in the order of :func:`anchor_boxes`.

    Exact at the pixel level and at every input size, with no resizing: an anchor is a
    rectangle, so its sum is separable, ``sum_y Ry[a, y] sum_x mask[y, x] Rx[a, x]`` with
    ``Ry`` / ``Rx`` the constant (A, S) overlaps of its rows / columns with each pixel
    (two einsums; about 49 M multiply-adds per 448 px image, next to ResNet-50's 4 G).

    Args:
      input_size, levels: the anchor grid (see :class:`AnchorGrid`).
    """

    def __init__(self, input_size: int, levels=PAPER_LEVELS, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.input_size, self.levels = _grid(input_size, levels)
        boxes = anchor_boxes(self.input_size, self.levels).astype(np.float64)
        ry = _pixel_overlaps(boxes[:, 0], boxes[:, 2], self.input_size)
        rx = _pixel_overlaps(boxes[:, 1], boxes[:, 3], self.input_size)
        area = np.maximum(ry.sum(1) * rx.sum(1), 1e-6)  # the part inside the image
        self._ry = (ry / area[:, None]).astype(np.float32)  # the mean, not the sum
        self._rx = rx.astype(np.float32)

    @property
    def num_anchors(self) -> int:
        return int(self._rx.shape[0])

    def call(self, inputs):
        m = ops.cast(inputs, "float32")
        if len(m.shape) == 4:
            m = m[..., 0]
        rows = ops.einsum("byx,ax->bay", m, ops.convert_to_tensor(self._rx))  # (B, A, S)
        return ops.sum(rows * ops.convert_to_tensor(self._ry)[None], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_anchors)

    def get_config(self):
        config = super().get_config()
        config.update({"input_size": self.input_size,
                       "levels": [list(level) for level in self.levels]})
        return config
