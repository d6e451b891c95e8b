"""Tests for data_prep.phantom, the seeded synthetic (not real patients) chest CT generator."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from data_prep import phantom

REPO = Path(__file__).resolve().parents[1]
N_SLICES = 24
MATRIX = 64


def _body_mask(sl: np.ndarray) -> np.ndarray:
    """Filled outline of everything denser than -500 HU (the body, lungs included)."""
    m = (sl > -500).astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(m)
    cv2.drawContours(out, contours, -1, 1, -1)
    return out.astype(bool)


def _thorax_slice(n: int, u: float) -> int:
    """Index of the slice at thoracic position u (0 = apex, 1 = base)."""
    t = phantom.NECK_END + u * (phantom.THORAX_END - phantom.NECK_END)
    return int(round(t * (n - 1)))


def _read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept)


@pytest.fixture(scope="module")
def volumes() -> dict[str, np.ndarray]:
    return {k: phantom.make_volume_hu(k, num_slices=N_SLICES, matrix=MATRIX, seed=1)
            for k in phantom.KINDS}


# ---------------------------------------------------------------------------------------------
# make_volume_hu
# ---------------------------------------------------------------------------------------------


def test_docstring_says_synthetic() -> None:
    doc = phantom.__doc__ or ""
    assert "SYNTHETIC" in doc and "NOT REAL PATIENTS" in doc


def test_volume_shape_dtype_range_and_determinism(volumes: dict[str, np.ndarray]) -> None:
    v = volumes["normal"]
    assert v.shape == (N_SLICES, MATRIX, MATRIX) and v.dtype == np.float32
    assert v.min() >= -1024 and v.max() <= 3071
    again = phantom.make_volume_hu("normal", num_slices=N_SLICES, matrix=MATRIX, seed=1)
    np.testing.assert_array_equal(v, again)
    other = phantom.make_volume_hu("normal", num_slices=N_SLICES, matrix=MATRIX, seed=2)
    assert not np.array_equal(v, other)
    assert v[0, 0, 0] == -1000.0  # air outside the body
    for kind in phantom.KINDS:
        assert not np.isnan(volumes[kind]).any()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        phantom.make_volume_hu("flu", num_slices=4, matrix=32)
    with pytest.raises(ValueError):
        phantom.write_series("/nonexistent-never-created", num_slices=4, matrix=32,
                             orientation="sagittal")


@pytest.mark.parametrize("matrix,num_slices", [(16, 1), (32, 2), (40, 7)])
def test_tiny_shapes_work(matrix: int, num_slices: int) -> None:
    for kind in phantom.KINDS:
        v = phantom.make_volume_hu(kind, num_slices=num_slices, matrix=matrix, seed=3,
                                   dense_consolidation=True)
        assert v.shape == (num_slices, matrix, matrix)


def test_anatomy_lungs_neck_abdomen(volumes: dict[str, np.ndarray]) -> None:
    v = volumes["normal"]
    n = N_SLICES
    # Mid-thorax: two lungs around -850 HU, one in each half of the image.
    mid = v[_thorax_slice(n, 0.5)]
    lung = _body_mask(mid) & (mid < -500)
    assert abs(float(np.median(mid[lung])) + 850) < 40
    half = MATRIX // 2
    assert lung[:, :half].sum() > 0.05 * half * MATRIX
    assert lung[:, half:].sum() > 0.05 * half * MATRIX
    # Lungs are small at the apex and base, largest mid-stack.
    areas = [int((_body_mask(s) & (s < -700)).sum()) for s in v]
    top, base = _thorax_slice(n, 0.05), _thorax_slice(n, 0.95)
    assert areas[top] < areas[_thorax_slice(n, 0.5)] > areas[base]
    # Neck: a small body, only the trachea is air inside it (no lungs).
    neck = v[1]
    body = _body_mask(neck)
    assert 0 < body.sum() < 0.5 * _body_mask(mid).sum()
    air = (neck < -700) & body
    assert 0 < air.sum() < 0.08 * body.sum()
    # Last (upper abdomen) slice: no lung density; liver (+55) on the image left.
    last = v[-1]
    body = _body_mask(last)
    assert ((last < -700) & body).sum() < 0.01 * body.sum()
    left = last[:, : MATRIX // 2][body[:, : MATRIX // 2]]
    assert np.mean((left > 45) & (left < 70)) > 0.2
    # Bone: spine and ribs reach +400...+1000 HU.
    assert ((mid > 400) & (mid < 1100)).sum() > 10


def _lesion_pixels(kind: str, matrix: int = MATRIX, seed: int = 1,
                   dense: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume, normal volume, mask of former lung pixels changed by > 150 HU)."""
    normal = phantom.make_volume_hu("normal", num_slices=N_SLICES, matrix=matrix, seed=seed)
    vol = phantom.make_volume_hu(kind, num_slices=N_SLICES, matrix=matrix, seed=seed,
                                 dense_consolidation=dense)
    return vol, normal, (normal < -700) & (np.abs(vol - normal) > 150)


