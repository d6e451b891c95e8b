"""DRENet's losses in keras.ops (every backend).

total = w_raw CE(raw_logits) + w_concat CE(logits) + w_region mean_k CE(region_logits_k)
        + w_rank ranking_hinge(navigator_scores, region CE)

The ranking hinge (NTS-Net, the authors' code): the navigator must score a region higher
the more confident the region classifier is about the true class: for every pair (i, j)
with CE_j > CE_i, ``max(0, margin - s_i + s_j)``; summed over pairs, averaged over images.
The region CE enters the ranking without gradient (it is the target order).

Distillation (``covid_keras.train --distill_from``): a teacher's class probabilities p
ride with each training label (:data:`DISTILL_Y`: y is (B, 1 + C), the label then p), and
a term that uses the image's class label becomes
``(1 - w) CE(label, logits) + w T^2 CE(softmax(log p / T), logits / T)``
(:func:`distill_mix`, :func:`soft_ce`); with w = 0 it is exactly the hard CE. DRENet mixes
its raw and concat terms so; the region and ranking terms stay on the labels.
"""

from __future__ import annotations

import keras
from keras import ops

TERMS = ("raw", "concat", "region", "rank")
#: DRENet's terms that use the image's class label and take the teacher's targets too.
DISTILLED_TERMS = ("raw", "concat")
#: A distilled run's y: float32 (B, 1 + C), column 0 the label index, then the teacher's
#: class probabilities (what :func:`covid_keras.io.data.make_dataset` yields with targets).
DISTILL_Y = "label, teacher probabilities"
#: The floor under a teacher probability before its log (a probability 0 stays finite).
PROB_FLOOR = 1e-30


def sparse_ce(labels, logits):
    """Per-example CE (…,) from integer labels (…,) and float logits (…, C), in float32."""
    logits = ops.cast(logits, "float32")
    log_p = ops.log_softmax(logits, axis=-1)
    onehot = ops.one_hot(ops.cast(labels, "int32"), ops.shape(logits)[-1], dtype="float32")
    return -ops.sum(onehot * log_p, axis=-1)


def soft_ce(teacher_probs, logits, temperature: float = 1.0):
    """Per-example CE (B,) of the student's ``logits / T`` against the teacher's
    probabilities softened at the same T: ``softmax(log p / T)`` (p (B, C), floored at
    :data:`PROB_FLOOR`; T = 1 leaves them as they are). float32; no T^2 factor (that is
    :func:`distill_mix`'s)."""
    t = float(temperature)
    p = ops.maximum(ops.cast(teacher_probs, "float32"), PROB_FLOOR)
    target = ops.stop_gradient(ops.softmax(ops.log(p) / t, axis=-1))
    log_q = ops.log_softmax(ops.cast(logits, "float32") / t, axis=-1)
    return -ops.sum(target * log_q, axis=-1)


def distill_mix(hard, soft, weight: float, temperature: float):
    """``(1 - w) hard + w T^2 soft`` (per example): the hard-label CE and :func:`soft_ce`
    mixed; w = 0 gives ``hard`` exactly."""
    w, t = float(weight), float(temperature)
    if w == 0.0:
        return hard
    return (1.0 - w) * hard + (w * t * t) * soft


def split_distill_y(y):
    """A distilled run's y (B, 1 + C) (:data:`DISTILL_Y`) -> (labels int32 (B,), teacher
    probabilities float32 (B, C))."""
    y = ops.cast(y, "float32")
    return ops.cast(ops.round(y[:, 0]), "int32"), y[:, 1:]


def ranking_hinge(scores, targets, margin: float = 1.0):
    """(B, K) scores, (B, K) targets (lower is better) -> (B,) per-image hinge sums."""
    scores = ops.cast(scores, "float32")
    targets = ops.stop_gradient(ops.cast(targets, "float32"))
    worse = ops.cast(targets[:, None, :] > targets[:, :, None], "float32")  # [b, i, j]
    hinge = ops.relu(margin - scores[:, :, None] + scores[:, None, :])
    return ops.sum(hinge * worse, axis=(1, 2))


def drenet_loss_terms(labels, outputs, margin: float = 1.0, distill=None) -> dict:
    """Per-example terms {"raw", "concat", "region", "rank"} (each (B,), float32).

    ``distill=(w, T)``: ``labels`` is a distilled run's y (:data:`DISTILL_Y`), and the raw
    and concat terms (:data:`DISTILLED_TERMS`) mix in the teacher's targets
    (:func:`distill_mix`); the region and ranking terms use the labels alone."""
    teacher = None
    if distill is not None:
        labels, teacher = split_distill_y(labels)
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    region_logits = outputs["region_logits"]
    k = ops.shape(region_logits)[1]
    region_labels = ops.repeat(labels[:, None], k, axis=1)
    region_ce = sparse_ce(region_labels, region_logits)  # (B, K)
    terms = {
        "raw": sparse_ce(labels, outputs["raw_logits"]),
        "concat": sparse_ce(labels, outputs["logits"]),
        "region": ops.mean(region_ce, axis=1),
        "rank": ranking_hinge(outputs["navigator_scores"], region_ce, margin),
    }
    if distill is not None:
        w, t = distill
        for name, key in (("raw", "raw_logits"), ("concat", "logits")):
            terms[name] = distill_mix(terms[name], soft_ce(teacher, outputs[key], t), w, t)
    return terms


def weighted_mean(values, sample_weight=None):
    if sample_weight is None:
        return ops.mean(values)
    w = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    return ops.sum(values * w) / ops.maximum(ops.sum(w), 1e-12)


@keras.saving.register_keras_serializable(package="covid_keras")
class DistillationLoss(keras.losses.Loss):
    """The classifier's loss in a distilled run: y is :data:`DISTILL_Y`, and the loss is
    ``(1 - w) CE(label, logits) + w T^2 CE(softmax(log p / T), logits / T)``, its hard part
    Keras's own sparse CE of the logits (what a run without distillation compiles), so
    that w = 0 is exactly that loss. A y of labels alone ((B,) or (B, 1): a user's
    ``evaluate`` or ``fit`` of the saved student, which compiles this loss) gives that
    hard CE, as an ordinary run's file does."""

    def __init__(self, weight: float = 0.5, temperature: float = 1.0,
                 name: str = "distillation_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.weight, self.temperature = float(weight), float(temperature)

    def call(self, y_true, y_pred):
        if len(y_true.shape) < 2 or y_true.shape[-1] == 1:  # labels alone: no teacher
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred,
                                                                from_logits=True)
        labels, teacher = split_distill_y(y_true)
        hard = keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        if self.weight == 0.0:
            return hard
        return distill_mix(hard, soft_ce(teacher, y_pred, self.temperature), self.weight,
                           self.temperature)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight,
                "temperature": self.temperature}
