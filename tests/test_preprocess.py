"""prepare_slice and the slice-image normalisation, on phantom slices."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from covid_keras.core.imaging import unit_to_u8, window_hu
from data_prep import phantom, slice_images
from data_prep.pipeline import plan_shards
from data_prep.preprocess import PrepConfig, fill_blank_with_rotated_lung, prepare_slice
from data_prep.study import encode_png

SPACING = 350.0 / 128


@pytest.fixture(scope="module")
def slice_hu():
    return phantom.make_volume_hu("covid", num_slices=20, matrix=128, seed=4)[10]


def test_three_windows_keep_their_channel_order_in_the_png(slice_hu):
    import tensorflow as tf

    cfg = PrepConfig(image_size=64, windows=(("lung", -700, 1500), ("mediastinal", 40, 350),
                                             ("bone", 400, 1800)))
    out = prepare_slice(slice_hu, cfg, pixel_spacing_mm=SPACING)
    assert out.image.shape == (64, 64, 3)
    decoded = tf.io.decode_png(encode_png(out.image)).numpy()
    np.testing.assert_array_equal(decoded, out.image)
    assert out.image[..., 0].mean() > out.image[..., 1].mean()  # lung window is brighter


def test_fill_is_the_same_for_every_split_by_default(slice_hu):
    cfg = PrepConfig(image_size=64)
    val = prepare_slice(slice_hu, cfg, pixel_spacing_mm=SPACING,
                        rng=np.random.default_rng(0))
    train = prepare_slice(slice_hu, cfg, pixel_spacing_mm=SPACING, is_train=True,
                          rng=np.random.default_rng(0))
    outside = val.mask == 0
    assert outside.mean() > 0.2
    assert (val.image[outside] == 0).mean() < 0.1  # blank filled with lung, val too
    np.testing.assert_array_equal(train.image, val.image)
    none = prepare_slice(slice_hu, PrepConfig(image_size=64, fill_blank="none"),
                         pixel_spacing_mm=SPACING, is_train=True, rng=np.random.default_rng(0))
    assert np.all(none.image[outside] == 0)


def test_paper_train_only_fill_behind_a_flag(slice_hu):
    cfg = PrepConfig(image_size=64, fill_blank="rotate_train")
    val = prepare_slice(slice_hu, cfg, pixel_spacing_mm=SPACING)
    train = prepare_slice(slice_hu, cfg, pixel_spacing_mm=SPACING, is_train=True,
                          rng=np.random.default_rng(0))
    outside = val.mask == 0
    assert np.all(val.image[outside] == 0)
    assert (train.image[outside] == 0).mean() < 0.1
    np.testing.assert_array_equal(train.mask, val.mask)


def test_fill_never_changes_lung_pixels():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.1, 1.0, (40, 40, 1)).astype(np.float32)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 5:18] = True
    img[~mask] = 0
    out = fill_blank_with_rotated_lung(img, mask, np.random.default_rng(2))
    np.testing.assert_array_equal(out[mask], img[mask])
    assert (out[~mask] == 0).mean() < 0.5


def test_lung_filter_off_keeps_whole_slice():
    air_slice = np.full((64, 64), 40.0, np.float32)
    air_slice[::7, ::5] = 60.0  # soft tissue only: no lung
    assert prepare_slice(air_slice, PrepConfig(image_size=32)) == "low_lung_fraction"
    out = prepare_slice(air_slice, PrepConfig(image_size=32, lung_filter=False))
    assert out.image.shape == (32, 32, 1) and out.image.max() > 0


def test_constant_image_dropped():
    assert prepare_slice(np.zeros((32, 32), np.float32), PrepConfig(image_size=32)) == \
        "constant_image"


def test_every_source_format_gives_one_representation(tmp_path, slice_hu):
    """Grey PNG, RGB PNG, opaque RGBA PNG, 16-bit PNG and a PNG re-encoded behind a .jpg name
    all decode to the same grey array (JPEG is lossy: within a few levels)."""
    grey = unit_to_u8(window_hu(slice_hu, -700, 1500))
    variants = {
        "grey.png": grey,
        "rgb.png": np.dstack([grey] * 3),
        "rgba.png": np.dstack([grey] * 3 + [np.full_like(grey, 255)]),
        "deep.png": grey.astype(np.uint16) * 257,
    }
    for name, img in variants.items():
        cv2.imwrite(str(tmp_path / name), img)
    (tmp_path / "png_named.jpg").write_bytes((tmp_path / "grey.png").read_bytes())
    cv2.imwrite(str(tmp_path / "real.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (tmp_path / "jpeg_named.png").write_bytes((tmp_path / "real.jpg").read_bytes())
    decoded = {p.name: slice_images.read_grey(str(p), "s")[0] for p in tmp_path.iterdir()}
    for name in ("rgb.png", "rgba.png", "deep.png", "png_named.jpg"):
        np.testing.assert_array_equal(decoded[name], grey, err_msg=name)
    for name in ("real.jpg", "jpeg_named.png"):
        assert decoded[name].shape == grey.shape and decoded[name].dtype == np.uint8
        assert np.abs(decoded[name].astype(int) - grey).mean() < 3, name
    assert slice_images.sniff((tmp_path / "jpeg_named.png").read_bytes()[:8]) == "jpeg"


def test_rgba_with_transparency_composited_over_black():
    img = np.zeros((4, 4, 4), np.uint8)
    img[..., :3] = 200
    img[..., 3] = 0
    img[0, 0, 3] = 255
    grey, warnings = slice_images.to_grey_u8(img, "f.png", "s")
    assert grey[0, 0] == 200 and grey[1, 1] == 0
    assert [w.reason for w in warnings] == ["rgba_image"]


def test_plan_shards_balanced_and_deterministic():
    sizes = {f"s{i:02d}": 1_000_000 + 37_000 * (i % 7) for i in range(40)}
    shards = plan_shards(sizes, shard_size_mb=5)
    assert len(shards) == 9
    loads = [sum(sizes[k] for k in s) for s in shards]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert sorted(k for s in shards for k in s) == sorted(sizes)
    assert shards == plan_shards(dict(reversed(list(sizes.items()))), shard_size_mb=5)


def test_plan_shards_orders_ties_and_each_shard_by_the_given_order():
    """``order`` (data_prep: each study's salt-free content digest) decides which of two
    equal-sized studies goes first, so into which shard, and each shard's order, whatever
    the items' own names (salted keys, another in each build)."""
    sizes = {"k1": 10, "k2": 10, "k3": 10, "k4": 10}
    names = {"k1": "d", "k2": "a", "k3": "c", "k4": "b"}  # k -> content digest
    shards = plan_shards(sizes, shard_size_mb=20 / 1024 / 1024, order=names)
    assert [[names[k] for k in s] for s in shards] == [["a", "c"], ["b", "d"]]
    # another salt: other keys, in the other order (by name: z1 = d ... z4 = a)
    other = {"a": "z4", "b": "z3", "c": "z2", "d": "z1"}
    again = plan_shards({other[d]: 10 for d in "abcd"}, shard_size_mb=20 / 1024 / 1024,
                        order={other[d]: d for d in "abcd"})
    assert again == [["z4", "z2"], ["z3", "z1"]]  # a, c | b, d again
    assert plan_shards(sizes, shard_size_mb=20 / 1024 / 1024) == [["k1", "k3"], ["k2", "k4"]]


def test_lung_mask_raises_no_numpy_warning_on_a_real_slice(shared_data):
    """A COVID-CT slice whose closed air region holds no raw air pixel (the median of an
    empty selection warned 'Mean of empty slice'; warnings are errors here)."""
    from covid_keras.core.imaging import grey_to_hu
    from tests.conftest import shared_subdir

    folder = shared_subdir(shared_data, "covid_ct")
    path = folder / "train" / "COVID" / "2020.03.03.20030775-p12-93%1.png"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    grey, _ = slice_images.read_grey(str(path), "s")
    cfg = PrepConfig(image_size=64, lung_filter=False, crop_to_lung=False)
    # as data_prep.study does for slice images (no real HU)
    cfg = dataclasses.replace(cfg, lung=dataclasses.replace(cfg.lung,
                                                            gas_median_hu=-float("inf")))
    out = prepare_slice(grey_to_hu(grey, -700.0, 1500.0), cfg)
    assert not isinstance(out, str)
