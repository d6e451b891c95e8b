"""The real public data in ../shared/data (skipped, saying so, when it is absent)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from covid_keras.core import schema
from data_prep import dicom_io, preprocess
from data_prep.errors import StudyError
from tests.conftest import shared_subdir

REPO = Path(__file__).resolve().parents[1]

# COVID-19-NY-SBU axial slices: the README says which show lung and which are abdomen-only.
LUNG_PATIENTS = ("A002304", "A046441", "A048383", "A056642", "A072894")
ABDOMEN_PATIENTS = ("A027284", "A058062")


def _prepare(path: Path):
    h = dicom_io.read_header(path)
    hu, _ = dicom_io.read_hu(h, "real")
    spacing = h.pixel_spacing_mm[0] if h.pixel_spacing_mm else None
    return preprocess.prepare_slice(hu, preprocess.PrepConfig(image_size=128),
                                    pixel_spacing_mm=spacing)


def test_ny_sbu_lung_slices_kept_abdomen_rejected(shared_data):
    root = shared_subdir(shared_data, "ny_sbu_dicom")
    for patient in LUNG_PATIENTS:
        for f in sorted((root / patient / "axial").glob("*.dcm")):
            out = _prepare(f)
            assert not isinstance(out, str), f"{f}: {out}"
            assert 0.12 < out.lung_fraction < 0.35, f
    for patient in ABDOMEN_PATIENTS:
        for f in sorted((root / patient / "axial").glob("*.dcm")):
            assert _prepare(f) == "low_lung_fraction", f


def test_ny_sbu_reformats_are_not_axial(shared_data):
    root = shared_subdir(shared_data, "ny_sbu_dicom")
    files = sorted(root.glob("*/coronal/*.dcm")) + sorted(root.glob("*/sagittal/*.dcm"))
    headers = [dicom_io.read_header(f) for f in files]
    with pytest.raises(StudyError) as err:
        dicom_io.choose_series(headers, "reformats", min_slices=1)
    assert err.value.reason in ("non_axial", "no_usable_series")
    assert "non_axial" in err.value.detail or err.value.reason == "non_axial"


def test_ny_sbu_hu_rescale_both_intercepts(shared_data):
    root = shared_subdir(shared_data, "ny_sbu_dicom")
    for f in (root / "A046441/axial/19001111-045.dcm", root / "A046441/axial/19010101-23.dcm"):
        hu, _ = dicom_io.read_hu(dicom_io.read_header(f), "real")
        assert hu.dtype == np.float32
        air = hu[:20, :20]  # outside the body: air, whatever the intercept
        assert -1024 <= float(np.median(air)) < -900, f


def test_odd_files(shared_data):
    root = shared_subdir(shared_data, "dicom_odd_cases")
    three = sorted((root / "dcmqi_ct-3slice").glob("*.dcm"))
    headers = [dicom_io.read_header(f) for f in reversed(three)]
    with pytest.raises(StudyError) as err:
        dicom_io.choose_series(headers, "3slice", min_slices=8)
    assert err.value.reason == "too_few_slices"
    series = dicom_io.choose_series(headers, "3slice", min_slices=3)
    assert series.positions_mm == sorted(series.positions_mm)
    assert [Path(h.path).name for h in series.slices] == ["03.dcm", "02.dcm", "01.dcm"]
    for f in three:  # lower thorax: lung kept
        assert not isinstance(_prepare(f), str)

    samples = root / "notZaki_DICOMSamples"
    scout = dicom_io.read_header(samples / "CT_JPEG70.dcm")
    with pytest.raises(StudyError) as err:
        dicom_io.choose_series([scout], "scout", min_slices=1)
    assert err.value.reason == "localizer"
    hu, _ = dicom_io.read_hu(scout, "scout")  # JPEG Lossless decodes through pylibjpeg/gdcm
    assert hu.shape == (400, 512)

    headless = dicom_io.read_header(samples / "CT_Implicit_Little_Headless_Retired.dcm")
    hu, warnings = dicom_io.read_hu(headless, "headless")
    assert "missing_transfer_syntax" in {w.reason for w in warnings}
    assert hu.shape == (512, 512) and float(hu.min()) >= -1024
    assert _prepare(samples / "CT_Implicit_Little_Headless_Retired.dcm") == "low_lung_fraction"
    assert _prepare(samples / "CT_Explicit_Little.dcm") == "low_lung_fraction"  # head CT


@pytest.fixture(scope="module")
def covid_ct_records(shared_data, tmp_path_factory, commands):
    root = shared_subdir(shared_data, "covid_ct")
    out = tmp_path_factory.mktemp("covid_ct")
    proc = commands.run(
        "data_prep.build_tfrecords", "--flagfile=configs/data/covid_ct.cfg",
        f"--input={root / 'patients.csv'}", f"--output_dir={out}", "--image_size=64",
        "--workers=2", f"--salt_file={out / 'salt.key'}", cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import tensorflow as tf

    recs = []
    for f in sorted(out.glob("*.tfrecord.gz")):
        recs += [schema.parse(r.numpy()) for r in tf.data.TFRecordDataset(str(f), "GZIP")]
    with open(root / "patients.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    return out, recs, meta


@pytest.mark.slow
def test_covid_ct_keeps_split_and_patients(covid_ct_records):
    out, recs, meta = covid_ct_records
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["studies"]["written"] == len(meta) == len(recs)
    by_split = {s: sum(1 for m in meta if m["split"] == s) for s in ("train", "val")}
    assert {s: sum(r[schema.SPLIT] == s.encode() for r in recs) for s in by_split} == by_split
    n_patients = {s: len({m["patient_id"] for m in meta if m["split"] == s}) for s in by_split}
    got = {s: len({r[schema.PATIENT_KEY] for r in recs if r[schema.SPLIT] == s.encode()})
           for s in by_split}
    assert got == n_patients


@pytest.mark.slow
def test_covid_ct_records_carry_no_trace_of_source_format(covid_ct_records):
    """JPEG only in NonCOVID, RGBA only in COVID: after data_prep every record has the same
    fields, the same PNG encoding, mode, size and dtype, and no name, format or size."""
    out, recs, meta = covid_ct_records
    formats = {(m["format"], m["mode"]) for m in meta}
    assert ("JPEG", "RGB") in formats and ("PNG", "RGBA") in formats  # the data has the leak
    for r in recs:
        assert set(r) == set(schema.FIELD_NAMES)
        assert r[schema.IMAGE].startswith(schema.PNG_SIGNATURE)
        img = cv2.imdecode(np.frombuffer(r[schema.IMAGE], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape == (64, 64) and img.dtype == np.uint8
        assert (r[schema.HEIGHT], r[schema.WIDTH], r[schema.CHANNELS]) == (64, 64, 1)
    raw = b"".join(gzip.decompress(p.read_bytes()) for p in out.glob("*.tfrecord.gz"))
    raw += (out / "manifest.json").read_bytes()
    for needle in (b"JPEG", b"JFIF", b"RGBA", b".jpg", b".png", b"medpix", b"crawled",
                   b"covid_patient", b"Exif"):
        assert needle not in raw, needle
    # PNG chunks other than the image itself (text, colour profile, time) would carry origin.
    for r in recs:
        for chunk in (b"tEXt", b"iTXt", b"zTXt", b"iCCP", b"tIME", b"PLTE"):
            assert chunk not in r[schema.IMAGE]


def test_authors_demo_slices(shared_data, tmp_path, commands):
    root = shared_subdir(shared_data, "sy575_demo")
    manifest = tmp_path / "m.csv"
    rows = ["study_path,label,patient_id"]
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        rows.append(f"{d},{'covid' if '_COVID' in d.name else 'bacterial'},{d.name}")
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = commands.run(
        "data_prep.build_tfrecords", "--flagfile=configs/data/sy575_demo.cfg",
        f"--input={manifest}", f"--output_dir={out}", "--image_size=64", "--workers=1",
        f"--salt_file={tmp_path / 'salt'}", cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["studies"]["written"] == 4
    assert m["slices"]["sampled"] == 48 and m["slices"]["kept"] >= 40
