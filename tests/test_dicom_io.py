"""DICOM reading on series the tests write with pydicom (data_prep.phantom)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from data_prep import dicom_io, phantom
from data_prep.errors import StudyError
from data_prep.lung import lung_mask_hu
from data_prep.preprocess import sample_indices

MATRIX = 64
SPACING = 350.0 / MATRIX


def _headers(folder):
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    headers, issues = dicom_io.read_headers(paths, "s")
    assert not issues
    return headers


@pytest.mark.parametrize("intercept", [-1024.0, 0.0])
def test_order_by_position_and_hu(tmp_path, intercept):
    paths = phantom.write_series(tmp_path, kind="covid", num_slices=12, matrix=MATRIX,
                                 rescale_intercept=intercept, pixel_spacing_mm=SPACING, seed=2)
    series = dicom_io.choose_series(_headers(tmp_path), "s", min_slices=5)
    # write_series returns superior first; ascending position along the normal is inferior
    # first (z decreases head to feet): our order is exactly the reverse, whatever the names.
    assert [h.path for h in series.slices] == [str(p) for p in reversed(paths)]
    assert np.all(np.diff(series.positions_mm) > 0)
    vol = phantom.make_volume_hu("covid", num_slices=12, matrix=MATRIX, seed=2)
    hu, warnings = dicom_io.read_hu(series.slices[0], "s")
    assert not warnings
    np.testing.assert_allclose(hu, np.clip(vol[-1], -1024, 3071), atol=1.0)


def test_compressed_rle_decodes_like_uncompressed(tmp_path):
    paths = phantom.write_series(tmp_path, kind="normal", num_slices=6, matrix=MATRIX, seed=1)
    plain, _ = dicom_io.read_hu(dicom_io.read_header(paths[0]), "s")
    ds = pydicom.dcmread(paths[0])
    ds.compress(RLELossless)
    ds.save_as(paths[0], enforce_file_format=True)
    header = dicom_io.read_header(paths[0])
    assert header.transfer_syntax == RLELossless
    rle, _ = dicom_io.read_hu(header, "s")
    np.testing.assert_array_equal(rle, plain)


def test_coronal_series_is_rejected(tmp_path):
    phantom.write_series(tmp_path, kind="normal", num_slices=10, matrix=MATRIX,
                         orientation="coronal")
    with pytest.raises(StudyError) as err:
        dicom_io.choose_series(_headers(tmp_path), "s", min_slices=5)
    assert err.value.reason == "non_axial"


def test_not_dicom_and_truncated_header(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    paths = phantom.write_series(tmp_path / "s", num_slices=3, matrix=MATRIX)
    (tmp_path / "cut.dcm").write_bytes(paths[0].read_bytes()[:200])
    _, issues = dicom_io.read_headers([str(tmp_path / "a.txt"), str(tmp_path / "cut.dcm")], "s")
    assert [i.reason for i in issues][0] == "not_dicom"
    assert issues[1].reason in ("truncated_file", "not_dicom")


def test_sample_indices():
    assert sample_indices(300) == [i * 300 // 15 for i in range(15)]
    assert sample_indices(10) == list(range(10))
    mid = sample_indices(300, mode="middle50")
    assert len(mid) == 15 and mid[0] >= 75 and mid[-1] < 225
    with pytest.raises(ValueError, match="Received"):
        sample_indices(10, mode="random")


def test_lung_mask_survives_dense_consolidation():
    """A lung full of consolidation (0..+50 HU) must not vanish from the mask."""
    dense = phantom.make_volume_hu("bacterial", num_slices=20, matrix=128, seed=3,
                                   dense_consolidation=True)
    normal = phantom.make_volume_hu("bacterial", num_slices=20, matrix=128, seed=3)
    spacing = 350.0 / 128
    for z in (8, 10, 12):
        full = lung_mask_hu(normal[z], spacing).sum()
        got = lung_mask_hu(dense[z], spacing).sum()
        assert got > 0.7 * full, (z, got, full)
        assert (np.abs(dense[z] - normal[z]) > 100).sum() > 0.2 * full  # really consolidated
