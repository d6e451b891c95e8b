"""DRENet's custom layers, one per concept; all pure Keras 3 and registered under
``covid_keras>``, so ``.keras`` files load under any backend."""

from covid_keras.model.layers.anchors import (
    AnchorGrid,
    AnchorLungOverlap,
    anchor_boxes,
    iou_matrix,
)
from covid_keras.model.layers.attention import RegionAttention
from covid_keras.model.layers.crop import RegionCrop, crop_and_resize
from covid_keras.model.layers.ensemble import FromAnsweringMember, MeanProbabilities
from covid_keras.model.layers.generated import ConfidenceMapImage, ZoomImage
from covid_keras.model.layers.head import MLPHead
from covid_keras.model.layers.intensity import (
    BackboneNormalization,
    PerImageStandardization,
    backbone_normalization,
    input_normalization,
)
from covid_keras.model.layers.navigator import ProposalHead
from covid_keras.model.layers.topk import TopKNMS, greedy_nms_topk

__all__ = ["AnchorGrid", "AnchorLungOverlap", "BackboneNormalization", "ConfidenceMapImage",
           "FromAnsweringMember",
           "MeanProbabilities",
           "MLPHead", "ProposalHead", "RegionAttention", "PerImageStandardization",
           "RegionCrop", "TopKNMS", "ZoomImage", "anchor_boxes", "backbone_normalization",
           "crop_and_resize",
           "greedy_nms_topk", "input_normalization", "iou_matrix"]
