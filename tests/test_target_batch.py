"""Issue 9's target: good studies mixed with one of each bad kind, in one batch, two workers.

Every bad input gets its named reason, every good study is written, the batch ends in
bounded time, and nothing planted (tests/test_phi.py's names, ids, dates, UIDs, also in
folder and file names) appears downstream.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from covid_keras.core import schema
from tests.helpers import (
    DATE,
    NAME_FAMILY,
    PATIENT_ID,
    assert_nothing_planted,
    downstream_bytes,
    edit_dicom,
    failures,
    phi_series,
    plant,
    read_records,
    run_cli_bytes,
    undecodable,
    write_png_bomb,
)
from tests.helpers import short_series as series

TIME_LIMIT_S = 300


def _png_study(folder: Path) -> None:
    folder.mkdir(parents=True)
    from data_prep import phantom

    vol = phantom.make_volume_hu("covid", num_slices=12, matrix=64, seed=5)
    for i in range(3):
        grey = np.clip((vol[5 + i] + 1450.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{NAME_FAMILY}_{i}.png"), grey)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    base = tmp_path_factory.mktemp("target")
    root = base / "input"
    s = root / "studies"
    rows: list[bytes] = []
    expected: dict[str, str] = {}  # manifest line -> reason ("" = written)

    def add(name: str | bytes, reason: str, label: bytes = b"covid", patient: bytes = b"",
            site: bytes = b"", split: bytes = b"") -> Path:
        raw = name if isinstance(name, bytes) else name.encode()
        line = f"line{len(rows) + 2:05d}"
        patient = patient or f"P{len(rows)}".encode()
        rows.append(b",".join([b"studies/" + raw, label, patient, site, split]))
        expected[line] = reason
        return Path(os.fsdecode(os.path.join(os.fsencode(s), raw)))

    # ---- good studies (PHI planted in tags, folder and file names)
    plant(phi_series(add(f"{PATIENT_ID}_{DATE}", "", patient=PATIENT_ID.encode()), seed=1))
    plant(phi_series(add(f"{NAME_FAMILY}_{DATE}", "", label=b"normal"), seed=2, kind="normal"),
          invalid_uids=True)
    good3 = add(b"caf\xe9_\xff_study", "")  # not UTF-8
    series(good3, kind="covid", seed=3)
    os.mkfifo(good3 / "fifo")  # junk beside good slices: a warning
    (good3 / "zero").symlink_to("/dev/zero")
    no_pos = add("no_position", "", label=b"normal")
    edit_dicom(series(no_pos, kind="normal", seed=4),
               lambda ds, i: delattr(ds, "ImagePositionPatient"))
    _png_study(add("png_slices", ""))
    # ---- one of each bad kind
    fifo = add("fifo_only", "not_regular_file")
    fifo.mkdir(parents=True)
    os.mkfifo(fifo / "slice.dcm")
    zero = add("dev_zero", "not_regular_file")
    zero.mkdir(parents=True)
    (zero / "slice.dcm").symlink_to("/dev/zero")
    for p in series(add("truncated_header", "truncated_file"), kind="covid", seed=5):
        p.write_bytes(p.read_bytes()[:300])
    write_png_bomb(add("png_bomb", "image_too_large") / "slice.png")

    def huge(ds, i):
        ds.Rows = ds.Columns = 40000
    edit_dicom(series(add("huge_dicom", "image_too_large"), kind="covid", seed=6), huge)
    for value, name in (("nan\\nan", "spacing_nan"), ("0.0007\\0.0007", "spacing_metres")):
        def spacing(ds, i, value=value):
            import pydicom

            ds[0x00280030] = pydicom.DataElement(0x00280030, "DS", value)
        edit_dicom(series(add(name, "bad_pixel_spacing"), kind="covid", seed=7), spacing)
    mixed = add("mixed_matrix", "mixed_matrix")
    import pydicom

    uid = pydicom.uid.generate_uid()
    # 4 + 4 slices of two sizes: the series is long enough, neither size is
    series(mixed / "a", kind="covid", seed=8, series_uid=uid, num_slices=4,
           slice_thickness_mm=25.0)
    series(mixed / "b", kind="covid", seed=8, series_uid=uid, num_slices=4, matrix=32,
           slice_thickness_mm=25.0)
    undecodable(series(add("undecodable", "compressed_no_decoder"), kind="covid", seed=9))
    notes = add("not_dicom", "not_dicom")
    notes.mkdir(parents=True)
    (notes / f"{NAME_FAMILY}.txt").write_text(PATIENT_ID * 20)
    big = add("too_big", "file_too_large")
    big.mkdir(parents=True)
    (big / "big.dcm").write_bytes(b"\0" * (2 * 1024 * 1024 + 1))
    plant(phi_series(add("scout", "localizer"), seed=10),
          SeriesDescription=f"SCOUT {NAME_FAMILY}")
    plant(phi_series(add("mr", "non_ct_modality"), seed=11), Modality="MR")
    add(f"{NAME_FAMILY}_empty", "empty_study").mkdir(parents=True)
    add(f"{PATIENT_ID}_missing", "unreadable_path")
    # ---- bad manifest rows
    series(add("label_empty", "missing_label", label=b""), kind="covid", seed=12)
    series(add("split_bad", "unknown_split", split=b"holdout"), kind="covid", seed=13)
    series(add("site_formula", "invalid_site", site=b'=HYPERLINK("x")'), kind="covid", seed=14)
    series(add("label_nul", "invalid_label", label=b"co\x00vid"), kind="covid", seed=15)
    series(add("label_other", "label_unknown", label=NAME_FAMILY.encode()), kind="covid",
           seed=16)
    series(add("label_cp1252", "manifest_encoding", label=b"covid", site=b"H\xf4pital"),
           kind="covid", seed=17)
    rows.append(b",covid,P-x,,")
    expected[f"line{len(rows) + 1:05d}"] = "missing_study_path"
    # ---- a patient given two splits (both rows fail), a duplicate listing
    series(add("conflict_a", "patient_split_conflict", patient=b"PC", split=b"train"),
           kind="covid", seed=18)
    series(add("conflict_b", "patient_split_conflict", patient=b"PC", split=b"test"),
           kind="covid", seed=19)
    dup_line = f"line{len(rows) + 2:05d}"
    rows.append(rows[0])  # the first good study, listed again
    expected[dup_line] = "duplicate_study"
    manifest = root / "manifest.csv"
    manifest.write_bytes(b"study_path,label,patient_id,site,split\n" + b"\n".join(rows) + b"\n")
    out = base / "out"
    start = time.monotonic()
    proc = run_cli_bytes(f"--input={manifest}", f"--output_dir={out}", "--workers=2",
                         f"--salt_file={base / 'salt'}", "--image_size=32", "--min_slices=5",
                         "--classes=covid,normal", "--split_fractions=1,0,0", "--max_file_mb=2",
                         "--study_timeout_s=120", timeout=TIME_LIMIT_S)
    elapsed = time.monotonic() - start
    print(f"target batch: {len(rows)} rows, {elapsed:.1f} s, exit {proc.returncode}")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return out, proc, expected, elapsed


def test_every_bad_input_gets_its_reason(batch):
    out, _, expected, _ = batch
    errors = {r["study"].split(".")[0]: r["reason"] for r in failures(out)
              if r["level"] == "error"}
    assert errors == {line: reason for line, reason in expected.items() if reason}


def test_every_good_study_is_written(batch):
    out, _, expected, _ = batch
    good = [line for line, reason in expected.items() if not reason]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["studies"]["written"] == len(good)
    assert manifest["studies"]["input"] == len(expected)
    assert len({r[schema.STUDY_KEY] for r in read_records(out)}) == len(good)
    warnings = {(r["study"].split(".")[0], r["reason"]) for r in failures(out)
                if r["level"] == "warning"}
    assert (good[2], "not_regular_file") in warnings  # the FIFO and /dev/zero beside slices
    assert (good[3], "missing_position") in warnings


def test_the_batch_ends_in_bounded_time(batch):
    _, _, _, elapsed = batch
    assert elapsed < TIME_LIMIT_S


def test_nothing_planted_appears_downstream(batch):
    out, proc, _, _ = batch
    blobs = downstream_bytes(out, proc)
    assert_nothing_planted(blobs, planted=(NAME_FAMILY, PATIENT_ID, DATE, "HYPERLINK",
                                           "caf\\xe9", "PHIUIDQXZ", "9412837465"))
    for where, data in blobs.items():  # escaped or not, the non-UTF-8 name never appears
        assert b"caf\xe9" not in data and b"\xff_study" not in data, where
