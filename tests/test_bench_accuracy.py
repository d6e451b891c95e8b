"""bench/accuracy.py's own arithmetic (no training): the paired-by-seed comparison."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import accuracy  # noqa: E402


def run(seed, val, test):
    return {"seed": seed, "val": {"patient_auc": val}, "test": {"patient_auc": test}}


def test_paired_differences_match_seeds_and_skip_missing_ones():
    models = {"r50": {"runs": [run(0, 0.7, 0.6), run(1, 0.8, 0.9), run(2, 0.6, 0.5)]},
              "dre": {"runs": [run(1, 0.9, 0.7), run(0, 0.8, 0.8), run(3, 0.5, 0.5),
                               run(2, float("nan"), 0.75)]}}
    out = accuracy.paired(models, ["test"])["dre - r50"]
    assert out["test"]["seeds"] == [1, 0, 2]  # seed 3: no ResNet-50 run to pair with
    assert out["test"]["diffs"] == pytest.approx([-0.2, 0.2, 0.25])
    assert out["test"]["mean"] == pytest.approx(0.25 / 3)
    assert out["test"]["sd"] == pytest.approx(math.sqrt(
        sum((d - 0.25 / 3) ** 2 for d in (-0.2, 0.2, 0.25)) / 2))
    assert out["test"]["wins"] == 2 and out["test"]["n"] == 3
    assert out["val"]["seeds"] == [1, 0]  # seed 2's val is nan
    assert accuracy.paired({"r50": models["r50"]}, ["test"]) == {}
