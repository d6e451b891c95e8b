"""Issue 9: one bad study never stops (or hangs) the batch, and gets a named reason.

Every bad input is written here by the test itself (pydicom, OpenCV, raw bytes): special
files, huge files, decompression bombs, slow studies, names of any bytes, bad manifest rows
and encodings, truncated DICOM, undecodable files, missing positions, mixed series,
implausible spacings. The last tests run them all in one batch with --workers=2.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from covid_keras.core import schema
from data_prep import dicom_io, inputs, limits, pipeline, redact, slice_images
from data_prep.errors import Issue, StudyError
from data_prep.limits import Limits
from data_prep.preprocess import PrepConfig
from data_prep.study import ScanConfig, process_study, scan_study
from tests.helpers import (
    DICOM_SALT,
    MATRIX,
    REPO,
    edit_dicom,
    read_records,
    scan_cfg,
    study_task,
    undecodable,
    write_png_bomb,
)
from tests.helpers import SHORT_SERIES_SLICES as SLICES
from tests.helpers import short_series as series


@pytest.fixture
def no_hang():
    """Fails (instead of hanging the suite) if the test runs over 60 s."""
    def boom(signum, frame):
        raise AssertionError("the test hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def png_bomb(tmp_path_factory) -> Path:
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb" / "slice.png")


def reasons(issues: list[Issue], level: str | None = None) -> list[str]:
    return [i.reason for i in issues if level is None or i.level == level]


# ------------------------------------------------------------------ bounded work per study
def test_special_files_are_never_opened(tmp_path, no_hang):
    study = tmp_path / "study"
    series(study, kind="covid", seed=1)
    os.mkfifo(study / "fifo.dcm")
    (study / "zero.dcm").symlink_to("/dev/zero")
    (study / "dangling.dcm").symlink_to(study / "missing")
    (study / "loop.dcm").symlink_to(study / "loop.dcm")
    start = time.monotonic()
    scan = scan_study(study_task(study), scan_cfg())
    assert time.monotonic() - start < 20
    assert scan.error is None
    assert reasons(scan.issues).count("not_regular_file") == 4
    assert scan.slice_count == SLICES


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_study_that_is_a_special_file_fails_with_a_reason(tmp_path, kind, no_hang):
    path = tmp_path / "slice.png"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    scan = scan_study(study_task(path), scan_cfg())
    assert scan.error is not None and scan.error.reason == "not_regular_file"
    assert scan.error.study.startswith("line00002.")


def test_byte_limit(tmp_path):
    study = tmp_path / "study"
    series(study, kind="covid", seed=1)
    scan = scan_study(study_task(study), scan_cfg(max_file_bytes=1000))
    assert scan.error is not None and scan.error.reason == "file_too_large"
    assert reasons(scan.issues) == ["file_too_large"] * SLICES


def test_image_header_sizes():
    grey = np.zeros((37, 53), np.uint8)
    for ext in (".png", ".jpg"):
        ok, buf = cv2.imencode(ext, grey)
        assert limits.image_header_size(buf.tobytes()) == (37, 53)
    assert limits.image_header_size(b"GIF89a") is None
    # a JPEG whose frame header follows a large APP segment
    ok, buf = cv2.imencode(".jpg", grey)
    data = buf.tobytes()
    app = b"\xff\xe1" + struct.pack(">H", 60002) + b"\x00" * 60000
    assert limits.image_header_size(data[:2] + app + data[2:]) == (37, 53)


def test_decompression_bomb_png_is_never_decoded(png_bomb):
    assert png_bomb.stat().st_size < 600_000
    with pytest.raises(Exception) as err:
        slice_images.read_grey(str(png_bomb), "s", Limits())
    assert err.value.reason == "image_too_large"
    scan = scan_study(study_task(png_bomb.parent), scan_cfg())
    assert scan.error is not None and scan.error.reason == "image_too_large"
    assert "20000 x 20000" in scan.error.detail


def test_decompression_bomb_peak_memory(png_bomb):
    """The bomb's study in a fresh process (as in a worker): peak RSS stays small."""
    code = (
        "import sys\n"
        "from data_prep.study import ScanConfig, StudyTask, scan_study, process_study\n"
        "from data_prep.preprocess import PrepConfig\n"
        "t = StudyTask(study_id='b', path=sys.argv[1], label='covid', origin='line00002')\n"
        "cfg = ScanConfig(salt=b's' * 32, min_slices=1, num_slices=1)\n"
        "scan = scan_study(t, cfg)\n"
        "r = process_study(scan, 'train', 0, cfg, PrepConfig(image_size=32), 0)\n"
        # VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's)
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(r.error.reason, hwm.split()[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(png_bomb.parent)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)
    reason, peak_kb = proc.stdout.split()
    print(f"decompression bomb (20000x20000 PNG, {png_bomb.stat().st_size} bytes): "
          f"peak RSS {int(peak_kb) / 1024:.0f} MiB")
    assert reason == "image_too_large"
    assert int(peak_kb) < 300 * 1024  # it was 3.8 GB; a decoded 20000^2 image alone is 400 MB


def test_dicom_dimensions_checked_from_the_header(tmp_path):
    study = tmp_path / "study"
    def huge(ds, i):
        ds.Rows = ds.Columns = 30000  # 900 Mpixels announced, 8 kB of pixel data
    edit_dicom(series(study, kind="covid", seed=1), huge)
    scan = scan_study(study_task(study), scan_cfg())
    assert scan.error is not None and scan.error.reason == "image_too_large"


def test_deflate_bomb_is_measured_before_pydicom_inflates_it(tmp_path):
    (p,) = series(tmp_path / "s", kind="covid", seed=1, num_slices=1)
    ds = pydicom.dcmread(p)
    ds.add_new(0x00291010, "OB", b"\x00" * (24 * 1024 * 1024))  # 24 MB of zeros
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Exception) as err:
        dicom_io.read_header(bomb, Limits(max_file_bytes=4 * 1024 * 1024))
    assert err.value.reason == "file_too_large" and "inflates" in err.value.detail
    assert dicom_io.read_header(bomb).rows == MATRIX  # under the default limit: read


def test_study_time_limit(tmp_path, monkeypatch):
    study = tmp_path / "study"
    series(study, kind="covid", seed=1)

    def spins(*a, **k):  # a header parse that never ends, in pure Python
        while True:
            pass

    monkeypatch.setattr(dicom_io, "read_header", spins)
    start = time.monotonic()
    scan = scan_study(study_task(study), scan_cfg(study_timeout_s=0.5))
    assert time.monotonic() - start < 5
    assert scan.error is not None and scan.error.reason == "study_timeout"
    monkeypatch.undo()
    assert scan_study(study_task(study), scan_cfg(study_timeout_s=0.5)).error is None


def test_process_time_limit(tmp_path, monkeypatch):
    study = tmp_path / "study"
    series(study, kind="covid", seed=1)
    scan = scan_study(study_task(study), scan_cfg(study_timeout_s=0.5))
    def slow(header, *a, **k):
        time.sleep(0.3)
        raise StudyError("pixel_decode_error", "slow and undecodable", header.path)

    monkeypatch.setattr(dicom_io, "read_hu", slow)
    result = process_study(scan, "train", 0, scan_cfg(study_timeout_s=0.5),
                           PrepConfig(image_size=32), 0)
    assert result.error is not None and result.error.reason == "study_timeout"


# ------------------------------------------------------------------ any path, any manifest
def test_manifest_rows_fail_one_by_one(tmp_path):
    manifest = tmp_path / "m.csv"
    rows = [
        "study_path,label,patient_id,site,split",
        "a,covid,P1,site_a,",  # line 2: fine
        "b,,P2,site_a,",  # empty label
        "c,covid,P3,site_a,holdout",  # unknown split
        ",covid,P4,site_a,",  # empty path
        "e,co\x00vid,P5,site_a,",  # NUL
        "f,covid,P6,=HYPERLINK(\"x\"),",  # formula site
        "g," + "x" * 65 + ",P7,site_a,",  # too long
        "h,@label,P8,site_a,",  # formula label
        "i,cov\x07id,P9,site_a,",  # control character
        "j,covid,P10,,TRAIN",  # fine (split case-insensitive, site defaulted)
    ]
    manifest.write_bytes("\n".join(rows).encode() + b"\n")
    tasks = inputs.read_input(str(manifest))
    got = {t.origin: (t.error or ("", ""))[0] for t in tasks}
    assert got == {"line00002": "", "line00003": "missing_label", "line00004": "unknown_split",
                   "line00005": "missing_study_path", "line00006": "invalid_label",
                   "line00007": "invalid_site", "line00008": "invalid_label",
                   "line00009": "invalid_label", "line00010": "invalid_label",
                   "line00011": ""}
    for t in tasks:  # details never echo the cell
        if t.error:
            assert "HYPERLINK" not in t.error[1] and "xxxx" not in t.error[1]
    assert tasks[-1].split == "train" and tasks[-1].site == "default"


def test_folder_input_label_names_are_validated(tmp_path):
    root = os.fsencode(tmp_path / "in")
    for label in (b"covid", b"=cmd", b"co\xffvid", b"x" * 80):
        os.makedirs(os.path.join(root, label, b"study1"))
    tasks = inputs.read_input(os.fsdecode(root))
    errors = sorted((t.error or ("ok",))[0] for t in tasks)
    assert errors == ["invalid_label"] * 3 + ["ok"]
    assert [t.origin for t in tasks] == [f"entry{i:05d}" for i in range(1, 5)]


def test_a_huge_manifest_cell_fails_its_row_only(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_path,label\na,covid\nb," + "x" * 300_000 + "\nc,normal\n")
    tasks = inputs.read_input(str(manifest))
    assert [(t.error or ("",))[0] for t in tasks] == ["", "invalid_label", ""]


def test_manifest_encodings(tmp_path, caplog):
    text = "study_path,label,site\nstudies/é,covid,Hôpital\n"
    for encoding, raw in (("utf-8", text.encode()), ("utf-8-sig", text.encode("utf-8-sig")),
                          ("utf-16", text.encode("utf-16"))):
        p = tmp_path / f"{encoding}.csv"
        p.write_bytes(raw)
        (t,) = inputs.read_input(str(p))
        assert t.error is None and t.site == "Hôpital" and t.path.endswith("studies/é"), encoding
    legacy = tmp_path / "cp1252.csv"
    legacy.write_bytes(text.encode("cp1252"))
    (t,) = inputs.read_input(str(legacy))
    assert t.error is not None and t.error[0] == "manifest_encoding"
    assert "--manifest_encoding=cp1252" in caplog.text and "cp1252.csv" in caplog.text
    (t,) = inputs.read_input(str(legacy), encoding="cp1252")
    assert t.error is None and t.site == "Hôpital"
    # a legacy path alone: the row goes on with the path's own bytes, and says so if missing
    legacy.write_bytes("study_path,label\nstudies/é,covid\n".encode("cp1252"))
    (t,) = inputs.read_input(str(legacy))
    assert t.error is None
    scan = scan_study(t, scan_cfg())
    assert scan.error.reason == "unreadable_path" and "--manifest_encoding" in scan.error.detail
    with pytest.raises(ValueError, match=r"utf8\.csv cannot be read as ascii"):
        (tmp_path / "utf8.csv").write_bytes(text.encode())
        inputs.read_input(str(tmp_path / "utf8.csv"), encoding="ascii")


def test_paths_of_any_bytes(tmp_path):
    """A folder and file named with bytes that are not UTF-8, given by a manifest in those
    same bytes: the study resolves and is written; nothing fails to encode."""
    root = os.fsencode(tmp_path)
    study = os.path.join(root, b"st\xffudy")
    os.makedirs(study)
    for p in series(Path(os.fsdecode(study)), kind="covid", seed=1):
        os.rename(p, os.path.join(study, b"im\xfe" + os.fsencode(p.name)))
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"study_path,label\nst\xffudy,covid\n")
    (t,) = inputs.read_input(str(manifest))
    assert t.error is None
    scan = scan_study(t, scan_cfg())
    assert scan.error is None and scan.slice_count == SLICES
    out = tmp_path / "failures.csv"
    pipeline.write_failures(str(out), [Issue(scan.name, "file00001.x", "not_dicom",
                                             t.path, "warning")])
    data = out.read_bytes()
    data.decode("ascii")  # escaped: printable ASCII only
    assert b"st\\xffudy" in data


def test_failures_csv_cells_cannot_start_a_formula(tmp_path):
    out = tmp_path / "failures.csv"
    cells = ["=HYPERLINK(\"http://x\")", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "a\x00b\nc"]
    pipeline.write_failures(str(out), [Issue(c, c, "not_dicom", c, "warning") for c in cells])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for col in ("study", "file", "detail"):
            assert r[col][0] not in "=+-@\t\r", r[col]
            assert r[col].isprintable() and r[col].isascii()
    assert redact.spreadsheet_safe("=1") == "'=1" and redact.spreadsheet_safe("ok") == "ok"


# ------------------------------------------------------------------ the right reasons
def test_truncated_dicom_is_not_called_not_dicom(tmp_path):
    (p,) = series(tmp_path / "s", kind="covid", seed=1, num_slices=1)
    data = p.read_bytes()
    for n in (140, 300, 700):
        cut = tmp_path / f"cut{n}.dcm"
        cut.write_bytes(data[:n])
        with pytest.raises(Exception) as err:
            dicom_io.read_header(cut)
        assert err.value.reason == "truncated_file", n
    report = pydicom.Dataset()  # a small, complete non-image object: not truncated
    report.SOPClassUID = pydicom.uid.BasicTextSRStorage
    report.SOPInstanceUID = pydicom.uid.generate_uid()
    report.Modality = "SR"
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(Exception) as err:
        dicom_io.read_header(tmp_path / "sr.dcm")
    assert err.value.reason == "not_dicom"
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM at all " * 20)
    with pytest.raises(Exception) as err:
        dicom_io.read_header(text)
    assert err.value.reason == "not_dicom"


@pytest.mark.parametrize("bad_first", [True, False])
def test_undecodable_files_are_warnings_whatever_sorts_first(tmp_path, bad_first):
    """19 good files and 5 that no decoder here can read: the study is written from the 19,
    the same way whether a bad file sorts first or last."""
    study = tmp_path / "study"
    paths = series(study, kind="covid", seed=1, num_slices=24, file_names="ordered")
    bad = paths[::5][:5]
    undecodable(bad)
    for p in bad:
        p.rename(p.with_name(("aaa_" if bad_first else "zzz_") + p.name))
    cfg = scan_cfg()
    scan = scan_study(study_task(study), cfg)
    assert scan.error is None
    assert reasons(scan.issues).count("compressed_no_decoder") == 5
    assert scan.slice_count == 19
    result = process_study(scan, "train", 0, cfg, PrepConfig(image_size=32), 0)
    assert result.error is None and result.records


def test_corrupt_pixel_data_in_some_files_is_a_warning(tmp_path):
    study = tmp_path / "study"
    paths = series(study, kind="covid", seed=1, num_slices=20)
    for p in sorted(paths)[:5]:
        data = p.read_bytes()
        p.write_bytes(data[:-MATRIX * MATRIX])  # pixel data cut short, header intact
    cfg = scan_cfg()
    scan = scan_study(study_task(study), cfg)
    result = process_study(scan, "train", 0, cfg, PrepConfig(image_size=32), 0)
    assert result.error is None and result.records
    assert result.dropped["truncated_file"] >= 1
    assert "truncated_file" in reasons(result.issues, "warning")


def test_an_unreadable_sampled_file_is_replaced_by_a_neighbour(tmp_path):
    """Every sampled file of a 30-slice series is cut short: each is replaced by the nearest
    slice between the same sampled neighbours, so the study keeps what a clean one has."""
    study = tmp_path / "study"
    series(study, kind="covid", seed=1, num_slices=30)
    cfg, prep = scan_cfg(), PrepConfig(image_size=32)
    clean = process_study(scan_study(study_task(study), cfg), "train", 0, cfg, prep, 0)
    scan = scan_study(study_task(study), cfg)
    assert len(scan.spares) <= 4 * len(scan.sampled)  # not every slice: the driver holds it
    for s in scan.sampled:
        data = Path(s.path).read_bytes()
        Path(s.path).write_bytes(data[:-MATRIX * MATRIX])
    result = process_study(scan_study(study_task(study), cfg), "train", 0, cfg, prep, 0)
    assert result.error is None
    subs = [i for i in result.issues if i.reason == "slice_substituted"]
    assert len(subs) == 15 and result.dropped["truncated_file"] == 15
    assert result.sampled == 30  # 15 sampled + 15 substitutes tried
    indices = sorted(int(r[schema.SLICE_INDEX]) for r in result.records)
    assert len(set(indices)) == len(indices)
    assert not set(indices) & {s.index for s in scan.sampled}
    assert abs(len(result.records) - len(clean.records)) <= 2


@pytest.mark.parametrize("keep,basis", [("InstanceNumber", "InstanceNumber"),
                                        ("SliceLocation", "SliceLocation"),
                                        ("", "file name")])
def test_ordering_warning_says_what_the_order_was(tmp_path, keep, basis):
    study = tmp_path / "study"

    def strip(ds, i):
        del ds.ImagePositionPatient
        for kw in ("InstanceNumber", "SliceLocation"):
            if kw != keep and kw in ds:
                delattr(ds, kw)
    edit_dicom(series(study, kind="covid", seed=1), strip)
    scan = scan_study(study_task(study), scan_cfg())
    assert scan.error is None
    (w,) = [i for i in scan.issues if i.reason == "missing_position"]
    assert w.detail.endswith(f"ordered by {basis}" if basis != "file name"
                             else "ordered by file name (no InstanceNumber or SliceLocation "
                                  "on every slice)"), w.detail


@pytest.mark.parametrize("reason,minority,kw", [
    ("mixed_matrix", 3, {"matrix": 32}),
    ("mixed_pixel_spacing", 3, {"pixel_spacing_mm": 2.0}),
    ("mixed_matrix", 10, {"matrix": 32}),  # no clear majority with enough slices: error
])
def test_mixed_series_is_named(tmp_path, reason, minority, kw):
    study = tmp_path / "study"
    uid = pydicom.uid.generate_uid()
    series(study / "a", kind="covid", seed=1, series_uid=uid)
    series(study / "b", kind="covid", seed=1, series_uid=uid, num_slices=minority,
           slice_thickness_mm=300.0 / SLICES, **kw)
    scan = scan_study(study_task(study), ScanConfig(salt=DICOM_SALT, min_slices=SLICES - 1))
    if minority < SLICES:
        assert scan.error is None, scan.error
        assert reason in reasons(scan.issues, "warning")
        assert scan.slice_count == SLICES
    else:
        assert scan.error is not None and scan.error.reason == reason


@pytest.mark.parametrize("value", ["nan\\nan", "0.0007\\0.0007", "-1\\-1", "0\\0",
                                   "1e6\\1e6", "inf\\inf"])
def test_implausible_pixel_spacing_is_rejected_before_any_pixel(tmp_path, value, monkeypatch):
    study = tmp_path / "study"

    def spacing(ds, i):
        ds[0x00280030] = pydicom.DataElement(0x00280030, "DS", value)
    edit_dicom(series(study, kind="covid", seed=1), spacing)
    monkeypatch.setattr(dicom_io, "read_hu", lambda *a, **k: pytest.fail("pixels read"))
    start = time.monotonic()
    scan = scan_study(study_task(study), scan_cfg())
    assert time.monotonic() - start < 10
    assert scan.error is not None and scan.error.reason == "bad_pixel_spacing", scan.error


@pytest.mark.parametrize("case", ["nan_position", "nan_orientation", "bad_slope",
                                  "zero_slope", "text_intercept", "zero_rows"])
def test_broken_numbers_have_a_reason(tmp_path, case):
    study = tmp_path / "study"

    def breaks(ds, i):
        if case == "nan_position":
            ds[0x00200032] = pydicom.DataElement(0x00200032, "DS", "nan\\nan\\nan")
        elif case == "nan_orientation":
            ds[0x00200037] = pydicom.DataElement(0x00200037, "DS", "nan\\0\\0\\0\\nan\\0")
        elif case == "bad_slope":
            ds.RescaleSlope = "inf"
        elif case == "zero_slope":
            ds.RescaleSlope = "0"
        elif case == "text_intercept":
            ds.RescaleIntercept = "-1024.5"  # made text below, in the file's bytes
        else:
            ds.Rows = 0
    paths = series(study, kind="covid", seed=1)
    edit_dicom(paths, breaks)
    if case == "text_intercept":
        for p in paths:
            data = p.read_bytes()
            assert data.count(b"-1024.5 ") == 1
            p.write_bytes(data.replace(b"-1024.5 ", b"abc     "))
    cfg = scan_cfg()
    scan = scan_study(study_task(study), cfg)
    result = process_study(scan, "train", 0, cfg, PrepConfig(image_size=32), 0)
    if case == "nan_position":  # no usable position: ordered otherwise, and says so
        assert result.error is None and "missing_position" in reasons(scan.issues)
        assert all(np.isfinite(r[schema.POSITION_MM]) for r in result.records)
    elif case == "nan_orientation":
        assert result.error is None and "missing_orientation" in reasons(scan.issues)
    elif case == "zero_rows":
        assert scan.error is not None and scan.error.reason == "not_dicom"
    else:
        assert result.error is not None and result.error.reason == "bad_rescale"


def test_lung_mask_refuses_an_implausible_spacing():
    from data_prep.lung import lung_mask_hu

    hu = np.full((32, 32), -1000.0, np.float32)
    for bad in (float("nan"), 0.0, -1.0, 0.0007, 1e6):
        with pytest.raises(ValueError, match="Received"):
            lung_mask_hu(hu, pixel_spacing_mm=bad)
    lung_mask_hu(hu, pixel_spacing_mm=0.7)


def test_pydicom_warnings_are_counted_never_printed(tmp_path, capfd):
    study = tmp_path / "study"
    edit_dicom(series(study, kind="covid", seed=1),
         lambda ds, i: setattr(ds, "SeriesInstanceUID", "1.2.PLANTEDUID.3"))
    cfg = scan_cfg()
    scan = scan_study(study_task(study), cfg)
    result = process_study(scan, "train", 0, cfg, PrepConfig(image_size=32), 0)
    assert scan.error is None and result.error is None
    (w,) = [i for i in scan.issues if i.reason == "library_warning"]
    assert "invalid UI value" in w.detail and "PLANTED" not in w.detail
    out, err = capfd.readouterr()
    assert "PLANTED" not in out + err


# ------------------------------------------------------------------ resume
def _cli_flags(out: Path, salt: Path) -> list[str]:
    return [f"--output_dir={out}", f"--salt_file={salt}", "--image_size=32", "--workers=1",
            "--min_slices=5", "--split_fractions=1,0,0"]


def _main(monkeypatch, argv: list[str]) -> int:
    from data_prep import build_tfrecords

    flags = build_tfrecords.FLAGS
    flags.unparse_flags()
    flags(["prog", *argv])
    try:
        return build_tfrecords.main(["prog"])
    finally:
        flags.unparse_flags()


def _kill_after_spool(monkeypatch):
    def killed(*a, **k):
        raise KeyboardInterrupt("killed before writing shards")
    monkeypatch.setattr(pipeline, "_write_outputs", killed)


@pytest.fixture
def two_studies(tmp_path) -> Path:
    for name, kind, seed in (("a", "covid", 1), ("b", "normal", 2)):
        series(tmp_path / "in" / kind / name, kind=kind, seed=seed)
    return tmp_path / "in"


def test_resume_after_classes_change_relabels(two_studies, tmp_path, monkeypatch):
    import tensorflow as tf  # noqa: F401 - imported once, before the timed parts

    out, salt = tmp_path / "out", tmp_path / "salt"
    flags = [f"--input={two_studies}", *_cli_flags(out, salt)]
    _kill_after_spool(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _main(monkeypatch, [*flags, "--classes=covid,normal"])
    monkeypatch.undo()
    assert _main(monkeypatch, [*flags, "--classes=normal,covid"]) == 0
    labels = {(r[schema.LABEL_NAME].decode(), int(r[schema.LABEL_INDEX]))
              for r in read_records(out)}
    assert labels == {("normal", 0), ("covid", 1)}


def test_resume_after_an_input_changed_reprocesses_it(two_studies, tmp_path, monkeypatch):
    out, salt = tmp_path / "out", tmp_path / "salt"
    flags = [f"--input={two_studies}", *_cli_flags(out, salt)]
    _kill_after_spool(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _main(monkeypatch, flags)
    monkeypatch.undo()
    # the covid study is replaced by another one (same file names)
    study = two_studies / "covid" / "a"
    for p in study.iterdir():
        p.unlink()
    series(study, kind="covid", seed=7)
    calls = []
    real = pipeline.process_study
    monkeypatch.setattr(pipeline, "process_study", lambda *a, **k: calls.append(1) or real(*a,
                                                                                           **k))
    assert _main(monkeypatch, flags) == 0
    assert len(calls) == 1  # the changed study only; the other came from the spool
    fresh = tmp_path / "fresh" / "out"  # the same folder name: the dataset is named after it
    monkeypatch.undo()
    assert _main(monkeypatch, [f"--input={two_studies}", *_cli_flags(fresh, salt)]) == 0
    assert _hashes(out) == _hashes(fresh)


def _hashes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "patient_salt.key"}


def test_rewrite_is_staged_and_swapped_whole(two_studies, tmp_path, monkeypatch):
    out, salt = tmp_path / "out", tmp_path / "salt"
    flags = [f"--input={two_studies}", *_cli_flags(out, salt), "--shard_size_mb=0.001"]
    assert _main(monkeypatch, flags) == 0
    before = _hashes(out)
    (out / "notes.txt").write_text("the user's own file")
    # a rewrite with other settings, killed after its first new shard
    real = pipeline.write_tfrecord_gz
    written = []

    def dies_on_second(path, serialized):
        if written:
            raise KeyboardInterrupt("killed during the rewrite")
        written.append(path)
        return real(path, serialized)

    monkeypatch.setattr(pipeline, "write_tfrecord_gz", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _main(monkeypatch, [*flags, "--image_size=48"])
    monkeypatch.undo()
    after = _hashes(out)
    after.pop("notes.txt")
    assert after == before  # old shards under the old manifest, nothing new among them
    leftovers = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert leftovers and written and Path(written[0]).parent == leftovers[0]
    (out / "x.tfrecord.gz.tmp-999").write_bytes(b"half a shard")
    (out / ".partial" / "y.pkl.tmp-998").write_bytes(b"half a spool file")
    assert _main(monkeypatch, [*flags, "--image_size=48"]) == 0
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert not list(out.rglob("*.tmp-*"))
    assert (out / "notes.txt").read_text() == "the user's own file"
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.glob("*.tfrecord.gz")}
    assert manifest["image"]["size"] == 48


def test_two_runs_on_one_output_folder_are_refused(tmp_path):
    with pipeline.exclusive_output(str(tmp_path / "out")):
        with pytest.raises(RuntimeError, match="Another data_prep run"):
            with pipeline.exclusive_output(str(tmp_path / "out")):
                pass
    with pipeline.exclusive_output(str(tmp_path / "out")):  # released
        pass


def test_an_output_folder_that_cannot_be_swapped_is_updated_file_by_file(
        two_studies, tmp_path, monkeypatch):
    out, salt = tmp_path / "out", tmp_path / "salt"
    flags = [f"--input={two_studies}", *_cli_flags(out, salt), "--shard_size_mb=0.001"]
    assert _main(monkeypatch, [*flags, "--image_size=48"]) == 0

    def busy(*a, **k):
        raise OSError(16, "Device or resource busy")  # EBUSY: a mount point

    monkeypatch.setattr(pipeline, "swap_in", busy)
    assert _main(monkeypatch, [*flags, "--shard_size_mb=100"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"]["size"] == 32
    assert set(manifest["files"]) == {p.name for p in out.glob("*.tfrecord.gz")} == {
        "train-00000-of-00001.tfrecord.gz"}
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_library_messages_are_counted_by_kind_never_shown(capfd):
    import logging
    import warnings

    with redact.capture_library_messages() as counts:
        logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.SECRETUID'")
        warnings.warn("Invalid value for VR DA: '19230817'", UserWarning)
        warnings.warn("Mean of empty slice", RuntimeWarning)
        pydicom.misc.warn_and_log("The file has no preamble SECRET2")  # warns AND logs
    assert counts == {"invalid UI value": 1, "invalid DA value": 1, "other RuntimeWarning": 1,
                      "missing preamble": 1}
    out, err = capfd.readouterr()
    assert "SECRET" not in out + err and "19230817" not in out + err


def test_native_library_output_is_counted_never_shown(tmp_path, capfd):
    """libpng prints its warnings (which can quote an ICC profile's name) to fd 2."""
    ok, buf = cv2.imencode(".png", np.full((64, 64), 128, np.uint8))
    data = buf.tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    iccp = chunk(b"iCCP", b"Zqxvonk profile\x00\x00" + zlib.compress(b"\x00" * 16))
    study = tmp_path / "study"
    study.mkdir()
    (study / "slice.png").write_bytes(data[:33] + iccp + data[33:])
    cfg = ScanConfig(salt=DICOM_SALT, min_slices=1, num_slices=1)
    scan = scan_study(study_task(study), cfg)
    result = process_study(scan, "train", 0, cfg, PrepConfig(image_size=32, lung_filter=False),
                           0)
    (w,) = [i for i in result.issues if i.reason == "library_warning"]
    assert "native library message x1" in w.detail
    out, err = capfd.readouterr()
    assert "libpng" not in out + err and "Zqxvonk" not in out + err


def test_library_messages_in_threads_are_counted_per_thread(capfd):
    """Beam's threaded runners: each thread counts its own study's messages."""
    import logging
    import threading
    import warnings

    got: dict[int, dict] = {}
    barrier = threading.Barrier(2)

    def work(n: int) -> None:
        with redact.capture_library_messages() as counts:
            barrier.wait()
            for _ in range(n):
                logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.SECRET3'")
                warnings.warn("Invalid value for VR DA: 'SECRET4'", UserWarning)
            barrier.wait()
        got[n] = dict(counts)

    showwarning, filters = warnings.showwarning, warnings.filters[:]
    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in (1, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        warnings.showwarning, warnings.filters[:] = showwarning, filters
    assert got == {1: {"invalid UI value": 1, "invalid DA value": 1},
                   3: {"invalid UI value": 3, "invalid DA value": 3}}
    out, err = capfd.readouterr()
    assert "SECRET" not in out + err
