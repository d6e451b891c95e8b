"""K fold models as one Keras model (``covid_keras.train --folds``).

    model = build_ensemble([member_0, member_1, ...])   # loaded fold models (best.keras)
    out = model(images)        # {"logits": log of the mean class probability, ...}

Every member sees the same input image (the members all normalise their own input, or
all expect it normalised: models saved before ``BackboneNormalization``); ``logits`` is
:class:`~covid_keras.model.layers.ensemble.MeanProbabilities` (its softmax is the members' mean
probability, so every tool that reads logits reads the ensemble's probability), and
DRENet's other outputs (boxes, box scores, navigator scores, branch logits) come from the
member that is most sure of the answered class
(:class:`~covid_keras.model.layers.ensemble.FromAnsweringMember`): a box is one model's box,
never an average of boxes. Grad-CAM of an ensemble averages the members' maps
(:mod:`covid_keras.evaluation.gradcam`).

The members are nested models named ``member_<k>``; the file reloads with
:func:`covid_keras.model.saving.load_model` in a fresh process, on the TensorFlow and the JAX
backend. Pure Keras 3.
"""

from __future__ import annotations

import keras

from covid_keras.model.drenet import IMAGE_INPUT, LUNG_MASK_INPUT
from covid_keras.model.layers.ensemble import FromAnsweringMember, MeanProbabilities
from covid_keras.model.layers.intensity import BackboneNormalization

NAME = "ensemble"
MEMBER_PREFIX = "member_"


def renamed(model: keras.Model, name: str) -> keras.Model:
    """A copy of ``model`` (same class, config and weights) named ``name``."""
    config = keras.saving.serialize_keras_object(model)
    config["config"]["name"] = name
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def build_ensemble(members: list, name: str = NAME) -> keras.Model:
    """One model over ``members`` (built covid_keras models with the same input shape and
    classes). Outputs: ``logits`` (the mean probability's log) and every other output all
    members have, from the member most sure of the answered class."""
    if len(members) < 2:
        raise ValueError(f"An ensemble needs at least 2 members. Received: {len(members)}")
    shapes = {tuple(m.inputs[0].shape[1:]) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"The members' inputs differ: {sorted(shapes)}")
    # one input for all: every member normalises its own (BackboneNormalization, raw
    # pixel values in), or none does (members saved before the layer: normalised input)
    own = [normalises_its_input(m) for m in members]
    if len(set(own)) != 1:
        raise ValueError("The members' inputs differ: members "
                         f"{[k for k, o in enumerate(own) if o]} normalise their own input "
                         "(BackboneNormalization), members "
                         f"{[k for k, o in enumerate(own) if not o]} expect it normalised "
                         "(saved before that layer)")
    size = shapes.pop()
    image = keras.Input(size, name=IMAGE_INPUT)
    # DRENet navigator_anchors="lung" members also take the lung mask: all of them or none
    lung = [isinstance(m.input, dict) for m in members]
    if len(set(lung)) != 1:
        raise ValueError("The members' inputs differ: members "
                         f"{[k for k, v in enumerate(lung) if v]} take the lung mask "
                         "(navigator_anchors='lung'), the others do not")
    inputs = image
    if lung[0]:
        inputs = {IMAGE_INPUT: image,
                  LUNG_MASK_INPUT: keras.Input(size[:2] + (1,), name=LUNG_MASK_INPUT)}
    outs = []
    for k, m in enumerate(members):
        out = renamed(m, f"{MEMBER_PREFIX}{k}")(inputs)
        outs.append(out if isinstance(out, dict) else {"logits": out})
    classes = {int(o["logits"].shape[-1]) for o in outs}
    if len(classes) != 1:
        raise ValueError(f"The members' classes differ: {sorted(classes)}")
    member_logits = [o["logits"] for o in outs]
    outputs = {"logits": MeanProbabilities(name="logits")(member_logits)}
    shared = [k for k in outs[0] if k != "logits" and all(k in o for o in outs)]
    for key in shared:
        outputs[key] = FromAnsweringMember(name=key)([member_logits, [o[key] for o in outs]])
    return keras.Model(inputs, outputs, name=name)


def normalises_its_input(model: keras.Model) -> bool:
    """Whether ``model`` (a member) has the backbone's normalisation as its own layer
    (``include_preprocessing``)."""
    return any(isinstance(lay, BackboneNormalization) for lay in model.layers)


def members(model: keras.Model) -> list:
    """The member models of an ensemble (in order); [] for any other model."""
    found = [lay for lay in model.layers if isinstance(lay, keras.Model)
             and lay.name.startswith(MEMBER_PREFIX)]
    return sorted(found, key=lambda m: int(m.name[len(MEMBER_PREFIX):]))


def is_ensemble(model: keras.Model) -> bool:
    return bool(members(model))
