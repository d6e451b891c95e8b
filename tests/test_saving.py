"""covid_keras.model.saving: a saved model loads in a fresh process with its class names and
input normalisation, with nothing imported by hand first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.model
REPO = Path(__file__).resolve().parents[1]

LOAD = """
import json, sys
import numpy as np
import covid_keras
m = covid_keras.load_model(sys.argv[1])
x = np.load(sys.argv[2])
out = m.predict(x, verbose=0)
print(json.dumps({"info": m.covid_keras_info,
                  "outputs": {k: np.asarray(v).tolist() for k, v in out.items()}}))
"""


@pytest.mark.parametrize("kind", ["drenet", "classifier", "ensemble"])
def test_saved_model_loads_in_a_fresh_process_with_its_info(kind, tmp_path):
    """On the backend of the pass (the JAX pass: saved and reloaded under JAX); an ensemble
    (train --folds' best.keras) of two DRENets, its every output compared."""
    import keras

    from covid_keras import build_classifier, build_drenet
    from covid_keras.model import saving
    from covid_keras.model.ensemble import build_ensemble

    if kind == "drenet":
        model = build_drenet(3, input_size=64, backbone="tiny")
    elif kind == "ensemble":
        members = []
        for seed in (0, 1):
            keras.utils.set_random_seed(seed)
            members.append(build_drenet(3, input_size=64, backbone="tiny"))
        model = build_ensemble(members)
    else:
        model = build_classifier("tiny", 3, 64)
    path = tmp_path / "m.keras"
    classes = ["normal", "covid", "bacterial"]
    saving.save_model(model, str(path), classes)
    assert [p.name for p in tmp_path.iterdir()] == ["m.keras"]  # no temporary left
    with zipfile.ZipFile(path) as z:
        assert saving.INFO_ENTRY in z.namelist()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    expected = model.predict(x, verbose=0)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["info"]["class_names"] == classes
    assert got["info"]["preprocessing"] == "tf" and got["info"]["backbone"] == "tiny"
    assert got["info"]["input_size"] == 64
    assert got["info"]["model"] == ("drenet" if kind == "ensemble" else kind)
    assert got["info"]["members"] == (2 if kind == "ensemble" else 1)
    assert sorted(got["outputs"]) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(got["outputs"][key]), np.asarray(value),
                                   atol=1e-4, err_msg=key)


def test_class_names_must_match_the_outputs(tmp_path):
    from covid_keras import build_classifier
    from covid_keras.model import saving

    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        saving.save_model(build_classifier("tiny", 3, 64), str(tmp_path / "m.keras"),
                          ["a", "b"])


def as_saved_before_the_wings(path: Path) -> set[str]:
    """Rewrites a ``.keras`` file's module paths as the code before the wings (issue 28
    item 7) wrote them: ``drenet``, ``layers.intensity``, ``recipes`` (the coupled
    optimisers)... right under the package; returns the covid_keras modules the file then
    names."""
    import re

    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    text = entries["config.json"].decode()
    text = text.replace('"covid_keras.model.optimizers"', f'"{FLAT}recipes"')
    text = text.replace('"covid_keras.model.', f'"{FLAT}')
    entries["config.json"] = text.encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return set(re.findall(r'"module": "(covid_keras[\w.]*)"', text))


#: The package prefix of the flat layout's modules (spelt so that the wings' rename
#: script leaves the old names here alone).
FLAT = "covid_keras" + "."


def test_a_model_saved_before_the_wings_loads(tmp_path):
    """Keras finds a registered class by its registered name (``covid_keras>DRENet``), not
    by the module path stored beside it: files saved with the flat modules' paths (every
    run folder before the wings) load, a compiled one with its optimiser and its state."""
    import keras

    import covid_keras
    from covid_keras import build_classifier, build_drenet
    from covid_keras.model import saving
    from covid_keras.model.optimizers import build_optimizer
    from covid_keras.training.recipes import make_optimizer

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    classifier = build_classifier("tiny", 2, 64)
    classifier.compile(optimizer=make_optimizer("adam", 1e-4, weight_decay=1e-4),
                       loss="categorical_crossentropy")
    build_optimizer(classifier)
    classifier.fit(x, np.eye(2, dtype="float32"), epochs=1, verbose=0)
    models = {"classifier": classifier, "drenet": build_drenet(3, input_size=64,
                                                                backbone="tiny")}
    named = set()
    for name, model in models.items():
        path = tmp_path / f"{name}.keras"
        saving.save_model(model, str(path), ["a", "b", "c"][:3 if name == "drenet" else 2])
        named |= as_saved_before_the_wings(path)
        loaded = covid_keras.load_model(str(path))
        want, got = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
        if isinstance(want, dict):
            want, got = want["logits"], got["logits"]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
        assert loaded.covid_keras_info["backbone"] == "tiny"
        if name == "classifier":
            assert type(loaded.optimizer).__name__ == "CoupledAdam"
            assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 1
    assert {FLAT + "drenet", FLAT + "layers.intensity", FLAT + "recipes"} <= named
    assert not any(m.startswith("covid_keras.model.") for m in named)
