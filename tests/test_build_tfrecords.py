"""End to end: the build_tfrecords command on DICOM series the tests write with pydicom."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.fileset import FileSet

from covid_keras.core import schema
from data_prep import phantom
from data_prep.study import salted_key
from tests.helpers import (
    MATRIX,
    SERIES_SLICES,
    SPACING,
    failures,
    read_records,
    run_cli,
    series,
)

REPO = Path(__file__).resolve().parents[1]


def common_flags(out: Path, salt: Path) -> list[str]:
    return [f"--output_dir={out}", f"--salt_file={salt}", "--image_size=64", "--workers=1",
            "--min_slices=5", "--split_fractions=1,0,0"]


# ------------------------------------------------------------------ bad input, one run
def _png_study(folder: Path, mode: str, n: int = 3) -> None:
    folder.mkdir(parents=True)
    vol = phantom.make_volume_hu("covid", num_slices=SERIES_SLICES, matrix=MATRIX, seed=5)
    for i in range(n):
        hu = vol[SERIES_SLICES // 2 - 1 + i]
        grey = np.clip((hu + 1450.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
        if mode == "rgba":
            img = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
        else:  # 16-bit grey
            img = grey.astype(np.uint16) * 257
        cv2.imwrite(str(folder / f"slice_{i}.png"), img)


def _compressed_without_decoder(folder: Path) -> None:
    for p in series(folder, kind="normal", seed=9, patient_id="P-MPEG"):
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=True)


@pytest.fixture(scope="module")
def bad_input_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    s = root / "studies"
    rows = []

    def add(name: str, label: str = "covid", patient: str = "") -> Path:
        rows.append((f"studies/{name}", label, patient or f"P-{name}"))
        return s / name

    series(add("good_covid"), kind="covid", seed=1, patient_id="GOOD-1")
    series(add("good_normal", "normal"), kind="normal", seed=2, patient_id="GOOD-2")
    # truncated: every file cut inside its pixel data
    for p in series(add("truncated"), kind="covid", seed=3, patient_id="P-T"):
        p.write_bytes(p.read_bytes()[:-MATRIX * MATRIX])
    # a usable series plus a text file and a fake .png among the slices
    series(add("with_junk", "normal"), kind="normal", seed=4, patient_id="P-J")
    (s / "with_junk" / "notes.txt").write_text("not an image")
    (s / "with_junk" / "fake.png").write_bytes(b"GIF89a not a png")
    # DICOM media: DICOMDIR + files in nested folders (pydicom's FileSet)
    tmp_series = root / "dicomdir_src"
    fs = FileSet()
    for p in series(tmp_series, kind="covid", seed=6, patient_id="P-DIR"):
        fs.add(pydicom.dcmread(p))
    fs.write(add("dicomdir"))
    fs._stage["t"].cleanup()  # pydicom's staging TemporaryDirectory (else a ResourceWarning)
    # missing RescaleSlope/Intercept (signed storage, intercept 0: HU stay right)
    for p in series(add("no_rescale", "normal"), kind="normal", seed=7, rescale_intercept=0.0,
                    patient_id="P-R"):
        ds = pydicom.dcmread(p)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(p, enforce_file_format=True)
    # missing ImagePositionPatient
    for p in series(add("no_position"), kind="covid", seed=8, patient_id="P-P"):
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p, enforce_file_format=True)
    _compressed_without_decoder(add("mpeg2"))
    # two series in one folder: the longer one is used
    two = add("two_series", "normal")
    series(two, kind="normal", seed=10, patient_id="P-2S", series_number=2)
    series(two, kind="normal", seed=10, patient_id="P-2S", series_number=3, num_slices=6)
    # a study that is only a localizer, and a series with a localizer beside it
    phantom.write_localizer(add("localizer_only"), matrix=MATRIX, patient_id="P-L")
    phantom.write_study(add("with_localizer", "normal"), kind="normal", num_slices=SERIES_SLICES,
                        matrix=MATRIX, seed=11, patient_id="P-WL", with_localizer=True,
                        pixel_spacing_mm=SPACING)
    series(add("mr"), kind="covid", seed=12, modality="MR", patient_id="P-MR")
    series(add("three_slices"), kind="covid", seed=13, num_slices=3, patient_id="P-3")
    noise = np.random.default_rng(0).normal(0.0, 15.0, (SERIES_SLICES, MATRIX, MATRIX))
    series(add("all_air"), volume_hu=(noise - 1000.0).astype(np.float32), patient_id="P-AIR")
    series(add("all_zero"), volume_hu=np.zeros((SERIES_SLICES, MATRIX, MATRIX), np.float32),
           rescale_intercept=0.0, patient_id="P-ZERO")
    _png_study(add("rgba_png"), "rgba")
    _png_study(add("png16", "normal"), "16bit")
    add("empty").mkdir(parents=True)
    rows.append(("studies/does_not_exist", "covid", "P-NONE"))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_path", "label", "patient_id"])
        w.writerows(rows)
    out = root / "out"
    proc = run_cli(f"--input={manifest}", *common_flags(out, root / "salt.key"))
    return out, proc, {path: f"line{i + 2:05d}" for i, (path, _, _) in enumerate(rows)}


def by_study(rows: list[dict], lines: dict[str, str]) -> dict[str, list[dict]]:
    """failures.csv rows by the manifest path of their study (names are 'line00005.<hash>')."""
    path_of = {line: path for path, line in lines.items()}
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(path_of[r["study"].split(".")[0]], []).append(r)
    return out


EXPECTED_ERRORS = {
    "studies/truncated": "truncated_file",
    "studies/mpeg2": "compressed_no_decoder",
    "studies/localizer_only": "localizer",
    "studies/mr": "non_ct_modality",
    "studies/three_slices": "too_few_slices",
    "studies/all_air": "no_lung_slices",
    "studies/all_zero": "no_lung_slices",
    "studies/empty": "empty_study",
    "studies/does_not_exist": "unreadable_path",
}
EXPECTED_WARNINGS = {
    "studies/with_junk": {"not_dicom"},
    "studies/dicomdir": {"dicomdir"},
    "studies/no_rescale": {"missing_rescale"},
    "studies/no_position": {"missing_position"},
    "studies/two_series": {"series_rejected"},
    "studies/with_localizer": {"series_rejected"},
    "studies/rgba_png": {"rgba_image"},
    "studies/png16": {"sixteen_bit_image"},
}
GOOD = {"studies/good_covid", "studies/good_normal", *EXPECTED_WARNINGS}


def test_bad_input_each_has_a_named_reason(bad_input_run):
    out, proc, lines = bad_input_run
    studies = by_study(failures(out), lines)
    errors = {k: r for k, rows in studies.items() for r in rows if r["level"] == "error"}
    assert {k: v["reason"] for k, v in errors.items()} == EXPECTED_ERRORS
    for study, reasons in EXPECTED_WARNINGS.items():
        got = {r["reason"] for r in studies[study] if r["level"] == "warning"}
        assert reasons <= got, (study, got)
    assert "dropped (all_air" in errors["studies/all_air"]["detail"]
    assert "constant_image" in errors["studies/all_zero"]["detail"]
    assert "MPEG2" in errors["studies/mpeg2"]["detail"]
    junk = [r["file"] for r in studies["studies/with_junk"] if r["reason"] == "not_dicom"]
    assert len(set(junk)) == len(junk) == 2  # each reported once, by its pseudonymous name
    assert all(re.fullmatch(r"file\d{5}\.[0-9a-f]{8}", f) for f in junk), junk


def test_bad_input_every_good_study_is_written(bad_input_run):
    out, proc, _ = bad_input_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["studies"]["written"] == len(GOOD)
    assert manifest["studies"]["failed"] == len(EXPECTED_ERRORS)
    recs = read_records(out)
    assert len({r[schema.STUDY_KEY] for r in recs}) == len(GOOD)
    assert manifest["slices"]["kept"] == len(recs)
    # slices of studies that failed for lack of lung are counted as dropped, with reasons
    assert manifest["slices"]["dropped"]["all_air"] == 15
    assert manifest["slices"]["dropped"]["constant_image"] == 15
    assert "wrote" in proc.stdout and "failed" in proc.stdout


def test_two_series_uses_the_longer_one(bad_input_run):
    out, _, lines = bad_input_run
    recs = read_records(out)
    counts = {r[schema.SLICE_COUNT] for r in recs}
    assert 6 not in counts  # the 6-slice series was never used
    detail = [r["detail"] for r in by_study(failures(out), lines)["studies/two_series"]]
    assert any("6 files" in d for d in detail)


def test_strict_and_nothing_written_exit_codes(tmp_path):
    s = tmp_path / "studies"
    series(s / "ok", kind="covid", seed=1)
    (s / "empty").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_path,label\nstudies/ok,covid\nstudies/empty,covid\n")
    flags = common_flags(tmp_path / "out", tmp_path / "salt")
    assert run_cli(f"--input={manifest}", *flags).returncode == 0
    assert run_cli(f"--input={manifest}", "--strict", *flags, check=False).returncode == 1
    only_bad = tmp_path / "bad.csv"
    only_bad.write_text("study_path,label\nstudies/empty,covid\n")
    proc = run_cli(f"--input={only_bad}", *common_flags(tmp_path / "o2", tmp_path / "salt"),
                   check=False)
    assert proc.returncode == 1
    assert "Nothing was written" in proc.stderr


def test_patient_in_two_manifest_splits_fails_that_patient_only(tmp_path):
    s = tmp_path / "studies"
    series(s / "a", kind="covid", seed=1)
    series(s / "b", kind="covid", seed=2)
    series(s / "c", kind="covid", seed=3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_path,label,patient_id,split\n"
                        "studies/a,covid,P1,train\nstudies/b,covid,P1,test\n"
                        "studies/c,covid,P2,train\n")
    out = tmp_path / "out"
    proc = run_cli(f"--input={manifest}", *common_flags(out, tmp_path / "salt"), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "patient_split_conflict" in proc.stderr  # the log says so, by pseudonymous names
    errors = {r["study"].split(".")[0]: r["reason"] for r in failures(out)
              if r["level"] == "error"}
    assert errors == {"line00002": "patient_split_conflict",
                      "line00003": "patient_split_conflict"}
    assert json.loads((out / "manifest.json").read_text())["studies"]["written"] == 1
    assert run_cli(f"--input={manifest}", "--strict",
                   *common_flags(tmp_path / "o2", tmp_path / "salt"), check=False
                   ).returncode == 1


# ------------------------------------------------------------------ good data
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    phantom.write_dataset(root / "studies", kinds=("normal", "covid", "bacterial"),
                          patients_per_kind=4, num_slices=SERIES_SLICES, matrix=MATRIX, seed=0)
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".key"}


def test_folder_layout_deterministic_and_patient_level(dataset, tmp_path):
    flags = ["--image_size=64", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5",
             "--classes=normal,covid,bacterial", "--seed=3"]
    # the same folder name: the dataset is named after it (manifest.json)
    run_cli(f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / 'a' / 'ds'}",
            "--workers=1", *flags)
    run_cli(f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / 'b' / 'ds'}",
            "--workers=2", *flags)
    a, b = _hashes(tmp_path / "a" / "ds"), _hashes(tmp_path / "b" / "ds")
    assert a == b  # same bytes, whatever the worker count
    assert any(n.startswith("train-") for n in a) and any(n.startswith("test-") for n in a)
    recs = read_records(tmp_path / "a" / "ds")
    split_of: dict[bytes, set] = {}
    for r in recs:
        split_of.setdefault(r[schema.PATIENT_KEY], set()).add(r[schema.SPLIT])
    assert all(len(v) == 1 for v in split_of.values())
    assert len(split_of) == 12  # patients with two studies are one patient
    manifest = json.loads((tmp_path / "a" / "ds" / "manifest.json").read_text())
    assert manifest["classes"] == ["normal", "covid", "bacterial"]
    assert manifest["flags"]["seed"] == 3
    for name, info in manifest["files"].items():
        assert info["sha256"] == a[name]
    img = cv2.imdecode(np.frombuffer(recs[0][schema.IMAGE], np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (64, 64) and img.dtype == np.uint8


def test_no_patient_identifiers_in_outputs(dataset, tmp_path):
    out = tmp_path / "out"
    run_cli(f"--input={dataset / 'studies'}", f"--output_dir={out}", "--workers=1",
            "--image_size=64", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5")
    blob = b"".join(p.read_bytes() for p in out.iterdir() if p.suffix in (".json", ".csv"))
    import gzip

    for p in out.glob("*.tfrecord.gz"):
        blob += gzip.decompress(p.read_bytes())
    ds = pydicom.dcmread(next((dataset / "studies" / "covid").rglob("*.dcm")))
    for secret in (ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID, ds.SOPInstanceUID,
                   ds.SeriesInstanceUID, "PHANTOM-"):
        assert secret.encode() not in blob, secret


def test_manifest_input_with_site_and_split(tmp_path):
    manifest = phantom.write_dataset(tmp_path / "ds", kinds=("normal", "covid"),
                                     patients_per_kind=4, num_slices=SERIES_SLICES, matrix=MATRIX,
                                     seed=1, layout="manifest")
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["split"] = "test"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    run_cli(f"--input={manifest}", f"--output_dir={out}", "--workers=2", "--image_size=64",
            f"--salt_file={tmp_path / 'salt'}", "--min_slices=5")
    m = json.loads((out / "manifest.json").read_text())
    sites = {site for split in m["counts"].values() for lab in split.values() for site in lab}
    assert sites == {"site_a", "site_b"}
    first_label = rows[0]["label"]
    assert m["counts"]["test"][first_label][rows[0]["site"]]["studies"] >= 1


def test_resume_uses_the_spool(dataset, tmp_path, monkeypatch):
    """A run killed after processing leaves its spool; the next run reuses it."""
    from data_prep import build_tfrecords, pipeline

    out = tmp_path / "out"
    argv = ["prog", f"--input={dataset / 'studies'}", f"--output_dir={out}", "--workers=1",
            "--image_size=64", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5"]
    flags = build_tfrecords.FLAGS
    flags.unparse_flags()
    flags(argv)
    calls = []
    real = pipeline.process_study

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "process_study", counting)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing shards")

    monkeypatch.setattr(pipeline, "_write_outputs", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tfrecords.main(argv[:1])
    first = len(calls)
    assert first == 15 and len(list((out / ".partial").glob("*.pkl"))) == 15
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "process_study", counting)
    assert build_tfrecords.main(argv[:1]) == 0
    assert len(calls) == first  # nothing processed twice
    assert not (out / ".partial").exists()
    flags.unparse_flags()


def test_repeated_3to1_split(dataset, tmp_path):
    out = tmp_path / "out"
    run_cli(f"--input={dataset / 'studies'}", f"--output_dir={out}", "--workers=2",
            "--image_size=32", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5",
            "--split_scheme=repeated_3to1", "--repeat=2", "--seed=4")
    m = json.loads((out / "manifest.json").read_text())
    assert m["repeat"] == 2 and len(m["repeats"]) == 5
    chosen = m["repeats"][2]
    assert set(chosen) == {"train", "val"}
    for r in read_records(out):
        assert r[schema.PATIENT_KEY].decode() in chosen[r[schema.SPLIT].decode()]
    assert sorted(p.name.split("-")[0] for p in out.glob("*.gz")) == ["train", "val"]


def test_help_and_missing_input():
    proc = run_cli("--helpfull", check=False)  # absl prints the help and exits 1
    for name in ("--input", "--output_dir", "--workers", "--seed", "--strict", "--runner"):
        assert name in proc.stdout
    proc = run_cli(check=False)
    assert proc.returncode != 0 and "input" in proc.stderr


def test_the_dataset_is_never_named_after_the_input_folder(tmp_path):
    # a hospital export's folder name can hold a patient id and a date
    root = tmp_path / "DOE_JOHN_19700101"
    phantom.write_dataset(root, kinds=("normal", "covid"), patients_per_kind=2,
                          num_slices=SERIES_SLICES, matrix=MATRIX, seed=2)
    proc = run_cli(f"--input={root}", "--image_size=64", "--min_slices=5", check=False)
    assert proc.returncode == 1 and "give --output_dir or --dataset" in proc.stderr
    assert not (REPO / "tfrecords" / "DOE_JOHN_19700101").exists()
    out = tmp_path / "out"
    run_cli(f"--input={root}", f"--output_dir={out}", "--image_size=64", "--min_slices=5",
            f"--salt_file={tmp_path / 'salt'}")
    text = (out / "manifest.json").read_text()
    assert json.loads(text)["dataset"] == "out" and "DOE_JOHN" not in text



def _planted_patient_ids(folder: Path) -> set[str]:
    ids = set()
    for f in folder.rglob("*"):
        if f.is_file():
            try:
                ids.add(str(pydicom.dcmread(f, stop_before_pixels=True).PatientID))
            except Exception:  # noqa: BLE001 - not a DICOM file
                continue
    return ids


def test_the_split_the_record_order_and_the_folds_follow_the_seed_not_the_salt(dataset,
                                                                              tmp_path):
    from covid_keras.training import folds

    ids = _planted_patient_ids(dataset / "studies")
    raw_of: dict[str, str] = {}  # salted patient key (either salt) -> raw id

    def build(name: str, salt: str, seed: int) -> dict[str, str]:
        """raw patient id (planted by this test's phantom) -> split."""
        (tmp_path / f"{name}.key").write_text(salt * 4)
        run_cli(f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / name}",
                "--workers=1", "--image_size=32", f"--salt_file={tmp_path / name}.key",
                "--min_slices=5", f"--seed={seed}")
        raw_of.update({salted_key((salt * 4).encode(), "patient", i): i for i in ids})
        return {raw_of[r[schema.PATIENT_KEY].decode()]: r[schema.SPLIT].decode()
                for r in read_records(tmp_path / name)}

    def shards(name: str) -> dict[str, list[tuple[str, str]]]:
        """shard -> its records in order: (raw patient id, salt-free content digest)."""
        import tensorflow as tf

        return {os.path.basename(f): [
            (raw_of[r[schema.PATIENT_KEY].decode()], schema.content_digest(r))
            for r in map(schema.parse, (x.numpy() for x in tf.data.TFRecordDataset(
                f, compression_type="GZIP")))]
            for f in sorted(glob.glob(str(tmp_path / name / "*.tfrecord.gz")))}

    def fold_of(name: str) -> dict[str, int]:
        table, order = folds.patients_and_order(str(tmp_path / name), ["train", "val"])
        return {raw_of[k]: f for k, f in folds.assign_folds(table, 3, 0, order).items()}

    def manifest(name: str) -> dict:
        return json.loads((tmp_path / name / "manifest.json").read_text())

    a = build("a", "first-salt", 3)
    b = build("b", "other-salt", 3)
    c = build("c", "first-salt", 4)
    assert len(a) == 12 and len(set(a.values())) > 1
    assert a == b  # another salt (another folder, a rebuild elsewhere): the same split
    assert a.keys() == c.keys() and a != c  # another --seed: another split
    # ... and the same records in the same order in each shard (a seeded training on either
    # is the same training), the same folds for `train --folds`, one content digest
    assert shards("a") == shards("b")
    assert sum(len(v) for v in shards("a").values()) > 12
    assert fold_of("a") == fold_of("b") and len(set(fold_of("a").values())) == 3
    assert manifest("a")["content_sha256"] == manifest("b")["content_sha256"]
    assert manifest("a")["files"] != manifest("b")["files"]  # the salted keys differ
    assert manifest("c")["content_sha256"] != manifest("a")["content_sha256"]


