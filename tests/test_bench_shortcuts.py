"""bench/shortcuts.py: whole-image statistics and the train-fitted shortcut model."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def shortcuts(bench_script):
    return bench_script("shortcuts")


def _images(rng, labels, bright: bool):
    """Noise slices; with ``bright`` the positives carry a saturated corner (a source's
    mark, no anatomy)."""
    x = rng.integers(20, 200, (len(labels), 32, 32), dtype=np.uint8)
    if bright:
        x[np.asarray(labels) == 1, :6, :6] = 255
    return x


def test_statistics_read_what_they_name(shortcuts):
    x = np.zeros((2, 8, 8, 3), np.uint8)
    x[1] = 255
    x[1, :4] = 100  # half grey, half saturated
    s = shortcuts.statistics(x)
    assert set(s) == set(shortcuts.STATISTICS)
    np.testing.assert_allclose(s["black"], [1.0, 0.0])
    np.testing.assert_allclose(s["saturated"], [0.0, 0.5])
    np.testing.assert_allclose(s["mean"], [0.0, 177.5])
    assert s["sharpness"][0] == 0 and s["std"][1] > 0


def test_a_source_mark_is_found_and_noise_is_not(shortcuts):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.tile([0, 1], 20), 2)  # 40 patients of two slices each
    keys = [f"p{i // 2}" for i in range(len(labels))]

    def table(bright):
        return {split: (np.stack([shortcuts.statistics(_images(rng, labels, bright))[k]
                                  for k in shortcuts.STATISTICS], axis=1), labels, keys)
                for split in ("train", "test")}

    marked = shortcuts.shortcut_aucs(table(True))
    assert marked["test"]["statistic_slice_auc"]["saturated"] == 1.0
    assert marked["test"]["logistic_slice_auc"] > 0.95
    assert marked["test"]["patients"] == 40 and marked["test"]["slices"] == 80
    plain = shortcuts.shortcut_aucs(table(False))
    assert 0.25 < plain["test"]["logistic_patient_auc"] < 0.75
    with pytest.raises(ValueError, match="no train split"):
        shortcuts.shortcut_aucs({"test": table(True)["test"]})


def test_split_table_streams_every_split_of_a_data_folder(shortcuts, tmp_path):
    """Records as data_prep writes them: one row of statistics per record, in record
    order, beside its label and patient; the COVID slices' bright lesion shows in the
    mean brightness on every split."""
    from tests.helpers import write_dataset

    folder = write_dataset(tmp_path / "tfrecords", {"train": 6, "val": 4, "test": 4})
    table = shortcuts.split_table(str(folder), 64)
    assert list(table) == ["train", "val", "test"]
    for split, n in (("train", 6), ("val", 4), ("test", 4)):
        feats, labels, keys = table[split]
        assert feats.shape == (2 * n * 3, len(shortcuts.STATISTICS))
        assert len(labels) == len(keys) == len(feats) and len(set(keys)) == 2 * n
    res = shortcuts.shortcut_aucs(table)
    for split in table:
        assert res[split]["statistic_slice_auc"]["mean"] == 1.0
        assert res[split]["statistic_slice_auc"]["saturated"] == 0.5  # lesions are 240


def test_the_command_prints_a_result_and_no_tensorflow_notices(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import assert_no_tf_notices, user_env, write_dataset

    folder = write_dataset(tmp_path / "tfrecords", {"train": 6, "val": 4, "test": 4})
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/shortcuts.py", f"--data_dir={folder}",
                           "--input_size=64"], cwd=repo, env=user_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(result) == 1 and json.loads(result[0][7:])["splits"]["val"]
    assert_no_tf_notices(proc.stderr)
