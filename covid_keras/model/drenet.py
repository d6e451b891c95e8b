"""DRENet: the whole architecture in one builder (pure Keras 3: no TensorFlow import).

    model = build_drenet(num_classes=3)                   # the paper
    model = build_drenet(3, variant="code")               # the authors' code
    outputs = model(images)  # dict: logits, raw_logits, region_logits, navigator_scores,
                             #       boxes, box_scores

Flow (448 px input, ResNet-50; sizes scale with ``input_size``):

1. backbone(image) -> conv5 (14x14x2048) and its pooled feature -> ``raw_logits``;
2. proposal head on conv5 (gradient stopped; resized to 14x14 below 448 px, so the anchor
   layout is the same at every size) -> a score per anchor (245 paper / 261 code);
3. top-K by greedy NMS (K=3, IoU 0.1; code: 3 small + 3 large) -> ``boxes``,
   ``navigator_scores``; ``box_scores`` = scores normalised to (0, 1] (best box = 1);
4. each box cropped (bilinear, no gradient) to 224 px -> the same backbone (its convs;
   batch norms of the crops' own) -> region features -> ``region_logits``;
5. the generated image (paper: image x confidence map; code: zoom on the top large box)
   -> the same backbone (batch norms of its own) -> its pooled feature;
6. paper: attention over the region features; concat(global, regions, generated) ->
   batch norm -> MLP head (code: one Dense) -> ``logits``, the prediction.

The loss (:mod:`covid_keras.model.losses`) is in :meth:`DRENet.compute_loss`, so ``fit`` works on
every backend with ``compile(optimizer=...)`` and no ``loss``; each term is tracked as a
metric (``raw_loss``, ``concat_loss``, ``region_loss``, ``rank_loss``).
"""

from __future__ import annotations

import keras
from keras import layers, ops

from covid_keras.model import losses
from covid_keras.model.backbones import BN_MOMENTUM, branch_view, build_backbone, set_bn_momentum
from covid_keras.model.baselines import apply_trainable

# Keras's own per-replica loss scaling (x 1/replicas under a tf.distribute strategy, the
# identity elsewhere): what compiled losses get, so a custom compute_loss must apply it too.
from covid_keras.model.keras_private import scale_loss_for_distribution
from covid_keras.model.layers import (
    AnchorLungOverlap,
    ConfidenceMapImage,
    MLPHead,
    ProposalHead,
    RegionAttention,
    RegionCrop,
    TopKNMS,
    ZoomImage,
    backbone_normalization,
    input_normalization,
)
from covid_keras.model.layers.anchors import CODE_LEVELS, PAPER_LEVELS, level_grid
from covid_keras.model.layers.generated import normalised_scores

VARIANTS = ("paper", "code")
#: ``navigator_anchors``: "all" (the paper) or "lung" (only anchors on the lung mask).
NAVIGATOR_ANCHORS = ("all", "lung")
#: The model's input names: the image, and with ``navigator_anchors="lung"`` (then a dict
#: ``{IMAGE_INPUT: ..., LUNG_MASK_INPUT: ...}``) the lung mask.
IMAGE_INPUT, LUNG_MASK_INPUT = "image", "lung_mask"
# With navigator_anchors="lung", an anchor may be chosen when at least this share of its
# area (inside the image) is lung. Not "> 0": with any overlap, an anchor that touches
# the lung by a few blurred edge pixels (the mask is resized to the input size) would
# qualify while being almost all air or chest wall, the very boxes issue 30 complains of.
# Not 0.5 or more: COVID-19's lesions are typically peripheral and subpleural, so the
# anchors that straddle the lung border must stay eligible, and on apex / base slices with
# a small lung section no 96 px anchor would be half lung (the fallback to all anchors
# would then point at air again). A quarter of the anchor: most of the box may be outside
# the lung, but a real part of it is inside.
LUNG_OVERLAP = 0.25
OUTPUT_KEYS = ("logits", "raw_logits", "region_logits", "navigator_scores", "boxes",
               "box_scores")
DEFAULT_LOSS_WEIGHTS = {"raw": 1.0, "concat": 1.0, "region": 1.0, "rank": 1.0}


