"""--folds: the ensemble is refused, in one line, when its members are mixed (cross_validation
.check_members): a fold trained on other data than its fold folder holds, or a member that is
another model than fold 0's. Fake fold runs (run_info.json, a tiny saved classifier, a fold
data manifest): no training."""

from __future__ import annotations

import json
import shutil

import pytest

from covid_keras.core import files
from covid_keras.io.run_dir import RunDir
from covid_keras.model import saving
from covid_keras.model.baselines import build_classifier
from covid_keras.training import cross_validation


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny saved classifier at each input size (built once: copied into the fold runs)."""
    out = {}
    for size in (32, 64):
        out[size] = str(tmp_path_factory.mktemp("models") / f"c{size}.keras")
        saving.save_model(build_classifier("tiny", 2, size), out[size], ["non_covid", "covid"])
    return out


def _fold(run: RunDir, k: int, model: str, trained_on: str | None = None) -> None:
    data_dir = run.fold_data_dir(k)
    files.makedirs(data_dir)
    files.write_json(f"{data_dir}/manifest.json", {"dataset": f"d/fold_{k}", "folds": {"fold": k}})
    sha = files.sha256(f"{data_dir}/manifest.json")
    fold_run = RunDir(run.fold_dir(k))
    files.makedirs(fold_run.path)
    files.write_json(fold_run.run_info_path, {"dataset_manifest_sha256": trained_on or sha})
    shutil.copy(model, fold_run.best_path)


@pytest.fixture
def run(tmp_path):
    return RunDir(str(tmp_path / "cv"))


def test_matching_members_pass(run, models):
    for k in range(2):
        _fold(run, k, models[32])
    cross_validation.check_members(run, 2)


def test_a_fold_trained_on_other_data_is_refused(run, models):
    _fold(run, 0, models[32])
    _fold(run, 1, models[32], trained_on="0" * 64)
    with pytest.raises(ValueError, match=r"fold 1 of .* was trained on other data .*--fold=1 "
                                         r"--overwrite"):
        cross_validation.check_members(run, 2)


def test_a_member_of_another_input_size_is_refused(run, models):
    _fold(run, 0, models[32])
    _fold(run, 1, models[64])
    with pytest.raises(ValueError, match=r"fold 1 of .* is another model than fold 0 \(input"
                                         r"_size: 64, fold 0 32\)") as err:
        cross_validation.check_members(run, 2)
    assert "\n" not in str(err.value)
    json.dumps(str(err.value))
