"""Grad-CAM (Selvaraju et al.) over the backbone's last conv features, in float32.

    cam = GradCAM(model)                      # DRENet, a baseline classifier, an ensemble
    heat = cam(images, class_index=1)         # (B, S, S) float32 in [0, 1]

The features are the image branch's ``conv5`` (the backbone's stride-32 map,
:data:`covid_keras.model.backbones.FEATURE_LAYERS`), read from the model's graph; the target is
the prediction's logit (``logits``) of ``class_index``. In DRENet the navigator, the crops
and the generated image see conv5 through stopped gradients, so the map explains the
global branch's share of the prediction, which is what the paper's heat maps show.

The gradient is taken with TensorFlow's GradientTape (the evaluate path runs on the
TensorFlow backend); the map itself is keras.ops, in float32 whatever the model's dtype
policy.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from keras.src.ops.operation import Operation

from covid_keras.model.drenet import IMAGE_INPUT, LUNG_MASK_INPUT

BRANCH_SUFFIXES = ("_crops_backbone", "_generated_backbone")


def image_backbone(model: keras.Model) -> keras.Layer:
    """The backbone that reads the model's input image (not DRENet's branch views)."""
    found = [lay for lay in model.layers if lay.name.endswith("_backbone")
             and not lay.name.endswith(BRANCH_SUFFIXES)]
    if len(found) != 1:
        raise ValueError(f"Expected one image backbone layer (<arch>_backbone) in "
                         f"{model.name!r}. Received: {[lay.name for lay in found]}")
    return found[0]


def conv_features(model: keras.Model):
    """The symbolic conv5 tensor of the model's graph (the image backbone's 4-D output)."""
    outputs = Operation.output.fget(image_backbone(model))  # the call in the outer graph
    outputs = list(outputs.values()) if isinstance(outputs, dict) else list(
        outputs if isinstance(outputs, (list, tuple)) else [outputs])
    maps = [t for t in outputs if len(t.shape) == 4]
    if len(maps) != 1:
        raise ValueError(f"The image backbone of {model.name!r} has no single 4-D output. "
                         f"Received shapes: {[t.shape for t in outputs]}")
    return maps[0]


def cam_models(model: keras.Model) -> list:
    """Models from the input image to [conv5, logits]: one for a model, one per member for
    an ensemble (whose map is the mean of the members' maps, each on its own logits)."""
    from covid_keras.model.ensemble import members

    parts = members(model) or [model]
    out = []
    for m in parts:
        o = m.output
        # a lung model (DRENet navigator_anchors="lung") takes {"image", "lung_mask"}
        inputs = m.input if isinstance(m.input, dict) else m.inputs
        out.append(keras.Model(inputs, [conv_features(m), o["logits"] if isinstance(
            o, dict) else o], name=f"{m.name}_gradcam"))
    return out


class GradCAM:
    """Grad-CAM maps of a model's ``logits`` over its image backbone's conv5."""

    def __init__(self, model: keras.Model):
        # one [conv5, logits] model, or one per member of an ensemble (whose map is the
        # mean of the members' maps, each on the member's own logit of the class)
        self.models = cam_models(model)
        self.input_size = int(model.inputs[0].shape[1])

    def __call__(self, images, class_index: int, batch_size: int = 8,
                 masks=None) -> np.ndarray:
        """images: (B, S, S, 3), the model's input (raw pixel values for a model with its own
        normalisation layer, else normalised: ``data.model_input``) -> (B, S, S) float32 maps
        in [0, 1] (each scaled by its own maximum; all zero when nothing is positive).
        ``masks`` (B, S, S, 1), 1 = lung: a lung model's (DRENet
        ``navigator_anchors="lung"``) second input, as it predicted; None: ones (no
        restriction). Other models ignore it."""
        images = np.asarray(images, np.float32)
        if not len(images):
            return np.zeros((0, self.input_size, self.input_size), np.float32)
        if masks is None:
            masks = np.ones(images.shape[:3] + (1,), np.float32)
        masks = np.asarray(masks, np.float32).reshape(images.shape[:3] + (1,))
        return np.mean([np.concatenate([self._batch(cam, images[i:i + batch_size],
                                                    int(class_index),
                                                    masks[i:i + batch_size])
                                        for i in range(0, len(images), batch_size)])
                        for cam in self.models], axis=0)

    @staticmethod
    def _batch(cam, x: np.ndarray, class_index: int, mask=None) -> np.ndarray:
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        if isinstance(cam.input, dict):  # a lung model: the image and its lung mask
            x = {IMAGE_INPUT: x, LUNG_MASK_INPUT: tf.convert_to_tensor(mask)}
        with tf.GradientTape() as tape:
            conv, logits = cam(x, training=False)
            target = tf.cast(logits[:, class_index], tf.float32)
        grads = tape.gradient(target, conv)
        if grads is None:
            raise RuntimeError("Grad-CAM: the logits do not depend on the conv features")
        size = (x[IMAGE_INPUT] if isinstance(x, dict) else x).shape[1:3]
        return np.asarray(combine(conv, grads, tuple(size)))


def combine(conv, grads, size) -> "keras.KerasTensor":
    """(B, h, w, C) features and gradients -> (B, H, W) maps in [0, 1], float32:
    ReLU(sum_c mean_hw(grad_c) * A_c), bilinearly resized, divided by its maximum."""
    conv = ops.cast(conv, "float32")
    grads = ops.cast(grads, "float32")
    weights = ops.mean(grads, axis=(1, 2), keepdims=True)
    cam = ops.relu(ops.sum(weights * conv, axis=-1, keepdims=True))
    cam = ops.image.resize(cam, tuple(int(s) for s in size), interpolation="bilinear")[..., 0]
    peak = ops.max(cam, axis=(1, 2), keepdims=True)
    return ops.where(peak > 0, cam / ops.maximum(peak, 1e-12), ops.zeros_like(cam))
