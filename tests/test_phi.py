"""Issue 9: nothing planted in the input appears downstream.

Distinctive names, ids, dates, descriptions and UIDs are planted in every DICOM tag that can
hold them, in folder and file names, and in manifest cells; build_tfrecords runs (two
workers); every output file (shards decompressed) and everything it printed are searched.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from covid_keras.core import schema
from data_prep import phantom
from tests.helpers import MATRIX, REPO, SPACING, failures, read_records, shared_commands

SLICES = 12
NAME_FAMILY, NAME_GIVEN = "Zqxvonk", "Wylbertha"
PATIENT_ID = "PHIID8842913"
DATE = "19230817"
UID_DIGITS = "9412837465"  # inside every planted (valid) UID
BAD_UID_WORD = "PHIUIDQXZ"  # inside planted invalid UIDs (pydicom warns, quoting them)
TEXT = "Qxzlandia"  # descriptions, institution, comments
PLANTED = (NAME_FAMILY, NAME_GIVEN, PATIENT_ID, DATE, "1923-08-17", UID_DIGITS, BAD_UID_WORD,
           TEXT, "PHIMODQXZ")

TEXT_TAGS = {
    "PatientName": f"{NAME_FAMILY}^{NAME_GIVEN}",
    "PatientID": PATIENT_ID,
    "OtherPatientIDs": PATIENT_ID,
    "PatientBirthDate": DATE,
    "StudyDate": DATE, "SeriesDate": DATE, "AcquisitionDate": DATE, "ContentDate": DATE,
    "AccessionNumber": PATIENT_ID[:16],
    "StudyID": PATIENT_ID[:16],
    "StudyDescription": f"{TEXT} {NAME_FAMILY}",
    "SeriesDescription": f"{NAME_FAMILY} {DATE} {TEXT}",
    "ProtocolName": f"{TEXT} protocol",
    "InstitutionName": f"{TEXT} Hospital",
    "InstitutionAddress": f"1 {TEXT} Road",
    "ReferringPhysicianName": f"{NAME_FAMILY}^Doctor",
    "PerformingPhysicianName": f"{NAME_FAMILY}^Doctor",
    "OperatorsName": f"{NAME_FAMILY}^Operator",
    "StationName": TEXT,
    "DeviceSerialNumber": PATIENT_ID,
    "PatientAddress": f"2 {TEXT} Street",
    "PatientComments": f"{NAME_GIVEN} {PATIENT_ID}",
    "ImageComments": f"{NAME_GIVEN} {DATE}",
    "AdditionalPatientHistory": f"{NAME_GIVEN}",
    "RequestingPhysician": f"{NAME_FAMILY}^Req",
    # numbers can hold a date too
    "SeriesNumber": int(DATE), "AcquisitionNumber": int(DATE), "SliceLocation": DATE,
}


def plant(paths: list[Path], *, invalid_uids: bool = False, **overrides: str) -> None:
    """Writes the planted values into every file of a series (UIDs: one study / series /
    frame of reference, one SOP per file)."""
    s = pydicom.config.settings
    old = s.reading_validation_mode, s.writing_validation_mode
    s.reading_validation_mode = s.writing_validation_mode = pydicom.config.IGNORE
    root = f"1.2.826.0.1.3680043.{UID_DIGITS}"
    tag = "".join(str(ord(c) % 10) for c in str(paths[0].parent.name))[:8]
    try:
        for i, p in enumerate(sorted(paths)):
            ds = pydicom.dcmread(p)
            for kw, value in {**TEXT_TAGS, **overrides}.items():
                setattr(ds, kw, value)
            if invalid_uids:
                study, series = f"1.2.{BAD_UID_WORD}.1", f"1.2.{BAD_UID_WORD}.2.{tag}"
                sop, frame = f"1.2.{BAD_UID_WORD}.3.{tag}.{i}", f"1.2.{BAD_UID_WORD}.4"
            else:
                study, series = f"{root}.1.{tag}", f"{root}.2.{tag}"
                sop, frame = f"{root}.3.{tag}.{i}", f"{root}.4.{tag}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.FrameOfReferenceUID = frame
            ds.save_as(p, enforce_file_format=True)
    finally:
        s.reading_validation_mode, s.writing_validation_mode = old


def phi_series(folder: Path, seed: int, **kw) -> list[Path]:
    """A planted series whose files are named after the patient too."""
    paths = phantom.write_series(folder, kind=kw.pop("kind", "covid"), seed=seed,
                                 num_slices=kw.pop("num_slices", SLICES), matrix=MATRIX,
                                 pixel_spacing_mm=SPACING, slice_thickness_mm=300.0 / SLICES,
                                 **{k: v for k, v in kw.items() if k in ("modality",)})
    renamed = []
    for i, p in enumerate(sorted(paths)):
        q = p.with_name(f"{NAME_FAMILY}_{PATIENT_ID}_{DATE}_{i:03d}.dcm")
        p.rename(q)
        renamed.append(q)
    return renamed


def run_cli_bytes(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m data_prep.build_tfrecords ARGS`` with its raw stdout and stderr bytes, as
    a fork of the command server (no interpreter start; its workers are still spawned)."""
    return shared_commands().run("data_prep.build_tfrecords", *args, cwd=REPO,
                                 env={"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=timeout,
                                 binary=True)


def downstream_bytes(out: Path, proc: subprocess.CompletedProcess) -> dict[str, bytes]:
    """Every output file (gzip shards decompressed) and what the run printed."""
    blobs = {"stdout": proc.stdout, "stderr": proc.stderr}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            blobs[str(p.relative_to(out))] = gzip.decompress(data) if p.suffix == ".gz" else data
    return blobs


def assert_nothing_planted(blobs: dict[str, bytes], planted=PLANTED) -> None:
    for where, data in blobs.items():
        low = data.lower()
        for secret in planted:
            for form in {secret, secret.replace("^", " ")}:
                assert form.lower().encode() not in low, (secret, where)


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("phi")
    studies = base / f"batch_{NAME_FAMILY}_{DATE}" / "studies"  # even the input's own name
    # <label>/<study>/ folder input; folder names are the "<PatientID>_<date>" kind
    good = studies / "covid" / f"{PATIENT_ID}_{DATE}"
    plant(phi_series(good / f"{NAME_FAMILY}^{NAME_GIVEN}", seed=1))
    (good / f"{NAME_FAMILY}_notes.txt").write_text(f"{NAME_FAMILY} {PATIENT_ID}")  # not DICOM
    plant(phi_series(studies / "normal" / f"{NAME_GIVEN}_{DATE}", seed=2, kind="normal"),
          invalid_uids=True)
    odd_name = os.path.join(os.fsencode(studies / "normal"), b"\xff\xfe" + DATE.encode())
    plant(phi_series(Path(os.fsdecode(odd_name)), seed=6, kind="normal"))  # not UTF-8
    # failing studies whose reasons could quote the planted values
    plant(phi_series(studies / "covid" / f"{NAME_FAMILY}_scout", seed=3),
          SeriesDescription=f"TOPOGRAM {NAME_FAMILY} {DATE}")
    plant(phi_series(studies / "covid" / f"{PATIENT_ID}_mr", seed=4), Modality="PHIMODQXZ")
    odd_syntax = phi_series(studies / "covid" / f"{NAME_GIVEN}_syntax", seed=5)
    plant(odd_syntax)
    for p in odd_syntax:  # a private Transfer Syntax UID that holds the planted digits
        data = p.read_bytes().replace(b"1.2.840.10008.1.2.1\x00",
                                      f"1.2.3.{UID_DIGITS}.77\x00".encode())  # 20 bytes
        p.write_bytes(data)
    (studies / "covid" / f"{NAME_GIVEN}_{DATE}_empty").mkdir()
    plant(phi_series(studies / "covid" / "frames", seed=7), NumberOfFrames=DATE)
    plant(phi_series(studies / "covid" / "spacing", seed=8), PixelSpacing=[DATE, DATE])
    plant(phi_series(studies / "covid" / "position", seed=9),
          ImagePositionPatient=["0", "0", DATE])
    (studies / "normal" / f"{NAME_FAMILY}_{PATIENT_ID}.png").write_text(TEXT)
    out = base / "out"  # the operator's own folder: the log may name it
    proc = run_cli_bytes(f"--input={studies}", f"--output_dir={out}", "--workers=2",
                         f"--salt_file={base / 'salt'}", "--image_size=32", "--min_slices=5",
                         "--split_fractions=1,0,0")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return out, proc, studies


def test_phi_run_wrote_and_failed_what_it_should(phi_run):
    out, _, _ = phi_run
    rows = failures(out)
    errors = sorted(r["reason"] for r in rows if r["level"] == "error")
    assert errors == ["bad_pixel_spacing", "compressed_no_decoder", "empty_study",
                      "image_too_large", "localizer", "non_ct_modality", "not_dicom",
                      "too_few_slices"]
    warnings = {r["reason"] for r in rows if r["level"] == "warning"}
    assert {"not_dicom", "library_warning"} <= warnings
    recs = read_records(out)
    assert len({r[schema.STUDY_KEY] for r in recs}) == 3  # one planted PatientID: 1 patient
    assert len({r[schema.PATIENT_KEY] for r in recs}) == 1
    localizer = next(r for r in rows if r["reason"] == "localizer")
    assert "SeriesDescription says TOPOGRAM" in localizer["detail"]


def test_nothing_planted_appears_downstream(phi_run):
    out, proc, _ = phi_run
    blobs = downstream_bytes(out, proc)
    assert any(k.endswith(".tfrecord.gz") for k in blobs) and b"library_warning" in \
        blobs["failures.csv"]
    assert_nothing_planted(blobs)
    assert b"invalid UI value" in blobs["failures.csv"]  # counted, by kind, without values


def test_the_operator_can_map_names_back(phi_run, tmp_path):
    out, _, studies = phi_run
    proc = subprocess.run([sys.executable, "-m", "data_prep.study_names", f"--input={studies}",
                           f"--salt_file={out.parent / 'salt'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    table = dict(line.split("\t") for line in proc.stdout.splitlines())
    names = {r["study"] for r in failures(out)}
    assert names <= set(table)
    assert any(f"{PATIENT_ID}_{DATE}" in path for path in table.values())
