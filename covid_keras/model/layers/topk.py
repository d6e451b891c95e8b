"""Top-K anchor selection by greedy NMS with a constant IoU matrix (pure Keras 3).

The anchors are fixed, so their IoU matrix is a constant and greedy NMS is a static K-step
loop over batched arrays: at each step take the best remaining anchor of every image
(argmax), then remove every anchor whose IoU with it exceeds the threshold. No Python loop
over the batch, no NumPy at run time, static shapes (XLA-friendly). If fewer than K anchors
survive suppression, the best unselected anchors fill the remaining places (K is static).

``groups`` gives K per anchor range: the paper selects 3 over all 245 anchors; the authors'
code selects 3 among the small anchors (levels 1-2) and 3 among the large (level 3).

Optionally (``min_overlap``, DRENet's ``navigator_anchors="lung"``) the layer also takes
each anchor's lung share (:class:`~covid_keras.model.layers.anchors.AnchorLungOverlap`) and
chooses only among the anchors whose share reaches ``min_overlap`` (the others score
-inf for the choice); see :func:`greedy_nms_topk` for the fallbacks.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from covid_keras.model.layers.anchors import anchor_boxes, check_coverage, iou_matrix

NEG = -1e9


def greedy_nms_topk(scores, iou, k: int, iou_threshold: float, allowed=None):
    """scores (B, A) float32, iou (A, A) constant -> indices (B, k) int32.

    ``allowed`` (B, A) bool, optional: the anchors that may be chosen (the others count as
    scoring -inf). An image with no allowed anchor may choose any (the model still answers
    on an all-black image or a failed mask); when fewer allowed anchors than ``k`` survive
    NMS, the best allowed ones that NMS removed come first, then the best of the others.
    ``allowed=None`` (or all true) is the unrestricted selection, bit for bit."""
    num = ops.shape(scores)[1]
    if allowed is None:
        available = ops.ones_like(scores, dtype="bool")
    else:
        allowed = ops.cast(allowed, "bool")
        allowed = ops.logical_or(allowed, ops.logical_not(ops.any(allowed, axis=1,
                                                                  keepdims=True)))
        available = allowed
    selected = ops.zeros_like(scores, dtype="bool")
    picks = []
    for _ in range(k):
        nms_ok = ops.any(available, axis=1, keepdims=True)
        # Prefer anchors NMS allows; when none is left, any not yet selected.
        rest = ops.logical_not(selected)
        if allowed is not None:  # allowed ones first
            allowed_rest = ops.logical_and(rest, allowed)
            rest = ops.where(ops.any(allowed_rest, axis=1, keepdims=True), allowed_rest, rest)
        pool = ops.where(nms_ok, available, rest)
        idx = ops.argmax(ops.where(pool, scores, NEG), axis=1)
        picks.append(idx)
        one_hot = ops.one_hot(idx, num, dtype="bool")
        selected = ops.logical_or(selected, one_hot)
        overlap = ops.take(iou, idx, axis=0)  # (B, A)
        available = ops.logical_and(available, overlap <= iou_threshold)
        available = ops.logical_and(available, ops.logical_not(selected))
    return ops.cast(ops.stack(picks, axis=1), "int32")


@keras.saving.register_keras_serializable(package="covid_keras")
class TopKNMS(keras.layers.Layer):
    """Anchor scores (B, A) -> dict of ``indices`` (B, K) int32, ``scores`` (B, K) and
    ``boxes`` (B, K, 4) float32 (input-image pixels).

    Args:
      input_size, levels: the anchor grid (see :class:`~covid_keras.model.layers.AnchorGrid`).
      groups: ``[(first_level, last_level_exclusive, k), ...]``; default: all levels, k=3.
      iou_threshold: suppress anchors whose IoU with a chosen one exceeds this (0.1).
      min_overlap: None (default): the layer takes the scores alone and chooses among all
        anchors. A number: it takes ``[scores, overlap]`` (overlap (B, A): each anchor's
        lung share, :class:`~covid_keras.model.layers.anchors.AnchorLungOverlap`) and
        chooses among the anchors with ``overlap >= min_overlap``, per group; a group
        where no anchor qualifies chooses among all of its anchors
        (:func:`greedy_nms_topk`). The returned scores are the anchors' own (never -inf).
    """

    def __init__(self, input_size: int, levels, groups=None, iou_threshold: float = 0.1,
                 min_overlap: float | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.input_size = int(input_size)
        self.levels = tuple((int(s), float(a)) for s, a in levels)
        self.groups = tuple(tuple(int(v) for v in g) for g in (groups or [(0, len(levels), 3)]))
        self.iou_threshold = float(iou_threshold)
        self.min_overlap = None if min_overlap is None else float(min_overlap)
        for lo, hi, k in self.groups:
            if not (0 <= lo < hi <= len(self.levels)) or k < 1:
                raise ValueError(f"Each group is (first_level, end_level, k) within "
                                 f"{len(self.levels)} levels, k >= 1. Received: {self.groups}")
        check_coverage(self.input_size, self.levels)
        self.boxes = anchor_boxes(self.input_size, self.levels)  # the AnchorGrid's boxes
        sizes = [len(anchor_boxes(self.input_size, [lv])) for lv in self.levels]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        self._ranges = [(int(starts[lo]), int(starts[hi]), k) for lo, hi, k in self.groups]
        for a, b, k in self._ranges:
            if b - a < k:
                raise ValueError(f"A group has {b - a} anchors, fewer than k={k}. "
                                 f"Received: input_size={input_size}, groups={self.groups}")
        self._ious = [iou_matrix(self.boxes[a:b]) for a, b, _ in self._ranges]

    @property
    def k(self) -> int:
        return sum(k for _, _, k in self._ranges)

    def call(self, inputs):
        allowed = None
        if self.min_overlap is None:
            scores = inputs
        else:
            scores, overlap = inputs
            # a hair below: an anchor exactly at the threshold (a float32 sum of pixel
            # areas) must not flip between backends on the last bit
            allowed = ops.cast(overlap, "float32") >= self.min_overlap - 1e-6
        scores = ops.cast(scores, "float32")
        indices = []
        for (a, b, k), iou in zip(self._ranges, self._ious):
            local = greedy_nms_topk(scores[:, a:b], ops.convert_to_tensor(iou), k,
                                    self.iou_threshold,
                                    None if allowed is None else allowed[:, a:b])
            indices.append(local + a)
        idx = ops.concatenate(indices, axis=1)
        idx = ops.stop_gradient(idx)
        picked = ops.take_along_axis(scores, idx, axis=1)
        boxes = ops.take(ops.convert_to_tensor(self.boxes), idx, axis=0)
        return {"indices": idx, "scores": picked, "boxes": ops.stop_gradient(boxes)}

    def compute_output_shape(self, input_shape):
        if self.min_overlap is not None:
            input_shape = input_shape[0]
        b = input_shape[0]
        return {"indices": (b, self.k), "scores": (b, self.k), "boxes": (b, self.k, 4)}

    def compute_output_spec(self, inputs):
        scores = inputs if self.min_overlap is None else inputs[0]
        b = scores.shape[0]
        return {"indices": keras.KerasTensor((b, self.k), dtype="int32"),
                "scores": keras.KerasTensor((b, self.k), dtype="float32"),
                "boxes": keras.KerasTensor((b, self.k, 4), dtype="float32")}

    def get_config(self):
        config = super().get_config()
        config.update({"input_size": self.input_size,
                       "levels": [list(v) for v in self.levels],
                       "groups": [list(g) for g in self.groups],
                       "iou_threshold": self.iou_threshold})
        if self.min_overlap is not None:  # absent: the unrestricted layer's config as before
            config["min_overlap"] = self.min_overlap
        return config
