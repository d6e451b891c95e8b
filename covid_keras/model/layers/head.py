"""The MLP head over the concatenated features (pure Keras 3).

[BatchNorm] + Dense(hidden) + ReLU + Dropout + Dense(classes), logits in float32 (mixed
precision safe). ``hidden_units=0`` is the authors' code: a single Dense. Dropout is a Keras
layer, so it is off at inference (the authors' code creates dropout inside ``forward()``,
where it stays on).

Why the input is normalised (``normalize=True``, the default): the concatenated features
(global, K regions, generated image: 10240 ReLU-pooled values for ResNet-50) are all
non-negative, and their per-feature offsets are far larger than how they vary between
images (measured at init: mean 0.99, spread across images 0.55; after a few Adam steps
0.3 against 0.05). A gradient step then moves every example's pre-activation the same way,
by about lr x the sum of the inputs (Adam: ~1e-4 x 10240 ~ 1 per step): hidden units swing
below zero for every image and die (98 % on COVID-CT), and the logits swing around the
class prior (concat loss stuck at or above ln 2) while the 2048-wide global branch, five
times narrower, still learns. Centring each feature over the batch (and scaling it) makes
the updates depend on the image. The moving statistics (momentum 0.9) serve inference.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="covid_keras")
class MLPHead(keras.layers.Layer):
    """(B, F) -> (B, num_classes) float32 logits.

    Args:
      num_classes: output classes.
      hidden_units: 0 for a single Dense (authors' code), else the hidden width (512).
      dropout: dropout rate before the last Dense (training only).
      normalize: batch-normalise the input features first (see the module docstring).
      branches: how many feature vectors the input concatenates; the normalised input is
        scaled by 1/sqrt(branches), so that its norm is that of one branch's features.
    """

    def __init__(self, num_classes: int, hidden_units: int = 512, dropout: float = 0.5,
                 normalize: bool = True, branches: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2. Received: num_classes={num_classes}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        self.num_classes = int(num_classes)
        self.hidden_units = int(hidden_units)
        self.dropout = float(dropout)
        self.normalize = bool(normalize)
        if int(branches) < 1:
            raise ValueError(f"branches must be >= 1. Received: branches={branches}")
        self.branches = int(branches)
        self.input_scale = 1.0 / float(self.branches) ** 0.5
        self.norm = (layers.BatchNormalization(momentum=0.9, name="input_norm",
                                               dtype=self.dtype_policy)
                     if self.normalize else None)
        self.hidden = (layers.Dense(self.hidden_units, activation="relu", name="hidden",
                                    dtype=self.dtype_policy) if self.hidden_units else None)
        self.drop = layers.Dropout(self.dropout, name="dropout") if self.hidden_units else None
        self.out = layers.Dense(self.num_classes, name="logits", dtype="float32")

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.norm is not None:
            self.norm.build(shape)
        if self.hidden is not None:
            self.hidden.build(shape)
            shape = shape[:-1] + (self.hidden_units,)
        self.out.build(shape)

    def hidden_activations(self, x, training=False):
        """The hidden ReLU units (B, hidden) for features ``x`` (B, F): the head's health."""
        if self.hidden is None:
            raise ValueError("This head has no hidden layer (hidden_units=0).")
        if self.norm is not None:
            x = self._normalized(x, training)
        return self.hidden(x)

    def _normalized(self, x, training):
        x = self.norm(x, training=training)
        return x * ops.cast(self.input_scale, x.dtype)

    def call(self, x, training=None):
        if self.norm is not None:
            x = self._normalized(x, training)
        if self.hidden is not None:
            x = self.drop(self.hidden(x), training=training)
        return self.out(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "hidden_units": self.hidden_units,
                       "dropout": self.dropout, "normalize": self.normalize,
                       "branches": self.branches})
        return config