# ------------------------------------------------------------------ a TensorFlow user's CLI
def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1, lines
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_flag_errors_are_absl_lines(tmp_path):
    _one_line_error(run_cli(f"--output_dir={tmp_path / 'o'}", check=False), "--input")
    line = _one_line_error(run_cli("--input=x", f"--output_dir={tmp_path / 'o'}",
                                   "--image_sise=64", check=False),
                           "Unknown command line flag 'image_sise'")
    assert "Did you mean: image_size" in line
    _one_line_error(run_cli("--input=x", f"--output_dir={tmp_path / 'o'}", "stray",
                            check=False), "unexpected argument", "stray")
    assert not list(tmp_path.iterdir())


def test_run_time_errors_are_one_line_and_nothing_is_written(dataset, tmp_path):
    salt = tmp_path / "keys" / "salt"
    secret_name = tmp_path / "DOE_JOHN_19700101"  # the input's own name is never echoed
    cases = [
        ([f"--input={secret_name}", f"--output_dir={tmp_path / 'o'}"], "--input"),
        ([f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / 'o'}",
          "--split_fractions=0.5,0.5"], "--split_fractions"),
        ([f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / 'o'}",
          "--image_size=8"], "image_size"),
        ([f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / 'o'}",
          "--val_from_train=1.5"], "--val_from_train"),
    ]
    (tmp_path / "a_file").write_text("")  # an output path that cannot be made
    cases.append(([f"--input={dataset / 'studies'}", f"--output_dir={tmp_path / 'a_file' / 'o'}"],
                  "--output_dir"))
    for args, word in cases:
        proc = run_cli(*args, f"--salt_file={salt}", check=False)
        line = _one_line_error(proc, "data_prep.build_tfrecords: error:", word)
        assert "DOE_JOHN" not in proc.stderr + proc.stdout, line
        assert proc.returncode == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], args  # no salt, no
        # output folder
    proc = run_cli(*cases[1][0], f"--salt_file={salt}", "--verbosity=1", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr  # -v 1: the traceback


def test_excluded_class_empty_split_and_progress(tmp_path):
    """A binary task on a 3-class tree: the third class is excluded (counted apart, not a
    failure, --strict passes); 2 patients a class at 60/10/30 leave val empty: a warning
    naming it, and manifest.json says so."""
    phantom.write_dataset(tmp_path / "studies", kinds=("normal", "covid", "bacterial"),
                          patients_per_kind=2, num_slices=SERIES_SLICES, matrix=MATRIX, seed=5)
    out = tmp_path / "out"
    proc = run_cli(f"--input={tmp_path / 'studies'}", f"--output_dir={out}", "--workers=1",
                   "--image_size=32", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5",
                   "--classes=covid,bacterial", "--strict")
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"] == ["covid", "bacterial"]
    assert m["studies"]["excluded"] == 2  # the 2 normal patients' studies
    assert m["studies"]["input"] == 6 and m["studies"]["written"] == 4
    assert m["studies"]["failed"] == 0 and not m["studies"]["failed_by_reason"]
    assert not [r for r in failures(out) if r["level"] == "error"]
    assert "excluded" in proc.stdout
    assert "val" in m["empty_splits"] and "no patient" in m["empty_splits"]["val"]
    assert any("'val' is empty" in w for w in m["warnings"])
    assert "split 'val' is empty" in proc.stderr
    assert {r[schema.SPLIT].decode() for r in read_records(out)} == {"train", "test"}
    # not on a terminal: each phase ends with a progress log line
    for phase in ("scan: 4/4 studies", "preprocess: 4/4 studies",
                  "write shards: 4/4 studies"):
        assert phase in proc.stderr, proc.stderr[-2000:]


def test_manifest_exclude_labels_and_unknown_labels(dataset, tmp_path):
    rows = ["study_path,label"]
    for kind_dir in sorted((dataset / "studies").iterdir()):
        for i, study in enumerate(sorted(kind_dir.iterdir())):
            label = "other" if kind_dir.name == "normal" and i == 0 else kind_dir.name
            rows.append(f"{study},{label}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = run_cli(f"--input={manifest}", f"--output_dir={out}", "--workers=1",
                   "--image_size=32", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5",
                   "--classes=covid,bacterial", "--exclude_labels=normal",
                   "--split_fractions=1,0,0", check=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["studies"]["excluded"] == 4
    assert m["studies"]["failed_by_reason"] == {"label_unknown": 1}  # "other": a typo?
    assert m["empty_splits"] == {} and m["warnings"] == []  # val, test: no share asked
    assert proc.returncode == 0
    assert run_cli(f"--input={manifest}", f"--output_dir={tmp_path / 'o2'}", "--workers=1",
                   "--image_size=32", f"--salt_file={tmp_path / 'salt'}", "--min_slices=5",
                   "--classes=covid,bacterial", "--exclude_labels=normal", "--strict",
                   "--split_fractions=1,0,0", check=False).returncode == 1


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    import io
    import logging

    from data_prep.progress import Progress

    caplog.set_level(logging.INFO, logger="data_prep")
    with Progress(3, "scan", "study", every_s=0.0, stream=io.StringIO()) as bar:
        for _ in range(3):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("scan: 1/3 studies (33 %)") and "left" in lines[0]
    assert lines[-1].startswith("scan: 3/3 studies in ")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    caplog.clear()
    term = Terminal()
    with Progress(2, "write shards", "study", every_s=0.0, stream=term) as bar:
        bar.update(2)
    assert not caplog.records and "write shards" in term.getvalue()  # tqdm's bar


def test_output_dir_on_another_file_system(dataset, tmp_path):
    """--output_dir through tf.io.gfile (TensorFlow's in-memory ram:// file system), the
    default salt file there too."""
    import tensorflow as tf

    from data_prep import build_tfrecords

    out = f"ram://data_prep_test_{os.getpid()}/ds"
    tf.io.gfile.makedirs(out)
    tf.io.gfile.GFile(f"{out}/train-00007-of-00009.tfrecord.gz", "wb").write(b"stale")
    flags = build_tfrecords.FLAGS
    flags.unparse_flags()
    flags(["prog", f"--input={dataset / 'studies'}", f"--output_dir={out}", "--workers=1",
           "--image_size=32", "--min_slices=5", "--split_fractions=1,0,0"])
    try:
        assert build_tfrecords.main(["prog"]) == 0
    finally:
        flags.unparse_flags()
    names = set(tf.io.gfile.listdir(out))
    m = json.loads(tf.io.gfile.GFile(f"{out}/manifest.json").read())
    assert m["dataset"] == "ds" and m["studies"]["written"] == 15
    assert {"manifest.json", "failures.csv", "patient_salt.key"} <= names
    assert set(m["files"]) == {n for n in names if n.endswith(".tfrecord.gz")}  # stale: gone
    n = sum(1 for name in m["files"] for _ in tf.data.TFRecordDataset(
        f"{out}/{name}", compression_type="GZIP"))
    assert n == m["slices"]["kept"] > 0
    assert not any(".tmp-" in name for name in names)
