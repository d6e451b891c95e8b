"""Backbones with named feature outputs (pure Keras 3).

``build_backbone(name, weights)`` returns a ``keras.Model`` taking (B, H, W, 3) images of any
size and returning ``{"conv5": (B, H/32, W/32, C), "pool": (B, C)}``. The layer each
architecture's ``conv5`` comes from is named here and nowhere else (:data:`FEATURE_LAYERS`).
"""

from __future__ import annotations

import os

import keras
from keras import layers

from covid_keras.model.keras_private import all_layers

# The stride-32 feature map of each keras.applications architecture.
FEATURE_LAYERS = {
    "resnet50": "conv5_block3_out",
    "vgg16": "block5_pool",
    "densenet121": "relu",
    "densenet169": "relu",
}
# keras.applications' input normalisation of each architecture ("tiny": [-1, 1]).
PREPROCESSING = {"resnet50": "caffe", "vgg16": "caffe", "densenet121": "torch",
                 "densenet169": "torch", "tiny": "tf"}
BACKBONES = tuple(FEATURE_LAYERS) + ("tiny",)


def _application(name: str):
    return {"resnet50": keras.applications.ResNet50, "vgg16": keras.applications.VGG16,
            "densenet121": keras.applications.DenseNet121,
            "densenet169": keras.applications.DenseNet169}[name]


def _tiny(inputs, width: int = 16):
    """A small ResNet-style network with a stride-32 ``conv5``, for CPU tests and demos."""
    x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(
        inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, mult in enumerate((2, 4, 6, 8), start=2):
        filters = width * mult
        shortcut = layers.Conv2D(filters, 1, strides=2, use_bias=False,
                                 name=f"conv{stage}_proj")(x)
        y = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False,
                          name=f"conv{stage}_1_conv")(x)
        y = layers.BatchNormalization(name=f"conv{stage}_1_bn")(y)
        y = layers.ReLU(name=f"conv{stage}_1_relu")(y)
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          name=f"conv{stage}_2_conv")(y)
        y = layers.BatchNormalization(name=f"conv{stage}_2_bn")(y)
        x = layers.ReLU(name=f"conv{stage}_out")(layers.Add(name=f"conv{stage}_add")(
            [shortcut, y]))
    return x


# PyTorch's BatchNorm2d momentum 0.1 (the authors' code), in Keras's convention: moving
# statistics keep up on short runs (Keras's 0.99 leaves them stale after a few hundred steps).
BN_MOMENTUM = 0.9


def set_bn_momentum(model: keras.layers.Layer, momentum: float = BN_MOMENTUM) -> None:
    """Sets the momentum of every batch norm inside ``model``, nested ones included
    (DRENet's branch views and head; a loaded model's)."""
    for layer in all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)


