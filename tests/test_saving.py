"""covid_keras.saving: a saved model loads in a fresh process with its class names and
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
                  "logits": np.asarray(out["logits"]).tolist()}))
"""


@pytest.mark.parametrize("kind", ["drenet", "classifier"])
def test_saved_model_loads_in_a_fresh_process_with_its_info(kind, tmp_path):
    from covid_keras import build_classifier, build_drenet, saving

    if kind == "drenet":
        model = build_drenet(3, input_size=64, backbone="tiny")
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
    expected = np.asarray(model.predict(x, verbose=0)["logits"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(path), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["info"]["class_names"] == classes
    assert got["info"]["preprocessing"] == "tf" and got["info"]["backbone"] == "tiny"
    assert got["info"]["input_size"] == 64 and got["info"]["model"] == kind
    np.testing.assert_allclose(np.asarray(got["logits"]), expected, atol=1e-4)


def test_class_names_must_match_the_outputs(tmp_path):
    from covid_keras import build_classifier, saving

    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        saving.save_model(build_classifier("tiny", 3, 64), str(tmp_path / "m.keras"),
                          ["a", "b"])
