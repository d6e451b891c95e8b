"""The layers that make K fold models one model (``covid_keras.model.ensemble``); pure Keras 3.

``MeanProbabilities``: the members' logits in, ``log(mean(softmax(member logits)))`` out.
Its softmax is exactly the mean of the members' class probabilities, so every tool that
reads ``logits`` (evaluation, export, serving, predict, the page) reads the ensemble's
probability without knowing it is one.

``FromAnsweringMember``: for each image, another output of the members (DRENet's boxes,
box scores, navigator scores...) taken from the member with the highest probability for
the class the ensemble answers (its argmax).
"""

from __future__ import annotations

import keras
from keras import ops

#: The floor under the mean probability before the log: softmax(log p) = p to float32
#: precision, and a class no member gives any probability stays finite.
FLOOR = 1e-30


def member_probabilities(member_logits) -> "keras.KerasTensor":
    """(M, B, C) softmax probabilities of M members' (B, C) logits, in float32."""
    return ops.stack([ops.softmax(ops.cast(x, "float32"), axis=-1) for x in member_logits],
                     axis=0)


@keras.saving.register_keras_serializable(package="covid_keras")
class MeanProbabilities(keras.layers.Layer):
    """List of M (B, C) member logits -> (B, C) logits whose softmax is the members' mean
    class probability."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, member_logits):
        mean = ops.mean(member_probabilities(member_logits), axis=0)
        return ops.log(ops.maximum(mean, FLOOR))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@keras.saving.register_keras_serializable(package="covid_keras")
class FromAnsweringMember(keras.layers.Layer):
    """[member logits (M of (B, C)), member values (M of (B, ...))] -> (B, ...): for each
    image the value of the member whose probability for the ensemble's answered class
    (the argmax of the mean probability) is highest."""

    def call(self, inputs):
        member_logits, values = inputs
        probs = member_probabilities(member_logits)                     # (M, B, C)
        answer = ops.argmax(ops.mean(probs, axis=0), axis=-1)            # (B,)
        chosen = ops.sum(probs * ops.one_hot(answer, ops.shape(probs)[-1])[None], axis=-1)
        best = ops.argmax(chosen, axis=0)                                # (B,)
        stacked = ops.stack(values, axis=0)                              # (M, B, ...)
        mask = ops.transpose(ops.one_hot(best, len(values)), (1, 0))     # (M, B)
        mask = ops.cast(mask, stacked.dtype)
        for _ in range(len(stacked.shape) - 2):
            mask = ops.expand_dims(mask, -1)
        return ops.sum(stacked * mask, axis=0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[1][0])
