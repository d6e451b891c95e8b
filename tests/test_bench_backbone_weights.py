"""bench/backbone_weights.py: a trained model's backbone, written so --backbone_weights
(keras.applications for the real architectures) loads exactly those weights."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import backbone_weights  # noqa: E402

from covid_keras.evaluation.gradcam import image_backbone  # noqa: E402
from covid_keras.model.backbones import build_backbone  # noqa: E402
from covid_keras.model.baselines import build_classifier  # noqa: E402
from covid_keras.model.drenet import build_drenet  # noqa: E402


def _scramble(model, seed):
    """Every weight of every layer (moving statistics included) to a new random value, so
    a copy that missed a layer cannot match by initialisation."""
    rng = np.random.default_rng(seed)
    for lay in image_backbone(model).layers:
        if lay.weights:
            lay.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)
                             for w in lay.get_weights()])


def _same_features(model, loaded, size):
    x = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype("float32")
    want = image_backbone(model)(x, training=False)["pool"]
    got = loaded(x, training=False)["pool"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["tiny", "resnet50"])
def test_classifier_backbone_reloads_through_backbone_weights(tmp_path, arch):
    model = build_classifier(arch, 2, 64)
    _scramble(model, 0)
    out = str(tmp_path / f"{arch}.weights.h5")
    assert backbone_weights.write_backbone_weights(model, out) == arch
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]
    _same_features(model, build_backbone(arch, weights=out), 64)
    fresh = build_backbone(arch)  # and differs from a fresh backbone
    x = np.ones((1, 64, 64, 3), "float32")
    assert not np.allclose(np.asarray(fresh(x)["pool"]),
                           np.asarray(image_backbone(model)(x)["pool"]), atol=1e-3)


def test_drenet_starts_from_a_classifier_backbone(tmp_path):
    """The use it exists for: DRENet built with --backbone_weights from a classifier."""
    model = build_classifier("tiny", 2, 64)
    _scramble(model, 2)
    out = str(tmp_path / "tiny.weights.h5")
    backbone_weights.write_backbone_weights(model, out)
    dre = build_drenet(2, input_size=64, backbone="tiny", weights=out)
    _same_features(model, image_backbone(dre), 64)


def test_drenet_image_backbone_is_the_one_written(tmp_path):
    dre = build_drenet(2, input_size=64, backbone="tiny")
    _scramble(dre, 3)
    out = str(tmp_path / "d.weights.h5")
    backbone_weights.write_backbone_weights(dre, out)
    _same_features(dre, build_backbone("tiny", weights=out), 64)


def test_cli_one_line_errors(tmp_path):
    script = os.path.join(ROOT, "bench", "backbone_weights.py")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # a user's
    run = subprocess.run([sys.executable, script, f"--model={tmp_path}/none.keras",
                          f"--output={tmp_path}/x.weights.h5"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert run.stderr.startswith("backbone_weights: error: No model file") and \
        "none.keras" in run.stderr
    assert not os.path.exists(tmp_path / "x.weights.h5")
    with pytest.raises(ValueError, match="must end in .weights.h5"):
        backbone_weights.write_backbone_weights(build_classifier("tiny", 2, 64),
                                                str(tmp_path / "x.h5"))