@keras.saving.register_keras_serializable(package="covid_keras")
class DRENet(keras.Model):
    """The functional DRENet graph plus its multi-term loss. Build it with
    :func:`build_drenet`; ``get_config`` holds the builder's arguments, so ``.keras`` files
    rebuild it under any backend."""

    def __init__(self, inputs, outputs, build_config: dict, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.build_config = dict(build_config)
        self.loss_weights_by_term = dict(build_config["loss_weights"])
        self.rank_margin = float(build_config["rank_margin"])
        self.term_trackers = {t: keras.metrics.Mean(name=f"{t}_loss") for t in losses.TERMS}
        # (w, T) while a distilled run trains it (covid_keras.train --distill_from: y is
        # losses.DISTILL_Y); not part of the model (get_config, the saved file)
        self.distill = None

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        terms = losses.drenet_loss_terms(y, y_pred, self.rank_margin, distill=self.distill)
        total = 0.0
        for name, values in terms.items():
            value = losses.weighted_mean(values, sample_weight)
            self.term_trackers[name].update_state(value)
            total = total + self.loss_weights_by_term[name] * value
        for extra in self.losses:  # regularisers, if any
            total = total + ops.cast(extra, "float32")
        return scale_loss_for_distribution(total)

    def get_config(self):
        return {"build_config": self.build_config, "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # a file saved before BackboneNormalization has no include_preprocessing: its model
        # takes normalised input and rebuilds without the layer
        build = {"include_preprocessing": False, **config["build_config"]}
        return build_drenet(**build, name=config.get("name", "drenet"))


def rebuild_drenet(model: DRENet, **changes) -> DRENet:
    """``model`` built again with ``changes`` to its :func:`build_drenet` arguments (e.g.
    ``navigator_anchors="lung"``: the lung mask's layer has no weights), its weights
    copied."""
    build = {"include_preprocessing": False, **model.build_config, **changes}
    out = build_drenet(**build, name=model.name)
    out.set_weights(model.get_weights())
    return out


def _levels_and_groups(variant: str, top_k: int | None):
    if variant == "paper":
        return PAPER_LEVELS, [(0, 2, top_k or 3)], 512, True
    k = top_k or 3
    return CODE_LEVELS, [(0, 2, k), (2, 3, k)], 0, False


def build_drenet(num_classes: int, input_size: int = 448, backbone: str = "resnet50",
                 weights: str | None = None, variant: str = "paper", top_k: int | None = None,
                 crop_size: int | None = None, iou_threshold: float = 0.1,
                 loss_weights: dict | None = None, rank_margin: float = 1.0,
                 dropout: float = 0.5, trainable: str = "all", branch_bn: bool = True,
                 head_norm: bool = True, head_hidden_units: int | None = None,
                 bn_momentum: float = BN_MOMENTUM, input_norm: str = "none",
                 include_preprocessing: bool = True, navigator_anchors: str = "all",
                 lung_overlap: float = LUNG_OVERLAP, name: str = "drenet") -> DRENet:
    """DRENet as a functional Keras model with a dict of outputs (:data:`OUTPUT_KEYS`).

    Args:
      num_classes: 2 (COVID vs bacterial / healthy) or 3.
      input_size: square input side in pixels; anchors and the crop size follow from it.
      backbone: "resnet50" (paper) or any of :data:`covid_keras.model.backbones.BACKBONES`.
      weights: backbone weights: None, "imagenet" or a local file.
      variant: "paper" (default) or "code" (the authors' code: 6 regions incl. the 192 px
        level, zoom image, single Dense head, no attention).
      top_k: regions per group (paper: 3; code: 3 small + 3 large).
      crop_size: region crop side (default input_size // 2: 224 at 448).
      iou_threshold: greedy NMS threshold (0.1).
      loss_weights: {"raw", "concat", "region", "rank"} -> weight (1 each).
      trainable: "all", "last3" (backbone's last 3 convs + everything after it) or "head"
        (fine-tuning); kept in the config, so a saved model reloads frozen the same way.
      branch_bn: the crops and the generated image go through the shared backbone with
        batch norms of their own (:func:`~covid_keras.model.backbones.branch_view`); False: one
        set of statistics for all three inputs (each pass normalises by its own batch in
        training, and inference uses their blended moving average).
      head_norm: batch-normalise the concatenated features before the head (see
        :mod:`covid_keras.model.layers.head`: without it the head collapses on real data).
      head_hidden_units: the head's hidden width (None: the variant's, paper 512, code 0 =
        a single Dense).
      bn_momentum: momentum of every batch norm's moving statistics (backbone, branch
        views, head): 0.9 = PyTorch's 0.1, as the authors; Keras's 0.99 leaves them stale on
        short runs.
      input_norm: "none" or "per_image": every image to zero mean and a fixed spread
        first (:mod:`covid_keras.model.layers.intensity`), so the outputs do not depend on its
        overall brightness or contrast. The crops and the generated image are cut from the
        standardised image.
      include_preprocessing: the backbone's normalisation (caffe, torch or tf) is the
        model's first layer (:class:`~covid_keras.model.layers.BackboneNormalization`): the model
        takes RGB pixel values 0..255 (the default: every model the trainer builds). False
        (every model saved before the layer; a saved config without the key rebuilds so):
        the model takes them normalised (:func:`covid_keras.io.data.normalize`).
      navigator_anchors: "all" (default: the paper, the model takes the image alone) or
        "lung": the model takes a dict ``{"image": ..., "lung_mask": ...}``, the mask
        float32 (B, S, S, 1) at the input size, 1 = lung, 0 = not (the records'
        ``mask/encoded`` / 255, augmented with the image: :mod:`covid_keras.io.data`), and
        the navigator chooses only among the anchors whose area is at least
        ``lung_overlap`` lung (:class:`~covid_keras.model.layers.AnchorLungOverlap`); an
        image where no anchor qualifies (all-black, failed mask) chooses among all
        (:func:`~covid_keras.model.layers.greedy_nms_topk`). A mask of ones is no
        restriction: the outputs are those of the same weights with "all".
      lung_overlap: with "lung", the share of an anchor that must be lung (see
        :data:`LUNG_OVERLAP` for the choice of 0.25).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}. Received: variant={variant!r}")
    if navigator_anchors not in NAVIGATOR_ANCHORS:
        raise ValueError(f"navigator_anchors must be one of {NAVIGATOR_ANCHORS}. Received: "
                         f"navigator_anchors={navigator_anchors!r}")
    if not 0.0 <= float(lung_overlap) <= 1.0:
        raise ValueError(f"lung_overlap must be in [0, 1]. Received: {lung_overlap}")
    if int(input_size) < 32:
        raise ValueError(f"input_size must be >= 32. Received: input_size={input_size}")
    weights_by_term = dict(DEFAULT_LOSS_WEIGHTS)
    weights_by_term.update(loss_weights or {})
    unknown = set(weights_by_term) - set(losses.TERMS)
    if unknown:
        raise ValueError(f"loss_weights keys must be in {losses.TERMS}. Received: {unknown}")
    crop = int(crop_size or input_size // 2)
    levels, groups, hidden, attention = _levels_and_groups(variant, top_k)
    if head_hidden_units is not None:
        if int(head_hidden_units) < 0:
            raise ValueError(f"head_hidden_units must be >= 0. Received: {head_hidden_units}")
        hidden = int(head_hidden_units)
    build_config = {"num_classes": int(num_classes), "input_size": int(input_size),
                    "backbone": backbone, "weights": None, "variant": variant,
                    "top_k": top_k, "crop_size": crop, "iou_threshold": float(iou_threshold),
                    "loss_weights": weights_by_term, "rank_margin": float(rank_margin),
                    "dropout": float(dropout), "trainable": trainable,
                    "branch_bn": bool(branch_bn), "head_norm": bool(head_norm),
                    "head_hidden_units": head_hidden_units,
                    "bn_momentum": float(bn_momentum), "input_norm": input_norm,
                    "include_preprocessing": bool(include_preprocessing)}
    if navigator_anchors != "all":  # only then: a default model's config stays as it was
        build_config.update(navigator_anchors=navigator_anchors,
                            lung_overlap=float(lung_overlap))

    net = build_backbone(backbone, weights)
    crop_net = branch_view(net, "crops") if branch_bn else net
    generated_net = branch_view(net, "generated") if branch_bn else net
    pixels = backbone_normalization(backbone, include_preprocessing)
    norm = input_normalization(input_norm, backbone)
    raw_image = keras.Input((input_size, input_size, 3), name=IMAGE_INPUT)
    image = pixels(raw_image) if pixels else raw_image
    image = norm(image) if norm else image
    feats = net(image)
    raw_logits = layers.Dense(num_classes, dtype="float32", name="raw_logits")(feats["pool"])

    scores_all = ProposalHead(num_levels=len(levels), grid_size=level_grid(levels[0][0]),
                              name="navigator")(feats["conv5"])
    if navigator_anchors == "lung":
        lung_mask = keras.Input((input_size, input_size, 1), name=LUNG_MASK_INPUT)
        overlap = AnchorLungOverlap(input_size, levels, name="lung_overlap")(lung_mask)
        top = TopKNMS(input_size, levels, groups, iou_threshold, min_overlap=lung_overlap,
                      name="top_k")([scores_all, overlap])
        inputs = {IMAGE_INPUT: raw_image, LUNG_MASK_INPUT: lung_mask}
    else:
        top = TopKNMS(input_size, levels, groups, iou_threshold, name="top_k")(scores_all)
        inputs = raw_image
    boxes, nav_scores = top["boxes"], top["scores"]
    k = sum(g[2] for g in groups)

    crops = RegionCrop(crop, name="region_crop")([image, boxes])  # (B, K, c, c, 3)
    region_feats = crop_net(RegionsToBatch(name="regions_to_batch")(crops))["pool"]
    region_feats = RegionsFromBatch(k, name="regions_from_batch")(region_feats)
    region_logits = layers.Dense(num_classes, dtype="float32", name="region_logits")(
        region_feats)

    if variant == "paper":
        generated = ConfidenceMapImage(name="generated_image")([image, boxes, nav_scores])
    else:
        generated = ZoomImage(box_index=k // 2, name="zoom_image")([image, boxes])
    generated_feat = generated_net(generated)["pool"]

    if attention:
        region_feats = RegionAttention(name="region_attention")(region_feats)["features"]
    concat = layers.Concatenate(name="concat")(
        [feats["pool"], layers.Flatten(name="regions_flat")(region_feats), generated_feat])
    logits = MLPHead(num_classes, hidden_units=hidden, dropout=dropout if hidden else 0.0,
                     normalize=head_norm, branches=k + 2, name="head")(concat)
    box_scores = BoxScores(name="box_scores")(nav_scores)
    outputs = {"logits": logits, "raw_logits": raw_logits, "region_logits": region_logits,
               "navigator_scores": nav_scores, "boxes": boxes, "box_scores": box_scores}
    model = DRENet(inputs, outputs, build_config, name=name)
    set_bn_momentum(model, bn_momentum)
    if trainable != "all":
        apply_trainable(model, trainable)
    return model


@keras.saving.register_keras_serializable(package="covid_keras")
class RegionsToBatch(keras.layers.Layer):
    """(B, K, c, c, C) -> (B*K, c, c, C): the K regions go through the backbone as a batch."""

    def call(self, crops):
        s = ops.shape(crops)
        return ops.reshape(crops, (-1, s[2], s[3], s[4]))

    def compute_output_shape(self, input_shape):
        b, k = input_shape[0], input_shape[1]
        return (None if b is None or k is None else b * k,) + tuple(input_shape[2:])


@keras.saving.register_keras_serializable(package="covid_keras")
class BoxScores(keras.layers.Layer):
    """(B, K) navigator scores -> (B, K) in (0, 1]: exp(s - max s), the best box = 1."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, scores):
        return normalised_scores(scores)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="covid_keras")
class RegionsFromBatch(keras.layers.Layer):
    """(B*K, ...) -> (B, K, ...): the inverse of :class:`RegionsToBatch`."""

    def __init__(self, regions: int, **kwargs):
        super().__init__(**kwargs)
        self.regions = int(regions)

    def call(self, x):
        return ops.reshape(x, (-1, self.regions) + tuple(x.shape[1:]))

    def compute_output_shape(self, input_shape):
        b = input_shape[0]
        return (None if b is None else b // self.regions, self.regions) + tuple(input_shape[1:])

    def get_config(self):
        config = super().get_config()
        config.update({"regions": self.regions})
        return config
