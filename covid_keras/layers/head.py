"""The MLP head over the concatenated features (pure Keras 3).

Dense(hidden) + ReLU + Dropout + Dense(classes), logits in float32 (mixed precision safe).
``hidden_units=0`` is the authors' code: a single Dense. Dropout is a Keras layer, so it is
off at inference (the authors' code creates dropout inside ``forward()``, where it stays on).
"""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="covid_keras")
class MLPHead(keras.layers.Layer):
    """(B, F) -> (B, num_classes) float32 logits.

    Args:
      num_classes: output classes.
      hidden_units: 0 for a single Dense (authors' code), else the hidden width (512).
      dropout: dropout rate before the last Dense (training only).
    """

    def __init__(self, num_classes: int, hidden_units: int = 512, dropout: float = 0.5,
                 **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2. Received: num_classes={num_classes}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        self.num_classes = int(num_classes)
        self.hidden_units = int(hidden_units)
        self.dropout = float(dropout)
        self.hidden = (layers.Dense(self.hidden_units, activation="relu", name="hidden",
                                    dtype=self.dtype_policy) if self.hidden_units else None)
        self.drop = layers.Dropout(self.dropout, name="dropout") if self.hidden_units else None
        self.out = layers.Dense(self.num_classes, name="logits", dtype="float32")

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.hidden is not None:
            self.hidden.build(shape)
            shape = shape[:-1] + (self.hidden_units,)
        self.out.build(shape)

    def call(self, x, training=None):
        if self.hidden is not None:
            x = self.drop(self.hidden(x), training=training)
        return self.out(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "hidden_units": self.hidden_units,
                       "dropout": self.dropout})
        return config
