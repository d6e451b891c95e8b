"""Per-image intensity standardisation (pure Keras 3): the model's first layer with
``input_norm="per_image"``.

Each image is shifted and scaled to zero mean and a fixed spread over all its pixels and
channels: ``(x - mean(x)) / max(std(x), eps) * scale``. The backbone's own preprocessing
(caffe, torch or [-1, 1]) is affine in the pixel values, so the model's output no longer
depends on an image's overall brightness or contrast (``a * pixels + b``, a > 0), only on
its pattern. Why: on COVID-CT the global brightness separates the classes on the train
split (AUC 0.68) but not on the held-out one (0.50); models trained on raw intensities
ranked held-out patients backwards, and rescaling the held-out images by 0.8 changed their
AUC from 0.25 to 0.71 (bench/README.md). ``scale`` keeps the spread the backbone's
preprocessing gives a typical image (:data:`SCALE_BY_PREPROCESSING`), so ImageNet weights
still see inputs of the range they were trained on.
"""

from __future__ import annotations

import keras
from keras import ops

from covid_keras.imaging import INPUT_NORMS

# Spread of a preprocessed image: caffe = pixels - mean (0-255 units; ImageNet's pixel sd is
# about 58-64), torch = (pixels / 255 - mean) / std (sd about 1), tf = pixels / 127.5 - 1.
SCALE_BY_PREPROCESSING = {"caffe": 64.0, "torch": 1.0, "tf": 0.5}


@keras.saving.register_keras_serializable(package="covid_keras")
class PerImageStandardization(keras.layers.Layer):
    """(B, H, W, C) -> same shape: each image to mean 0 and standard deviation ``scale``.

    A constant image (std below ``epsilon``, in the input's units) becomes all zeros.
    """

    def __init__(self, scale: float = 1.0, epsilon: float = 1e-3, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"scale must be > 0. Received: scale={scale}")
        self.scale = float(scale)
        self.epsilon = float(epsilon)

    def call(self, images):
        x = ops.cast(images, "float32")
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        std = ops.sqrt(ops.mean(ops.square(x - mean), axis=(1, 2, 3), keepdims=True))
        return (x - mean) / ops.maximum(std, self.epsilon) * self.scale

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "epsilon": self.epsilon}


def input_normalization(input_norm: str, backbone: str):
    """The layer for ``input_norm`` ("none": None) in front of ``backbone``."""
    from covid_keras.backbones import PREPROCESSING

    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}. Received: "
                         f"input_norm={input_norm!r}")
    if input_norm == "none":
        return None
    return PerImageStandardization(SCALE_BY_PREPROCESSING[PREPROCESSING[backbone]],
                                   name="input_norm")
