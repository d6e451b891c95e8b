"""Region crop-and-resize: bilinear, batched, gradient stopped (pure Keras 3).

Each box (y0, x0, y1, x1), in input-image pixels, is sampled on a ``size`` x ``size`` grid
whose corners are the centres of the box's first and last pixels (the authors' bilinear
``F.interpolate(..., align_corners=True)`` of the integer crop ``x[y0:y1, x0:x1]``). Pixels
outside the image read as zero (the authors pad the image with 224 zeros). Four gathers
over the flattened image do it for every image and box at once; the crops carry no gradient
(as in the paper and the code: the region branch learns from the crop contents, not their
place).
"""

from __future__ import annotations

import keras
from keras import ops


def crop_and_resize(image, boxes, size: int):
    """image (B, H, W, C), boxes (B, K, 4) float32 -> (B, K, size, size, C) in image dtype."""
    shape = ops.shape(image)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    k = ops.shape(boxes)[1]
    boxes = ops.cast(boxes, "float32")
    t = ops.arange(size, dtype="float32") / float(max(size - 1, 1))  # (S,)
    y0, x0, y1, x1 = (boxes[..., i:i + 1] for i in range(4))  # (B, K, 1)
    ys = y0 + t * (y1 - y0 - 1.0)  # (B, K, S) pixel-centre coordinates
    xs = x0 + t * (x1 - x0 - 1.0)

    yf, xf = ops.floor(ys), ops.floor(xs)
    wy, wx = ys - yf, xs - xf
    yi, xi = ops.cast(yf, "int32"), ops.cast(xf, "int32")
    h = ops.cast(height, "int32")
    w = ops.cast(width, "int32")
    flat = ops.reshape(image, (batch, -1, channels))
    out = None
    for dy, wy_ in ((0, 1.0 - wy), (1, wy)):
        for dx, wx_ in ((0, 1.0 - wx), (1, wx)):
            yy = yi + dy  # (B, K, S)
            xx = xi + dx
            vy = ops.cast((yy >= 0) & (yy < h), "float32")
            vx = ops.cast((xx >= 0) & (xx < w), "float32")
            yy = ops.clip(yy, 0, h - 1)
            xx = ops.clip(xx, 0, w - 1)
            # (B, K, S, S) flat indices and weights (rows from y, columns from x).
            idx = yy[..., :, None] * w + xx[..., None, :]
            weight = (wy_ * vy)[..., :, None] * (wx_ * vx)[..., None, :]
            idx = ops.reshape(idx, (batch, -1, 1))
            vals = ops.take_along_axis(flat, ops.broadcast_to(idx, (batch, ops.shape(idx)[1],
                                                                    channels)), axis=1)
            vals = ops.reshape(vals, (batch, k, size, size, channels))
            term = ops.cast(vals, "float32") * weight[..., None]
            out = term if out is None else out + term
    return ops.cast(out, image.dtype)


@keras.saving.register_keras_serializable(package="covid_keras")
class RegionCrop(keras.layers.Layer):
    """[image (B, H, W, C), boxes (B, K, 4)] -> crops (B, K, size, size, C), no gradient.

    Args:
      size: output crop side in pixels (224 at a 448 px input).
    """

    def __init__(self, size: int, **kwargs):
        super().__init__(**kwargs)
        if int(size) < 2:
            raise ValueError(f"size must be >= 2. Received: size={size}")
        self.size = int(size)

    def call(self, inputs):
        image, boxes = inputs
        return ops.stop_gradient(crop_and_resize(image, ops.stop_gradient(boxes), self.size))

    def compute_output_shape(self, input_shape):
        image_shape, boxes_shape = input_shape
        return (image_shape[0], boxes_shape[1], self.size, self.size, image_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update({"size": self.size})
        return config