def build_backbone(name: str = "resnet50", weights: str | None = None,
                   input_shape=(None, None, 3), bn_momentum: float = BN_MOMENTUM
                   ) -> keras.Model:
    """The named-output backbone.

    Args:
      name: one of :data:`BACKBONES`.
      weights: None (random init), "imagenet" (keras.applications download), or the path
        of a weights file (``.weights.h5``) for this architecture.
      input_shape: (H, W, 3); H and W may be None (the same backbone reads 448 px slices
        and 224 px crops).
      bn_momentum: momentum of every batch-norm layer's moving statistics.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone. Expected one of {BACKBONES}. Received: {name!r}")
    path = None
    if weights not in (None, "imagenet"):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise ValueError(f"Backbone weights must be None, 'imagenet' or an existing file. "
                             f"Received: weights={weights!r}")
    if name == "tiny":
        if weights == "imagenet":
            raise ValueError("The 'tiny' backbone has no ImageNet weights. Received: "
                             "weights='imagenet'")
        inputs = keras.Input(input_shape, name="image")
        conv5 = _tiny(inputs)
    else:
        try:
            # keras.applications takes a weights file path itself (notop .h5 files).
            app = _application(name)(include_top=False, weights=path or weights,
                                     input_shape=input_shape)
        except Exception as exc:  # download or file errors
            source = path or "ImageNet (download)"
            raise ValueError(f"Could not load backbone {name!r} weights from {source} "
                             f"({type(exc).__name__}: {exc}). Offline? Pass weights=None or "
                             "a local weights file.") from exc
        path = None
        inputs = app.input
        conv5 = app.get_layer(FEATURE_LAYERS[name]).output
    pool = layers.GlobalAveragePooling2D(name="pool")(conv5)
    model = keras.Model(inputs, {"conv5": conv5, "pool": pool}, name=f"{name}_backbone")
    set_bn_momentum(model, bn_momentum)
    if path is not None:  # the tiny backbone: a .weights.h5 of this model
        try:
            model.load_weights(path)
        except Exception as exc:
            raise ValueError(f"Could not load backbone weights from {path} into {name!r} "
                             f"({type(exc).__name__}: {exc})") from exc
    return model


def branch_view(backbone: keras.Model, branch: str) -> keras.Model:
    """The same backbone for another kind of input, with batch norms of its own.

    Every layer but the batch norms is shared (the same weights: DRENet's one backbone);
    each ``BatchNormalization`` is replaced by a copy (same config and initial values,
    named ``<branch>_<name>``), so that the branch's inputs (DRENet's region crops, or its
    almost-blank generated image) neither use nor move the image's statistics. The view is
    named ``<arch>_<branch>_backbone``.
    """
    def clone(layer):
        if not isinstance(layer, layers.BatchNormalization):
            return layer
        config = layer.get_config()
        config["name"] = f"{branch}_{layer.name}"
        return layers.BatchNormalization.from_config(config)

    cloned = keras.models.clone_model(backbone, clone_function=clone)
    arch = backbone.name[: -len("_backbone")] if backbone.name.endswith("_backbone") else \
        backbone.name
    view = keras.Model(cloned.input, cloned.output, name=f"{arch}_{branch}_backbone")
    originals = {lay.name: lay for lay in backbone.layers
                 if isinstance(lay, layers.BatchNormalization)}
    for lay in view.layers:
        if isinstance(lay, layers.BatchNormalization):
            lay.set_weights(originals[lay.name[len(branch) + 1:]].get_weights())
    return view


def save_backbone_weights(source: keras.Model, arch: str, path: str) -> None:
    """Writes the weights of ``source`` (a backbone of architecture ``arch``: this module's
    backbone model, or DRENet's image backbone) as the file that ``build_backbone(arch,
    weights=path)`` and the trainer's ``--backbone_weights`` read: the keras.applications
    model of the architecture (``include_top=False``, so that ``keras.applications.ResNet50(
    include_top=False, weights=path)`` loads it as it loads ImageNet's), or for ``tiny`` this
    module's backbone model. Layers are matched by name; written to a temporary file, then
    moved into place (no file is left when saving fails)."""
    if not path.endswith(".weights.h5"):
        raise ValueError(f"A backbone weights file must end in .weights.h5. Received: {path}")
    if arch not in BACKBONES:
        raise ValueError(f"Unknown backbone. Expected one of {BACKBONES}. Received: {arch!r}")
    if arch == "tiny":
        target = build_backbone("tiny")
    else:
        target = _application(arch)(include_top=False, weights=None,
                                    input_shape=(None, None, 3))
    by_name = {lay.name: lay for lay in source.layers}
    for lay in (lay for lay in target.layers if lay.weights):
        if lay.name not in by_name:
            raise ValueError(f"the model's {arch} backbone has no layer {lay.name!r}")
        lay.set_weights(by_name[lay.name].get_weights())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path[: -len(".weights.h5")] + f".partial-{os.getpid()}.weights.h5"
    try:
        target.save_weights(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