def test_normal_has_no_lesions(volumes: dict[str, np.ndarray]) -> None:
    # Anatomy, noise and vessels do not depend on the kind: only lesions differ.
    for kind in ("covid", "bacterial", "viral", "tuberculosis"):
        assert not np.array_equal(volumes[kind], volumes["normal"])
        same = volumes[kind] == volumes["normal"]
        assert same.mean() > 0.8


def test_covid_bilateral_peripheral_ground_glass() -> None:
    vol, _, changed = _lesion_pixels("covid")
    ggo = changed & (vol >= -600) & (vol <= -300)
    assert ggo.sum() > 0.6 * changed.sum()
    half = MATRIX // 2
    assert ggo[:, :, :half].sum() >= 30 and ggo[:, :, half:].sum() >= 30  # both lungs
    assert len(np.unique(np.nonzero(ggo)[0])) >= 5  # on many slices
    # Peripheral (covid) vs central (viral): distance from the midline.
    vvol, _, vchanged = _lesion_pixels("viral")
    vggo = vchanged & (vvol >= -700) & (vvol <= -450)
    assert vggo.sum() > 0.6 * vchanged.sum()
    assert vggo[:, :, :half].sum() > 0 and vggo[:, :, half:].sum() > 0
    cols = np.arange(MATRIX) - (MATRIX - 1) / 2
    covid_dist = np.abs(np.broadcast_to(cols, ggo.shape)[ggo]).mean()
    viral_dist = np.abs(np.broadcast_to(cols, vggo.shape)[vggo]).mean()
    assert covid_dist > viral_dist + 2


def test_bacterial_consolidation_present() -> None:
    for seed in (1, 2):
        vol, _, changed = _lesion_pixels("bacterial", seed=seed)
        cons = changed & (vol >= 0) & (vol <= 50)
        assert cons.sum() >= 200
        assert cons.sum() > 0.5 * changed.sum()


