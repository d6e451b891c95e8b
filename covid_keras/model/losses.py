"""DRENet's losses in keras.ops (every backend).

total = w_raw CE(raw_logits) + w_concat CE(logits) + w_region mean_k CE(region_logits_k)
        + w_rank ranking_hinge(navigator_scores, region CE)

The ranking hinge (NTS-Net, the authors' code): the navigator must score a region higher
the more confident the region classifier is about the true class: for every pair (i, j)
with CE_j > CE_i, ``max(0, margin - s_i + s_j)``; summed over pairs, averaged over images.
The region CE enters the ranking without gradient (it is the target order).
"""

from __future__ import annotations

from keras import ops

TERMS = ("raw", "concat", "region", "rank")


def sparse_ce(labels, logits):
    """Per-example CE (…,) from integer labels (…,) and float logits (…, C), in float32."""
    logits = ops.cast(logits, "float32")
    log_p = ops.log_softmax(logits, axis=-1)
    onehot = ops.one_hot(ops.cast(labels, "int32"), ops.shape(logits)[-1], dtype="float32")
    return -ops.sum(onehot * log_p, axis=-1)


def ranking_hinge(scores, targets, margin: float = 1.0):
    """(B, K) scores, (B, K) targets (lower is better) -> (B,) per-image hinge sums."""
    scores = ops.cast(scores, "float32")
    targets = ops.stop_gradient(ops.cast(targets, "float32"))
    worse = ops.cast(targets[:, None, :] > targets[:, :, None], "float32")  # [b, i, j]
    hinge = ops.relu(margin - scores[:, :, None] + scores[:, None, :])
    return ops.sum(hinge * worse, axis=(1, 2))


def drenet_loss_terms(labels, outputs, margin: float = 1.0) -> dict:
    """Per-example terms {"raw", "concat", "region", "rank"} (each (B,), float32)."""
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    region_logits = outputs["region_logits"]
    k = ops.shape(region_logits)[1]
    region_labels = ops.repeat(labels[:, None], k, axis=1)
    region_ce = sparse_ce(region_labels, region_logits)  # (B, K)
    return {
        "raw": sparse_ce(labels, outputs["raw_logits"]),
        "concat": sparse_ce(labels, outputs["logits"]),
        "region": ops.mean(region_ce, axis=1),
        "rank": ranking_hinge(outputs["navigator_scores"], region_ce, margin),
    }


def weighted_mean(values, sample_weight=None):
    if sample_weight is None:
        return ops.mean(values)
    w = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
    return ops.sum(values * w) / ops.maximum(ops.sum(w), 1e-12)
