"""The generated image (pure Keras 3).

Paper: the image times a confidence map, each top-K box filled with its normalised score
and zero elsewhere (overlaps take the larger value); the shared backbone reads it as a third
view. Normalised score: ``exp(s_k - max_j s_j)``, so the most informative box keeps the
image unchanged and the others are dimmed by how much less informative they are.

Authors' code (``variant="code"``): the "zoom" image, the top large box clipped to the image
and resized to the input size.
"""

from __future__ import annotations

import keras
from keras import ops

from covid_keras.model.layers.crop import crop_and_resize


def normalised_scores(scores):
    """(B, K) navigator scores -> (B, K) in (0, 1], 1 for the best box."""
    scores = ops.cast(scores, "float32")
    return ops.exp(scores - ops.max(scores, axis=1, keepdims=True))


def confidence_map(boxes, weights, height: int, width: int):
    """(B, K, 4) boxes and (B, K) weights -> (B, H, W) map, zero outside every box."""
    ys = ops.arange(height, dtype="float32") + 0.5  # pixel centres
    xs = ops.arange(width, dtype="float32") + 0.5
    y0, x0, y1, x1 = (boxes[..., i][..., None] for i in range(4))  # (B, K, 1)
    in_y = ops.cast((ys >= y0) & (ys < y1), "float32")  # (B, K, H)
    in_x = ops.cast((xs >= x0) & (xs < x1), "float32")  # (B, K, W)
    inside = in_y[..., :, None] * in_x[..., None, :]  # (B, K, H, W)
    return ops.max(inside * weights[..., None, None], axis=1)


@keras.saving.register_keras_serializable(package="covid_keras")
class ConfidenceMapImage(keras.layers.Layer):
    """[image (B, H, W, C), boxes (B, K, 4), scores (B, K)] -> image x confidence map."""

    def call(self, inputs):
        image, boxes, scores = inputs
        boxes = ops.stop_gradient(ops.cast(boxes, "float32"))
        weights = ops.stop_gradient(normalised_scores(scores))
        shape = ops.shape(image)
        m = confidence_map(boxes, weights, shape[1], shape[2])
        return image * ops.cast(m[..., None], image.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@keras.saving.register_keras_serializable(package="covid_keras")
class ZoomImage(keras.layers.Layer):
    """[image (B, H, W, C), boxes (B, K, 4)] -> box ``box_index`` clipped to the image and
    resized to H x W (the authors' code: the top large box)."""

    def __init__(self, box_index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.box_index = int(box_index)

    def call(self, inputs):
        image, boxes = inputs
        shape = ops.shape(image)
        h, w = shape[1], shape[2]
        box = ops.cast(boxes[:, self.box_index:self.box_index + 1], "float32")
        limits = ops.cast(ops.stack([0, 0, h, w]), "float32")
        lo = ops.cast(ops.stack([0, 0, 0, 0]), "float32")
        box = ops.stop_gradient(ops.minimum(ops.maximum(box, lo), limits))
        size = image.shape[1]
        if size is None or image.shape[2] != size:
            raise ValueError(f"ZoomImage needs a static square input. Received: {image.shape}")
        return ops.stop_gradient(crop_and_resize(image, box, size)[:, 0])

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update({"box_index": self.box_index})
        return config