def test_every_lung_slice_of_a_diseased_study_shows_its_lesion() -> None:
    # A slice carries its study's label: make demo's slice-level metrics (and any slice
    # classifier) need the lesion on every slice sampled from the lungs. Before the
    # bacterial plan became multilobar, 32 % of its lung slices showed no lesion.
    n, m = 60, 128
    for kind, least in (("bacterial", 1.0), ("covid", 0.9)):
        shown = []
        for seed in range(6):
            normal = phantom.make_volume_hu("normal", num_slices=n, matrix=m, seed=seed)
            vol = phantom.make_volume_hu(kind, num_slices=n, matrix=m, seed=seed)
            for z in sorted({i * n // 15 for i in range(15)}):
                body = _body_mask(normal[z])
                lung = (normal[z] < -700) & body
                if lung.sum() < 0.05 * body.sum():  # data_prep drops such slices
                    continue
                lesion = lung & (np.abs(vol[z] - normal[z]) > 150)
                shown.append(lesion.sum() >= 0.02 * lung.sum())
        assert len(shown) >= 6 * 6
        assert np.mean(shown) >= least, (kind, np.mean(shown))


def test_dense_consolidation_fills_one_lung() -> None:
    n = N_SLICES
    for kind, seed in (("bacterial", 1), ("normal", 4)):
        vol, normal, _ = _lesion_pixels(kind, seed=seed, dense=True)
        zs = range(_thorax_slice(n, 0.5), _thorax_slice(n, 0.9) + 1)
        fractions = []
        for lo, hi in ((0, MATRIX // 2), (MATRIX // 2, MATRIX)):
            lung = np.stack([(normal[z] < -700) & _body_mask(normal[z]) for z in zs])
            lung[:, :, :lo] = False
            lung[:, :, hi:] = False
            sub = vol[list(zs)][lung]
            fractions.append(float(np.mean((sub >= 0) & (sub <= 50))))
        assert max(fractions) > 0.8, fractions  # one lung filled with consolidation
        if kind == "normal":
            assert min(fractions) < 0.05, fractions  # the other lung untouched


def test_tuberculosis_apical_nodules_and_cavities() -> None:
    vol, normal, changed = _lesion_pixels("tuberculosis", matrix=128, seed=1)
    nodules = changed & (vol >= 20) & (vol <= 60)
    assert nodules.sum() >= 10
    cavity_air = (normal < -700) & (vol < -950) & (normal - vol > 60)
    assert cavity_air.sum() >= 5
    z = np.nonzero(changed)[0]
    assert z.max() <= _thorax_slice(N_SLICES, 0.5)  # upper lobes only


# ---------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------

REQUIRED = (
    "SOPClassUID SOPInstanceUID StudyInstanceUID SeriesInstanceUID FrameOfReferenceUID "
    "PatientID PatientName PatientBirthDate PatientSex StudyDate StudyTime SeriesDate "
    "AccessionNumber StudyID ReferringPhysicianName InstitutionName Manufacturer Modality "
    "BodyPartExamined SeriesDescription SeriesNumber InstanceNumber ImageType KVP "
    "SliceThickness SpacingBetweenSlices SliceLocation ImagePositionPatient "
    "ImageOrientationPatient PixelSpacing Rows Columns SamplesPerPixel "
    "PhotometricInterpretation BitsAllocated BitsStored HighBit PixelRepresentation "
    "RescaleIntercept RescaleSlope RescaleType WindowCenter WindowWidth PixelData"
).split()


@pytest.mark.parametrize("intercept", [-1024.0, 0.0])
def test_series_tags_and_hu_roundtrip(tmp_path: Path, intercept: float) -> None:
    paths = phantom.write_series(tmp_path / "s", kind="covid", num_slices=8, matrix=48,
                                 seed=5, rescale_intercept=intercept, file_names="ordered")
    assert len(paths) == 8 and all(p.is_file() for p in paths)
    vol = phantom.make_volume_hu("covid", num_slices=8, matrix=48, seed=5)
    dss = _read_series(paths)
    for i, ds in enumerate(dss):
        missing = [k for k in REQUIRED if k not in ds]
        assert not missing, missing
        meta = ds.file_meta
        assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
        assert ds.InstitutionName == "Phantom Hospital"
        assert ds.Manufacturer == "covid_keras phantom"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(x) for x in ds.PixelSpacing] == [0.7, 0.7]
        assert float(ds.SliceThickness) == 5.0 and float(ds.SpacingBetweenSlices) == 5.0
        assert ds.Rows == 48 and ds.Columns == 48 and ds.SamplesPerPixel == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
        assert ds.RescaleType == "HU" and float(ds.WindowCenter) == -600
        assert float(ds.WindowWidth) == 1500
        assert ds.InstanceNumber == i + 1
        assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
        if intercept == 0.0:
            assert ds.PixelRepresentation == 1 and ds.BitsStored == 16
            assert ds.pixel_array.dtype == np.int16 and ds.pixel_array.min() < 0
        else:
            assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
            assert ds.pixel_array.dtype == np.uint16
        assert ds.HighBit == ds.BitsStored - 1
        assert float(ds.RescaleIntercept) == intercept and float(ds.RescaleSlope) == 1.0
        assert np.abs(_hu(ds) - vol[i]).max() <= 1.0
    assert len({ds.SOPInstanceUID for ds in dss}) == 8
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert len({ds.FrameOfReferenceUID for ds in dss}) == 1
    # Superior first: z decreases with InstanceNumber, as on a real scanner.
    z = [float(ds.ImagePositionPatient[2]) for ds in dss]
    assert all(np.diff(z) == -5.0)
    assert [p.name for p in paths] == sorted(p.name for p in paths) == [
        f"IM{i:04d}.dcm" for i in range(1, 9)]


def test_rescale_slope_and_volume_argument(tmp_path: Path) -> None:
    vol = np.linspace(-1000, 1500, 3 * 20 * 24, dtype=np.float32).reshape(3, 20, 24)
    paths = phantom.write_series(tmp_path, volume_hu=vol, rescale_slope=0.5,
                                 rescale_intercept=-1024.0, file_names="ordered")
    assert len(paths) == 3
    for i, ds in enumerate(_read_series(paths)):
        assert (ds.Rows, ds.Columns) == (20, 24) and ds.PixelRepresentation == 0
        assert ds.BitsStored == 16
        assert np.abs(_hu(ds) - vol[i]).max() <= 0.25 + 1e-6


def test_shuffled_names_need_position_ordering(tmp_path: Path) -> None:
    paths = phantom.write_series(tmp_path, kind="normal", num_slices=10, matrix=32, seed=2)
    names = [p.name for p in paths]  # returned in slice order
    assert sorted(names) != names
    assert any(not n.endswith(".dcm") for n in names)
    assert any(n.endswith(".dcm") for n in names)
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    dss = [pydicom.dcmread(tmp_path / n) for n in sorted(os.listdir(tmp_path))]
    by_position = sorted(dss, key=lambda d: -float(d.ImagePositionPatient[2]))
    assert [d.InstanceNumber for d in by_position] == list(range(1, 11))
    assert [d.InstanceNumber for d in dss] != list(range(1, 11))


def test_write_series_deterministic(tmp_path: Path) -> None:
    kw = dict(kind="bacterial", num_slices=6, matrix=32, seed=7)
    a = phantom.write_series(tmp_path / "a", **kw)
    b = phantom.write_series(tmp_path / "b", **kw)
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    c = phantom.write_series(tmp_path / "c", **{**kw, "seed": 8})
    pix_a = [pydicom.dcmread(p).pixel_array for p in a]
    pix_c = [pydicom.dcmread(p).pixel_array for p in c]
    assert any(not np.array_equal(x, y) for x, y in zip(pix_a, pix_c))
    ds_a, ds_c = pydicom.dcmread(a[0]), pydicom.dcmread(c[0])
    assert ds_a.StudyInstanceUID != ds_c.StudyInstanceUID
    # Same patient and seed, other kind: other images, so other study / SOP instance UIDs.
    d = phantom.write_series(tmp_path / "d", **{**kw, "kind": "normal"})
    ds_d = pydicom.dcmread(d[0])
    assert ds_d.PatientID == ds_a.PatientID
    assert ds_d.StudyInstanceUID != ds_a.StudyInstanceUID
    assert ds_d.SOPInstanceUID != ds_a.SOPInstanceUID


def test_coronal_series(tmp_path: Path) -> None:
    paths = phantom.write_series(tmp_path, kind="normal", num_slices=6, matrix=32, seed=0,
                                 orientation="coronal")
    assert len(paths) == 32
    dss = _read_series(paths)
    vol = phantom.make_volume_hu("normal", num_slices=6, matrix=32, seed=0)
    for j, ds in enumerate(dss):
        assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
        assert (ds.Rows, ds.Columns) == (6, 32)
        assert np.abs(_hu(ds) - vol[:, j, :]).max() <= 1.0
    y = [float(ds.ImagePositionPatient[1]) for ds in dss]
    assert all(np.diff(y) > 0)


def test_localizer_and_study(tmp_path: Path) -> None:
    scout = phantom.write_localizer(tmp_path / "scout_only", matrix=32, seed=1)
    ds = pydicom.dcmread(scout)
    assert scout.name == "scout.dcm"
    assert "LOCALIZER" in list(ds.ImageType)
    assert (ds.Rows, ds.Columns) == (32, 32)

    study = phantom.write_study(tmp_path / "study", kind="covid", num_slices=5, matrix=32,
                                seed=1, with_localizer=True, patient_id="P-1")
    assert study == tmp_path / "study"
    dss = [pydicom.dcmread(p) for p in sorted(study.iterdir())]
    assert len(dss) == 6
    assert len({d.StudyInstanceUID for d in dss}) == 1
    assert len({d.SeriesInstanceUID for d in dss}) == 2
    assert len({d.FrameOfReferenceUID for d in dss}) == 1
    assert {d.PatientID for d in dss} == {"P-1"}
    assert sum("LOCALIZER" in list(d.ImageType) for d in dss) == 1


def test_dataset_folders(tmp_path: Path) -> None:
    root = phantom.write_dataset(tmp_path / "ds", kinds=("normal", "covid"),
                                 patients_per_kind=3, num_slices=4, matrix=32, seed=0)
    assert root == tmp_path / "ds"
    assert sorted(p.name for p in root.iterdir()) == ["covid", "normal"]
    patients: dict[str, set[tuple[str, str]]] = {}
    for kind in ("normal", "covid"):
        studies = sorted((root / kind).iterdir())
        assert len(studies) == 4  # 3 patients, the 3rd one with two studies
        for study in studies:
            files = list(study.iterdir())
            assert len(files) == 4
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            assert ds.PatientID.startswith(f"PHANTOM-{kind}-")
            patients.setdefault(ds.PatientID, set()).add((ds.StudyInstanceUID, ds.StudyDate))
    assert len(patients) == 6
    # folders are never named after the patient id or the study date (issue 9)
    for study in root.glob("*/*"):
        ds = pydicom.dcmread(next(study.iterdir()), stop_before_pixels=True)
        assert ds.PatientID not in study.name and ds.StudyDate not in study.name, study.name
        assert study.name.startswith("study_")
    two = {pid: s for pid, s in patients.items() if len(s) == 2}
    assert sorted(two) == ["PHANTOM-covid-003", "PHANTOM-normal-003"]
    for studies in two.values():
        (uid1, date1), (uid2, date2) = sorted(studies)
        assert uid1 != uid2 and date1 != date2


def test_dataset_manifest(tmp_path: Path) -> None:
    manifest = phantom.write_dataset(tmp_path / "ds", kinds=("normal", "bacterial", "viral"),
                                     patients_per_kind=2, num_slices=3, matrix=32, seed=4,
                                     layout="manifest")
    assert manifest == tmp_path / "ds" / "manifest.csv"
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["study_path", "label", "patient_id", "site", "split"]
        rows = list(reader)
    assert len(rows) == 6
    assert [r["label"] for r in rows] == ["normal"] * 2 + ["bacterial"] * 2 + ["viral"] * 2
    assert len({r["patient_id"] for r in rows}) == 6
    assert [r["site"] for r in rows] == ["site_a", "site_b"] * 3
    assert all(r["split"] == "" for r in rows)
    for r in rows:
        study = manifest.parent / r["study_path"]
        assert r["study_path"].startswith("studies/") and study.is_dir()
        files = list(study.iterdir())
        assert len(files) == 3
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.PatientID == r["patient_id"]


def test_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "data_prep.phantom", f"--output_dir={tmp_path / 'cli'}",
         "--kinds=normal,tuberculosis", "--patients_per_kind=1", "--num_slices=3",
         "--matrix=32", "--seed=3", "--layout=manifest"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "SYNTHETIC" in out.stdout
    assert (tmp_path / "cli" / "manifest.csv").is_file()
    assert len(list((tmp_path / "cli" / "studies").iterdir())) == 2
    assert "normal: 1 studies" in out.stdout and "tuberculosis: 1 studies" in out.stdout
