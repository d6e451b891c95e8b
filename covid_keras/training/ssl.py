"""Self-supervised pretraining of an image backbone: SimCLR's pieces (pure Keras 3).

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations":
two augmented views of every slice go through the backbone and a small projection MLP; the
normalised-temperature cross-entropy (NT-Xent) pulls each view towards its partner and away
from the other 2N - 2 views of the batch. No labels, no momentum encoder, no queue: one
network and one loss, which keeps the cost on 2 CPU cores to two backbone passes per slice.

Both views of a batch travel as one tensor, ``concat([view_1, view_2])`` of shape
(2N, H, W, 3), so that ``Model.fit`` with a loss over ``y_pred`` alone trains it on every
backend: row i and row i + N are the positive pair.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from covid_keras.model.backbones import BN_MOMENTUM, build_backbone


@keras.saving.register_keras_serializable(package="covid_keras")
class NTXentLoss(keras.losses.Loss):
    """SimCLR's NT-Xent over a batch whose first and second halves are the two views.

    ``y_true`` is ignored (pass zeros); ``y_pred`` is (2N, D) projections. Returns the loss
    of each of the 2N rows: ``-log softmax(sim_i / t)[partner(i)]`` over the other 2N - 1
    rows, with ``sim`` the cosine similarity.
    """

    def __init__(self, temperature: float = 0.2, name: str = "nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0. Received: temperature={temperature}")
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        del y_true
        z = ops.cast(y_pred, "float32")
        z = z / ops.maximum(ops.sqrt(ops.sum(z * z, axis=-1, keepdims=True)), 1e-12)
        m = ops.shape(z)[0]
        logits = ops.matmul(z, ops.transpose(z)) / self.temperature
        idx = ops.arange(m)
        self_mask = ops.cast(ops.equal(idx[:, None], idx[None, :]), "float32")
        logits = logits - 1e9 * self_mask
        partner = (idx + m // 2) % m
        positive = ops.sum(logits * ops.one_hot(partner, m), axis=-1)
        return ops.logsumexp(logits, axis=-1) - positive

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def build_pretrain_model(backbone: str = "resnet50", input_size: int = 128,
                         projection_dim: int = 128, hidden_units: int = 512,
                         weights: str | None = None, bn_momentum: float = BN_MOMENTUM
                         ) -> keras.Model:
    """The backbone (``covid_keras.model.backbones.build_backbone``, its pooled features) and
    SimCLR's projection head (Dense - BatchNorm - ReLU - Dense). The backbone is the
    model's layer named ``<backbone>_backbone``: :func:`pretrained_backbone` returns it."""
    if projection_dim < 1 or hidden_units < 1:
        raise ValueError(f"projection_dim and hidden_units must be >= 1. Received: "
                         f"{projection_dim}, {hidden_units}")
    net = build_backbone(backbone, weights, input_shape=(input_size, input_size, 3),
                         bn_momentum=bn_momentum)
    views = keras.Input((input_size, input_size, 3), name="views")
    x = net(views)["pool"]
    x = layers.Dense(hidden_units, use_bias=False, name="projection_dense")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name="projection_bn")(x)
    x = layers.ReLU(name="projection_relu")(x)
    z = layers.Dense(projection_dim, name="projection")(x)
    return keras.Model(views, z, name="simclr")


def pretrained_backbone(model: keras.Model) -> keras.Model:
    """The backbone inside a :func:`build_pretrain_model` model."""
    for layer in model.layers:
        if layer.name.endswith("_backbone"):
            return layer
    raise ValueError(f"{model.name} has no backbone layer (a layer named '*_backbone')")
