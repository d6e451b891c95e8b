"""The Beam runner (DirectRunner) writes the same shards as the local runner."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from data_prep import phantom
from tests.helpers import failures, run_cli

pytest.importorskip("apache_beam", reason="needs the [beam] extra: pip install -e .[beam]")

pytestmark = [pytest.mark.beam, pytest.mark.slow]

MATRIX = 64
SPACING = 350.0 / MATRIX
SLICES = 20


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.tfrecord.gz"))}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("beam")
    rows = []
    for n, (kind, label) in enumerate([("covid", "covid"), ("covid", "covid"),
                                       ("normal", "normal"), ("normal", "normal"),
                                       ("covid", "covid"), ("normal", "normal")]):
        name = f"s{n}"
        phantom.write_series(root / "studies" / name, kind=kind, seed=n, num_slices=SLICES,
                             matrix=MATRIX, pixel_spacing_mm=SPACING,
                             slice_thickness_mm=300.0 / SLICES, patient_id=f"P{n // 2 + n % 2}")
        rows.append((f"studies/{name}", label))
    (root / "studies" / "s1" / "notes.txt").write_text("not DICOM")  # a warning row
    (root / "studies" / "empty").mkdir()
    rows.append(("studies/empty", "covid"))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_path", "label"])
        w.writerows(rows)
    return manifest


def test_beam_matches_local(studies, tmp_path):
    flags = [f"--input={studies}", f"--salt_file={tmp_path / 'salt'}", "--image_size=64",
             "--min_slices=5", "--shard_size_mb=0.02", "--seed=1"]
    # the same folder name: the dataset is named after it (manifest.json)
    run_cli(*flags, f"--output_dir={tmp_path / 'local' / 'ds'}", "--runner=local", "--workers=1")
    proc = run_cli(*flags, f"--output_dir={tmp_path / 'beam' / 'ds'}", "--runner=beam",
                   "--beam_runner=DirectRunner", "--direct_num_workers=2",
                   "--direct_running_mode=multi_processing")
    assert "wrote" in proc.stdout
    local, beam = _hashes(tmp_path / "local" / "ds"), _hashes(tmp_path / "beam" / "ds")
    assert local and beam == local  # byte-identical shards
    assert {n.split("-")[0] for n in local} >= {"train", "test"}
    assert max(int(n.split("-of-")[1][:5]) for n in local) > 1  # several shards in a split
    assert (tmp_path / "beam" / "ds" / "failures.csv").read_bytes() == \
        (tmp_path / "local" / "ds" / "failures.csv").read_bytes()
    errors = {r["study"].split(".")[0]: r["reason"] for r in failures(tmp_path / "beam" / "ds")
              if r["level"] == "error"}
    assert errors == {"line00008": "empty_study"}  # studies/empty, the manifest's 8th line
    # the junk file is reported once (scan warnings are not repeated by processing)
    assert sum(r["reason"] == "not_dicom" for r in failures(tmp_path / "beam" / "ds")) == 1
    assert (tmp_path / "beam" / "ds" / "manifest.json").read_bytes() == \
        (tmp_path / "local" / "ds" / "manifest.json").read_bytes()
    m_beam = json.loads((tmp_path / "beam" / "ds" / "manifest.json").read_text())
    assert "runner" not in m_beam["flags"]  # it cannot change a byte of the records
    assert m_beam["studies"] == {"input": 7, "written": 6, "failed": 1, "excluded": 0,
                                 "failed_by_reason": {"empty_study": 1}}
    assert "Running pipeline" not in proc.stderr  # Beam's INFO lines: only with -v 1
    assert not (tmp_path / "beam" / "ds" / ".partial").exists()


def test_beam_patient_split_conflict_fails_that_patient(tmp_path):
    for name in ("a", "b"):
        phantom.write_series(tmp_path / "studies" / name, kind="covid", seed=ord(name),
                             num_slices=SLICES, matrix=MATRIX, pixel_spacing_mm=SPACING)
    manifest = tmp_path / "m.csv"
    manifest.write_text("study_path,label,patient_id,split\n"
                        "studies/a,covid,P1,train\nstudies/b,covid,P1,test\n")
    proc = run_cli(f"--input={manifest}", f"--output_dir={tmp_path / 'out'}", "--runner=beam",
                   f"--salt_file={tmp_path / 'salt'}", "--image_size=64", "--min_slices=5",
                   check=False)
    assert proc.returncode == 1  # its only patient failed: nothing was written
    assert "patient_split_conflict" in proc.stderr
    reasons = [r["reason"] for r in failures(tmp_path / "out") if r["level"] == "error"]
    assert reasons == ["patient_split_conflict"] * 2


def test_beam_rejects_a_misspelled_flag(studies, tmp_path):
    """Beam would drop an unknown option with a warning and run at the default size."""
    proc = run_cli(f"--input={studies}", f"--output_dir={tmp_path / 'out'}", "--runner=beam",
                   f"--salt_file={tmp_path / 'salt'}", "--beam_runner=DirectRunner",
                   "--image_sise=64", check=False)
    assert proc.returncode != 0
    assert "Unknown command line flag 'image_sise'" in proc.stderr
    assert "Did you mean: image_size" in proc.stderr
    assert not list((tmp_path / "out").glob("*.tfrecord.gz"))


def test_beam_output_dir_on_another_file_system(tmp_path):
    """--output_dir on TensorFlow's ram:// file system (in-process DirectRunner): the spool
    there too (Beam does not know ram://: tf.io.gfile), the outputs copied over."""
    import tensorflow as tf

    from data_prep import build_tfrecords

    phantom.write_dataset(tmp_path / "studies", kinds=("normal", "covid"), patients_per_kind=2,
                          num_slices=SLICES, matrix=MATRIX, seed=1)
    out = f"ram://beam_test_{tmp_path.name}/ds"
    flags = build_tfrecords.FLAGS
    flags.unparse_flags()
    flags(["prog", f"--input={tmp_path / 'studies'}", f"--output_dir={out}", "--runner=beam",
           "--image_size=32", "--min_slices=5", "--split_fractions=1,0,0"])
    build_tfrecords._BEAM_ARGV[:] = ["--runner=DirectRunner",
                                     "--direct_running_mode=in_memory"]
    try:
        assert build_tfrecords.main(["prog"]) == 0
    finally:
        flags.unparse_flags()
        build_tfrecords._BEAM_ARGV[:] = []
    names = set(tf.io.gfile.listdir(out))
    m = json.loads(tf.io.gfile.GFile(f"{out}/manifest.json").read())
    assert m["studies"]["written"] == 4 and set(m["files"]) <= names
    assert not any(n.startswith(".partial") for n in names)


def test_spool_files_go_through_beams_file_systems(tmp_path):
    """A scheme Beam knows is served by Beam's FileSystems (a test file system here)."""
    from apache_beam.io.localfilesystem import LocalFileSystem

    from data_prep import storage

    calls = []

    def strip(p):
        if isinstance(p, list):
            return [strip(x) for x in p]
        return p[len("dptest://"):] if isinstance(p, str) and p.startswith("dptest://") else p

    class TestFileSystem(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "dptest"

    for name in ("create", "open", "exists", "mkdirs", "match", "delete", "rename"):
        def method(self, *args, _name=name, **kw):
            calls.append(_name)
            return getattr(LocalFileSystem, _name)(self, *[strip(a) for a in args], **kw)
        setattr(TestFileSystem, name, method)

    spool = f"dptest://{tmp_path}/out/.partial"
    storage.makedirs(spool)
    path = storage.join(spool, "a.pkl")
    storage.write_bytes(path, b"x" * 10)
    storage.write_bytes(path, b"y" * 12)  # replaced whole
    assert storage.exists(path) and storage.read_bytes(path) == b"y" * 12
    assert storage.size(path) == 12
    assert (tmp_path / "out" / ".partial" / "a.pkl").read_bytes() == b"y" * 12
    storage.remove(path)
    assert not storage.exists(path)
    storage.rmtree(spool)
    assert not (tmp_path / "out" / ".partial").exists()
    assert {"create", "open", "rename", "match", "delete"} <= set(calls)
