"""The ensemble model of ``train --folds`` (covid_keras.model.ensemble, layers/ensemble.py): its
probability is the members' mean, its boxes one member's, and it reloads as one .keras file.
Runs under TensorFlow and JAX (model marker)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from covid_keras import build_classifier, build_drenet
from covid_keras.evaluation.metrics import softmax
from covid_keras.model import saving
from covid_keras.model.ensemble import build_ensemble, members
from covid_keras.model.layers.ensemble import FromAnsweringMember, MeanProbabilities

pytestmark = pytest.mark.model
SIZE = 64


def _images(n=3):
    return np.random.default_rng(0).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _members(kind: str, count: int = 3, own: bool = True):
    """``own``: the members normalise their own input (False: as saved before the layer)."""
    out = []
    for seed in range(count):
        keras.utils.set_random_seed(seed)
        out.append(build_classifier("tiny", 3, SIZE, include_preprocessing=own)
                   if kind == "classifier" else
                   build_drenet(3, input_size=SIZE, backbone="tiny", include_preprocessing=own))
    return out


def test_mean_probabilities_is_the_mean_of_the_members_softmax():
    logits = [np.array([[2.0, 0.0, -1.0], [0.0, 50.0, -50.0]], np.float32),
              np.array([[0.0, 1.0, 0.0], [-80.0, 0.0, 80.0]], np.float32)]
    out = np.asarray(MeanProbabilities()([ops.convert_to_tensor(x) for x in logits]))
    expected = np.mean([softmax(x.astype(np.float64)) for x in logits], axis=0)
    np.testing.assert_allclose(softmax(out.astype(np.float64)), expected, atol=1e-6)
    assert np.isfinite(out).all()  # a class no member believes in stays finite


def test_other_outputs_come_from_the_member_surest_of_the_answered_class():
    # image 0: the mean answers class 0; member 1 is surest of it. image 1: the mean
    # answers class 1; member 0 is surest of it (member 1 prefers class 2 but is outvoted)
    logits = [np.array([[1.0, 0.0, 0.0], [0.0, 9.0, 0.0]], np.float32),
              np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 1.5]], np.float32)]
    boxes = [np.full((2, 4, 4), 10.0, np.float32), np.full((2, 4, 4), 20.0, np.float32)]
    got = np.asarray(FromAnsweringMember()([[ops.convert_to_tensor(x) for x in logits],
                                            [ops.convert_to_tensor(b) for b in boxes]]))
    assert got.shape == (2, 4, 4)
    np.testing.assert_array_equal(got[0], boxes[1][0])
    np.testing.assert_array_equal(got[1], boxes[0][1])


@pytest.mark.parametrize("kind,own", [("classifier", True), ("drenet", True),
                                      ("drenet", False)])
def test_ensemble_outputs_the_mean_probability_and_reloads(kind, own, tmp_path):
    """own=False: members saved before BackboneNormalization (normalised input), as the
    folds of every ensemble made before it."""
    ms = _members(kind, own=own)
    model = build_ensemble(ms)
    x = _images()
    out = model.predict(x, verbose=0)
    # each member called once (the ensemble's own predict and reload are what is tested)
    member_out = [m(x, training=False) for m in ms]
    mean = np.mean([softmax(np.asarray(o["logits"], np.float64)) for o in member_out],
                   axis=0)
    np.testing.assert_allclose(softmax(np.asarray(out["logits"], np.float64)), mean,
                               atol=1e-5)
    if kind == "drenet":  # every DRENet output, each one member's
        assert set(out) == {"logits", "raw_logits", "region_logits", "navigator_scores",
                            "boxes", "box_scores"}
        member_boxes = [np.asarray(o["boxes"]) for o in member_out]
        for i in range(len(x)):
            assert any(np.array_equal(out["boxes"][i], b[i]) for b in member_boxes)
    path = str(tmp_path / "ensemble.keras")
    saving.save_model(model, path, ["normal", "covid", "bacterial"])
    again = saving.load_model(path, compile=False)
    assert len(members(again)) == 3
    assert saving.model_spec(again)["model"] == kind
    assert saving.model_spec(again)["include_preprocessing"] is own
    assert again.covid_keras_info["members"] == 3
    np.testing.assert_allclose(again.predict(x, verbose=0)["logits"], out["logits"],
                               atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="Grad-CAM takes its gradient with TensorFlow's GradientTape "
                           "(covid_keras/evaluation/gradcam.py): evaluate's path, on TensorFlow")
def test_grad_cam_of_an_ensemble_is_the_mean_of_its_members_maps():
    """Not the map of the mean probability: each member's map on its own logit, averaged
    (the model card's "heat maps the mean of the members' Grad-CAM maps")."""
    from covid_keras.evaluation.gradcam import GradCAM

    parts = _members("drenet", 2)
    x = _images(2)
    want = np.mean([GradCAM(m)(x, 1) for m in parts], axis=0)
    got = GradCAM(build_ensemble(parts))(x, 1)
    assert got.shape == (2, SIZE, SIZE) and want.max() > 0
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(want, GradCAM(parts[0])(x, 1), atol=1e-3)  # both members count


def test_an_ensemble_needs_members_of_one_shape():
    keras.utils.set_random_seed(0)
    with pytest.raises(ValueError, match="at least 2"):
        build_ensemble(_members("classifier", 1))
    with pytest.raises(ValueError, match="inputs differ"):
        build_ensemble([build_classifier("tiny", 3, SIZE), build_classifier("tiny", 3, 32)])
    # one input for all: members with and without their own normalisation do not mix
    with pytest.raises(ValueError, match=r"members \[0\] normalise their own input"):
        build_ensemble([_members("classifier", 1)[0],
                        _members("classifier", 1, own=False)[0]])
