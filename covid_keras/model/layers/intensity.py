"""The model's input normalisation (pure Keras 3): the backbone's own preprocessing
(:class:`BackboneNormalization`, in a model built with ``include_preprocessing=True``, as
keras-hub's preprocessors and ``keras.applications``' ``include_preprocessing``) and the
optional per-image standardisation (``input_norm="per_image"``).

:func:`normalize_pixels` is the one formula of the backbone's normalisation: the layer
applies it with ``keras.ops``; the input pipeline (:func:`covid_keras.io.data.normalize`)
applies it with TensorFlow's NumPy API only for a model saved before the layer existed,
which expects normalised input.

Per-image intensity standardisation: the model's first layer with
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
import numpy as np
from keras import ops

from covid_keras.core.imaging import INPUT_NORMS

# The backbones' preprocessing (keras.applications'): caffe = RGB -> BGR minus the ImageNet
# mean (0-255 units); torch = (pixels / 255 - mean) / std; tf = pixels / 127.5 - 1.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("caffe", "torch", "tf")


def normalize_pixels(x, mode: str, xp=ops):
    """RGB pixel values 0..255 (float32, channels last) -> the backbone's input for
    ``mode`` (:data:`PREPROCESSING_MODES`). ``xp``: the array API that computes it
    (``keras.ops``; ``tf.experimental.numpy`` in a tf.data graph under any backend)."""
    if mode == "caffe":
        return xp.flip(x, axis=-1) - np.asarray(CAFFE_MEAN_BGR, np.float32)
    if mode == "torch":
        return (x / 255.0 - np.asarray(TORCH_MEAN, np.float32)) / np.asarray(TORCH_STD,
                                                                              np.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    raise ValueError(f"mode must be one of {PREPROCESSING_MODES}. Received: mode={mode!r}")


@keras.saving.register_keras_serializable(package="covid_keras")
class BackboneNormalization(keras.layers.Layer):
    """(B, H, W, 3) RGB pixel values 0..255 -> the backbone's input (:func:`normalize_pixels`
    for ``mode``): the first layer of a model built with ``include_preprocessing=True``,
    saved with it, so every caller (the input pipeline, the export graph, the JAX
    benchmark) feeds the raw pixel values."""

    def __init__(self, mode: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {PREPROCESSING_MODES}. Received: "
                             f"mode={mode!r}")
        self.mode = mode

    def call(self, images):
        return normalize_pixels(ops.cast(images, "float32"), self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def backbone_normalization(backbone: str, include_preprocessing: bool):
    """The :class:`BackboneNormalization` of ``backbone`` (``include_preprocessing``), else
    None (the model expects normalised input, as every model saved before the layer)."""
    from covid_keras.model.backbones import PREPROCESSING

    if not include_preprocessing:
        return None
    if backbone not in PREPROCESSING:
        raise ValueError(f"No preprocessing for backbone {backbone!r}. Known: "
                         f"{sorted(PREPROCESSING)}")
    return BackboneNormalization(PREPROCESSING[backbone], name="backbone_normalization")

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
    from covid_keras.model.backbones import PREPROCESSING

    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}. Received: "
                         f"input_norm={input_norm!r}")
    if input_norm == "none":
        return None
    return PerImageStandardization(SCALE_BY_PREPROCESSING[PREPROCESSING[backbone]],
                                   name="input_norm")
