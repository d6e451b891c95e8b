"""bench/intensity.py: trained models' AUC under brightness changes of the images."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def intensity(bench_script):
    return bench_script("intensity")


def test_changed_images_scale_clip_and_match_the_means(intensity):
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[0] = 100
    x[1, :2] = 200  # mean 100 too, half black
    x[1, 2:] = 0
    out = intensity.changed_images(x, [0.5, 1.5])
    assert set(out) == {"x0.5", "x1.5", "matched"}
    assert out["x0.5"][0, 0, 0, 0] == 50 and out["x1.5"][1, 0, 0, 0] == 255  # clipped
    assert np.all(out["x1.5"][1, 2:] == 0)  # black stays black
    dim = x.copy()
    dim[0] = 50  # means 50 and 100 -> both to 75
    m = intensity.changed_images(dim, [])["matched"].astype(float)
    np.testing.assert_allclose(m.mean(axis=(1, 2, 3)), [75.0, 75.0], atol=0.5)


def test_a_brightness_reader_loses_everything_when_the_means_are_matched(intensity):
    # Positives are brighter copies of the negatives' pattern: a model that reads the mean
    # brightness separates them perfectly, keeps doing so under a global factor, and is
    # left with ties (AUC 0.5) once every image has the same mean.
    rng = np.random.default_rng(0)
    pattern = rng.integers(10, 120, (8, 16, 16, 3)).astype(np.float32)
    labels = np.array([0, 1] * 4)
    images = np.where(labels[:, None, None, None] == 1, pattern * 1.5, pattern)
    images = images.astype(np.uint8)

    def brightness_reader(u8):
        m = u8.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
        return np.stack([1 - m, m], axis=1)

    keys = [f"p{i}" for i in range(8)]
    res = intensity.sensitivity(brightness_reader, images, labels, keys, 1, [0.8])
    assert res["changes"]["x1"]["slice_auc"] == 1.0
    assert res["changes"]["x0.8"]["slice_auc"] == 1.0
    assert res["changes"]["matched"]["slice_auc"] == pytest.approx(0.5, abs=0.15)
    assert res["max_move"] >= 0.35


def test_a_per_image_normalised_model_does_not_move(intensity, tmp_path):
    import keras

    from covid_keras.model.baselines import build_classifier
    from tests.helpers import write_dataset

    folder = write_dataset(tmp_path / "tfrecords", {"train": 2, "val": 2, "test": 4})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keras.utils.set_random_seed(0)
    build_classifier("tiny", 2, 64, input_norm="per_image").save(run_dir / "best.keras")
    (run_dir / "run_info.json").write_text(json.dumps({
        "flags": {"backbone": "tiny", "input_size": 64, "input_norm": "per_image"},
        "classes": ["non_covid", "covid"]}))
    out = tmp_path / "res.json"
    assert intensity.main([f"--data_dir={folder}", f"--runs={run_dir}", "--split=test",
                           "--factors=0.6,0.8", f"--output_json={out}"]) == 0
    res = json.loads(out.read_text())["runs"][str(run_dir)]
    assert set(res["changes"]) == {"x0.6", "x0.8", "x1", "matched"}
    assert res["input_norm"] == "per_image"
    assert res["max_move"] <= 0.05  # only rounding to uint8 moves it
    with pytest.raises(SystemExit):
        intensity.main([f"--data_dir={folder}", f"--runs={tmp_path}"])  # no best.keras
