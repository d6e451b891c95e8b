"""Baseline classifiers (pure Keras 3): the paper's Tables 1-2 and seed 004's ResNet-50.

``build_classifier("resnet50" | "vgg16" | "densenet121" | "densenet169" | "tiny", ...)``:
backbone -> global average pool -> Dropout -> Dense(num_classes) logits (float32), outputs
``{"logits": ...}`` like DRENet's prediction key, so training, export and predict treat
every model alike. ``trainable="last3"`` is seed 004: only the backbone's last three
convolution layers (and their batch norms) and the classifier train.
"""

from __future__ import annotations

import keras
from keras import layers

from covid_keras.model.backbones import build_backbone
from covid_keras.model.layers.intensity import backbone_normalization, input_normalization

TRAINABLE = ("all", "last3", "head")


def set_trainable(backbone: keras.Model, mode: str) -> list[str]:
    """Freezes the backbone but for ``mode``'s layers; returns the names left trainable."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}. Received: {mode!r}")
    if mode == "all":
        backbone.trainable = True
        return [lay.name for lay in backbone.layers if lay.weights]
    convs = [lay for lay in backbone.layers if isinstance(lay, layers.Conv2D)]
    keep = set()
    if mode == "last3":
        for conv in convs[-3:]:
            keep.add(conv.name)
            bn = conv.name.replace("_conv", "_bn")  # keras.applications' naming
            # A branch view's own batch norms are named <branch>_<bn>.
            keep.update(lay.name for lay in backbone.layers if bn != conv.name and
                        (lay.name == bn or lay.name.endswith("_" + bn)))
    for lay in backbone.layers:
        lay.trainable = lay.name in keep
    return sorted(keep)


def apply_trainable(model: keras.Model, mode: str) -> None:
    """all: everything; last3: the backbone's last 3 conv layers (+ their batch norms) and
    every layer after the backbone; head: only the final classifier (``head`` / ``logits``)."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}. Received: {mode!r}")
    backbones = [lay for lay in model.layers if lay.name.endswith("_backbone")]
    for lay in model.layers:
        lay.trainable = mode != "head" or lay.name in ("head", "logits")
    for backbone in backbones:  # DRENet's branch views share the convs, not the batch norms
        set_trainable(backbone, mode)


def build_classifier(backbone: str = "resnet50", num_classes: int = 5,
                     input_size: int = 224, weights: str | None = None,
                     trainable: str = "all", dropout: float = 0.0,
                     input_norm: str = "none", name: str | None = None,
                     include_preprocessing: bool = True) -> keras.Model:
    """A plain image classifier with ``{"logits": (B, num_classes)}`` output.

    ``input_norm="per_image"``: each image to zero mean and a fixed spread first
    (:mod:`covid_keras.model.layers.intensity`). ``include_preprocessing``: the backbone's
    normalisation is the model's first layer (``BackboneNormalization``): it takes RGB
    pixel values 0..255 (the default: every model the trainer builds); False (every model
    saved before the layer): normalised ones."""
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2. Received: num_classes={num_classes}")
    pixels = backbone_normalization(backbone, include_preprocessing)
    norm = input_normalization(input_norm, backbone)
    net = build_backbone(backbone, weights)
    set_trainable(net, trainable)
    image = keras.Input((input_size, input_size, 3), name="image")
    x = pixels(image) if pixels else image
    x = net(norm(x) if norm else x)["pool"]
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(image, {"logits": logits}, name=name or f"{backbone}_classifier")


def build_resnet50_five_class(input_size: int = 224, weights: str | None = None,
                              backbone: str = "resnet50") -> keras.Model:
    """Seed 004: ImageNet ResNet-50, last 3 conv layers + classifier trainable, 5 classes
    (normal, COVID-19, non-COVID viral, bacterial, tuberculosis)."""
    return build_classifier(backbone, 5, input_size, weights, trainable="last3",
                            name="resnet50_five_class")
