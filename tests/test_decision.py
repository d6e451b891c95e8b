"""covid_keras.evaluation.decision: the Decision dataclass and decision.json, the rule in words, and
the one-way imports of the evaluation modules."""

import json
import subprocess
import sys

import numpy as np
import pytest

from covid_keras.evaluation import decision as dec


def _file(tmp_path, **over):
    d = {"rule": "any", "threshold": 0.4, "positive_class": "covid",
         "classes": ["normal", "covid", "cap"], "criterion": "youden_j",
         "criterion_value": 0.8, "split": "val", "checkpoint": "best.keras"}
    d.update(over)
    (tmp_path / "decision.json").write_text(json.dumps(d))
    return d


def test_decision_round_trip_keeps_every_key(tmp_path):
    written = _file(tmp_path, normal_class="normal")
    d = dec.Decision.read(str(tmp_path / "decision.json"))
    assert (d.rule, d.threshold, d.positive_class, d.normal_class, d.split) == (
        "any", 0.4, "covid", "normal", "val")
    assert d.extra == {"criterion_value": 0.8, "checkpoint": "best.keras"}
    assert d.to_dict() == written
    d.write(str(tmp_path / "again" / "decision.json"))
    assert json.loads((tmp_path / "again" / "decision.json").read_text()) == written
    assert dec.read_decision(str(tmp_path)) == written
    assert "normal only if every slice is normal" in d.text()


def test_old_files_get_the_normal_class_inferred_and_bad_ones_fail(tmp_path):
    _file(tmp_path)  # no normal_class: written before it existed
    assert dec.read_decision(str(tmp_path))["normal_class"] == "normal"
    assert dec.read_decision(str(tmp_path / "none")) is None
    _file(tmp_path, rule="median")
    with pytest.raises(ValueError, match=r"decision.json: rule must be one of"):
        dec.read_decision(str(tmp_path))
    _file(tmp_path, normal_class="covid")
    with pytest.raises(ValueError, match="is the positive class"):
        dec.read_decision(str(tmp_path))
    (tmp_path / "decision.json").write_text('{"rule": "mean"}')
    with pytest.raises(ValueError, match="has no 'threshold'"):
        dec.read_decision(str(tmp_path))


def test_choose_decision_auc_is_scikit_learns():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1], size=40)
    labels = np.repeat([0, 1], 20)
    keys = [f"p{i // 2}" for i in range(40)]
    d = dec.choose_decision(probs, labels, keys, ["normal", "covid"])
    pats = dec.aggregate(probs, labels, keys, "mean", 1)
    assert d["per_rule"]["mean"]["auc"] == pytest.approx(
        roc_auc_score(pats.labels == 1, pats.score))
    assert dec.Decision.from_dict({**d, "split": "val"}).to_dict()["threshold"] == d[
        "threshold"]


def test_the_evaluation_modules_import_one_way():
    """decision, metrics and report never import evaluation (no cycle), and none of them
    imports TensorFlow."""
    code = ("import sys\n"
            "import covid_keras.evaluation.report, covid_keras.evaluation.metrics,"
            " covid_keras.evaluation.decision\n"
            "bad = [m for m in ('covid_keras.evaluation.evaluation', 'tensorflow')"
            " if m in sys.modules]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
