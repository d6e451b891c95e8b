"""Issue 9: nothing planted in the input appears downstream.

Distinctive names, ids, dates, descriptions and UIDs are planted in every DICOM tag that can
hold them, in folder and file names, and in manifest cells; build_tfrecords runs (two
workers); every output file (shards decompressed) and everything it printed are searched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from covid_keras.core import schema
from tests.helpers import (
    DATE,
    NAME_FAMILY,
    NAME_GIVEN,
    PATIENT_ID,
    REPO,
    TEXT,
    UID_DIGITS,
    assert_nothing_planted,
    downstream_bytes,
    failures,
    phi_series,
    plant,
    read_records,
    run_cli_bytes,
)


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
