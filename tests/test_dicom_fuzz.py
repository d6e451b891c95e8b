"""Issue 32: one bad file never costs its study; the series is chosen by anatomy, not by file
count; slices sharing a SOPInstanceUID are named and keyed apart.

The sweep plants, in one sampled file of a good 16-slice 64 x 64 study, each of three
corruptions (unknown VR, wrong-length value, empty value: tests/dicom_corpus.py) in every tag
data_prep reads, and runs the study-level functions in-process (scan_study, process_study).
Every mutant must be written from its other files, and the bad file must either be named in
a warning or have been used exactly as the clean file was (same records).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from covid_keras.core import schema
from data_prep import dicom_io, redact
from data_prep.preprocess import PrepConfig
from data_prep.study import (
    ScanConfig,
    StudyResult,
    StudyScan,
    list_files,
    process_study,
    scan_study,
)
from tests import dicom_corpus as corpus
from tests.helpers import DICOM_SALT, MATRIX, edit_dicom, study_task

CFG = ScanConfig(salt=DICOM_SALT, min_slices=5, num_slices=8)  # 16 slices: 8 sampled, 8 spares
PREP = PrepConfig(image_size=32)


@dataclass
class Run:
    folder: Path
    scan: StudyScan
    result: StudyResult
    members: set[str]  # file names of the chosen series (every one is sampled or a spare)
    names: dict[str, str]  # file name -> pseudonymous name

    @property
    def issues(self):
        return self.scan.issues + self.result.issues

    def named(self, file_name: str) -> set[str]:
        """The reasons of the issues that name this file."""
        return {i.reason for i in self.issues if i.file == self.names[file_name]}

    def records(self) -> dict[int, tuple]:
        return {int(r[schema.SLICE_INDEX]): (float(r[schema.POSITION_MM]), r[schema.IMAGE],
                                             r[schema.MASK]) for r in self.result.records}


def run_study(folder: Path) -> Run:
    scan = scan_study(study_task(folder), CFG)
    result = process_study(scan, "train", 0, CFG, PREP, 0)
    files = list_files(str(folder))
    # With 8 of up to 16 slices sampled, the spares are all the others: the whole series.
    members = {Path(s.path).name for s in scan.sampled + scan.spares}
    assert len(members) == scan.slice_count or scan.error is not None
    names = {Path(p).name: n for p, n in redact.file_names(files, str(folder), DICOM_SALT).items()}
    return Run(folder, scan, result, members, names)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Run, str]:
    """The good study and its victim: a sampled slice whose record is written (so a
    corruption of its pixels is met when the study is processed)."""
    folder = tmp_path_factory.mktemp("sweep") / "clean"
    corpus.good_study(folder)
    run = run_study(folder)
    assert run.scan.error is None and run.result.error is None and not run.issues
    written = {int(r[schema.SLICE_INDEX]) for r in run.result.records}
    sampled = [s for s in run.scan.sampled if s.index in written]
    victim = Path(sampled[len(sampled) // 2].path).name
    return run, victim


def mutate(clean_run: Run, dst: Path, victim: str, damage) -> Run:
    corpus.copy_study(clean_run.folder, dst)
    p = dst / victim
    p.write_bytes(damage(p.read_bytes()))
    return run_study(dst)


def judge(clean_run: Run, run: Run, victim: str) -> tuple[int, int, list[str]]:
    """(internal_error rows, good files lost, problems) of one mutant."""
    error = run.result.error or run.scan.error  # the study's one error row, if any
    internal = sum(i.reason == "internal_error" for i in run.issues + [error] if i)
    good = clean_run.members - {victim}
    lost = len(good) if error is not None else len(good - run.members)  # not written: all
    problems = []
    if error is not None:
        problems.append(f"not written: {error.reason} ({error.detail})")
    if lost:
        problems.append(f"{lost} good files lost")
    if not run.named(victim):  # not named: then used exactly as the clean file was
        if victim not in run.members:
            problems.append("the bad file left the series without being named")
        elif run.records() != clean_run.records():
            problems.append("the bad file was used, unnamed, and the records changed")
        keys = (run.scan.study_key, run.scan.patient_key, run.scan.series_key)
        if keys != (clean_run.scan.study_key, clean_run.scan.patient_key,
                    clean_run.scan.series_key):
            problems.append("the bad file changed the study's keys, unnamed")
    return internal, lost, problems


def test_every_read_tag_three_corruptions_one_file(clean, tmp_path):
    """Every tag data_prep reads x (unknown VR, wrong-length value, empty value) in one
    sampled file: the study is written from its other files, the file named (or used as
    the clean file was, when the damage changes nothing it reads)."""
    clean_run, victim = clean
    mutants = corpus.mutants()
    assert len(mutants) == 3 * sum(len(t) for t in corpus.SWEPT_TAGS.values())
    internal = lost = 0
    failures, outcome = [], {}
    for what, keyword, kind in mutants:
        run = mutate(clean_run, tmp_path / f"{keyword}-{kind}", victim,
                     lambda data: corpus.corrupt(data, keyword, kind))
        i, n, problems = judge(clean_run, run, victim)
        internal, lost = internal + i, lost + n
        failures += [f"{keyword} / {kind}: {p}" for p in problems]
        outcome[(keyword, kind)] = ",".join(sorted(run.named(victim))) or "used as is"
    print(f"mutation sweep: {len(mutants)} mutants ({len(mutants) // 3} tags x 3), "
          f"internal_error rows {internal}, good files lost {lost}")
    assert not failures, "\n".join(failures)
    assert internal == 0 and lost == 0
    # the issue's own cases, and what each corruption of a geometry tag is called
    assert outcome[("ImageOrientationPatient", "unknown_vr")] == "bad_vr"
    assert outcome[("PixelData", "empty")] == "truncated_file"
    for kind in corpus.CORRUPTIONS:
        assert outcome[("Rows", kind)] in ("bad_vr", "bad_tag_value")
    assert outcome[("ImagePositionPatient", "empty")] == "missing_position"
    assert outcome[("RescaleIntercept", "empty")] == "missing_rescale"
    assert outcome[("PixelSpacing", "wrong_length")] == "mixed_pixel_spacing"
    assert outcome[("ImageOrientationPatient", "empty")] == "missing_orientation"
    # a tag the pipeline never reads: whatever it holds costs nothing
    assert {outcome[("SliceThickness", kind)] for kind in corpus.CORRUPTIONS} == {"used as is"}


def test_the_same_corruption_in_every_file_is_named_never_internal(clean, tmp_path):
    """The systematic case (an exporter that writes every file the same wrong way): the study
    is written, or fails with the files' own reason, each file named - never internal_error."""
    clean_run, _ = clean
    outcomes = {}
    for what, keyword, kind in corpus.mutants():
        folder = corpus.copy_study(clean_run.folder, tmp_path / f"{keyword}-{kind}")
        for p in folder.iterdir():
            p.write_bytes(corpus.corrupt(p.read_bytes(), keyword, kind))
        run = run_study(folder)
        error = run.scan.error or run.result.error
        assert "internal_error" not in {i.reason for i in run.issues} | {error and error.reason}
        outcomes[(keyword, kind)] = error.reason if error else "written"
        if error is not None and error.reason not in ("non_ct_modality", "no_lung_slices",
                                                      "compressed_no_decoder"):
            named = {i.file for i in run.issues if i.reason == error.reason}
            assert len(named) >= len(run.scan.sampled) or len(named) == len(run.names), \
                (keyword, kind, error)
    print(f"every-file sweep: {len(outcomes)} mutants, "
          f"{sum(v == 'written' for v in outcomes.values())} written, the others named")
    assert outcomes[("ImagePositionPatient", "empty")] == "written"  # ordered otherwise
    assert outcomes[("Rows", "empty")] == "bad_tag_value"
    assert outcomes[("ImageOrientationPatient", "unknown_vr")] == "bad_vr"


def _random_damage(rng: random.Random, header_end: int):
    kind = rng.choice(("flip", "truncate", "insert"))

    def damage(data: bytes) -> bytes:
        b = bytearray(data)
        if kind == "flip":
            for _ in range(rng.randint(1, 40)):
                b[rng.randrange(128, header_end)] = rng.randrange(256)
        elif kind == "truncate":
            del b[rng.randrange(0, len(b)):]
        else:
            at = rng.randrange(132, header_end)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return bytes(b)
    return damage


def test_random_damage_to_one_file(clean, tmp_path):
    """Byte flips, truncations and insertions (seeded) in one file's header: never an
    internal_error, never a good file lost."""
    clean_run, victim = clean
    rng = random.Random(32)
    header_end = (clean_run.folder / victim).stat().st_size - 2 * MATRIX * MATRIX
    internal = lost = 0
    failures = []
    n = 30
    for k in range(n):
        run = mutate(clean_run, tmp_path / f"m{k}", victim, _random_damage(rng, header_end))
        i, m, problems = judge(clean_run, run, victim)
        internal, lost = internal + i, lost + m
        failures += [f"mutant {k}: {p}" for p in problems
                     # a flipped digit of a value (a position, a UID) is no damage a file
                     # can show: it is used, as the file says
                     if not p.startswith("the bad file was used")]
    print(f"random damage: {n} mutants, internal_error rows {internal}, good files lost {lost}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ items 1 and 2, as reported
def test_unknown_vr_in_one_file_costs_that_file_only(tmp_path):
    study = tmp_path / "study"
    paths = corpus.good_study(study, num_slices=19)
    bad = paths[7]
    bad.write_bytes(corpus.corrupt(bad.read_bytes(), "ImageOrientationPatient", "unknown_vr"))
    run = run_study(study)
    assert run.scan.error is None and run.result.error is None and run.result.records
    assert run.scan.slice_count == 18
    assert run.named(bad.name) == {"bad_vr"}
    (w,) = [i for i in run.issues if i.reason == "bad_vr"]
    assert w.detail == "ImageOrientationPatient has an unknown Value Representation"
    assert w.level == "warning"


def test_empty_pixel_data_in_a_sampled_file_is_substituted(tmp_path):
    study = tmp_path / "study"
    corpus.good_study(study, num_slices=16)
    clean = run_study(study)
    written = {int(r[schema.SLICE_INDEX]) for r in clean.result.records}
    sampled = next(s for s in clean.scan.sampled if s.index in written)
    ds = pydicom.dcmread(sampled.path)
    ds.PixelData = b""
    ds.save_as(sampled.path)
    run = run_study(study)
    assert run.result.error is None
    assert run.named(Path(sampled.path).name) == {"truncated_file"}
    (sub,) = [i for i in run.issues if i.reason == "slice_substituted"]
    assert "used in place of slice" in sub.detail
    assert len(run.result.records) >= len(clean.result.records) - 1


# ------------------------------------------------------------------ item 3: the series choice
def _only_reasons(run: Run, reason: str) -> list[str]:
    return [i.detail for i in run.issues if i.reason == reason]


def test_many_tiny_slices_do_not_outvote_the_chest(tmp_path):
    """A real 19-slice series beside 473 2 x 2 "CT" slices of the same study: the chest
    series is chosen, and the warning says why the tiny one was passed over."""
    study = tmp_path / "study"
    corpus.good_study(study / "chest", num_slices=19, study_uid="1.2.826.0.1.3680043.8.498.7")
    corpus.tiny_series(study / "tiny", 473, study_uid="1.2.826.0.1.3680043.8.498.7")
    run = run_study(study)
    assert run.scan.error is None and run.result.error is None and run.result.records
    assert run.scan.slice_count == 19
    (why,) = _only_reasons(run, "series_rejected")
    assert why.startswith("series 1/2 (473 files): passed over for series 2/2 (19 slices)")
    assert "matrix 2 x 2 under the 64-pixel floor" in why
    assert "a field of view of 1 mm, under 150 mm" in why


def _abdomen(n: int) -> np.ndarray:
    """An axial series with a body and no lung (soft tissue in an ellipse, air around)."""
    yy, xx = np.mgrid[:MATRIX, :MATRIX]
    body = ((yy - MATRIX / 2) / (0.35 * MATRIX)) ** 2 + ((xx - MATRIX / 2) / (0.45 * MATRIX)) ** 2
    img = np.where(body <= 1.0, 40.0, -1000.0).astype(np.float32)
    img[MATRIX // 2, MATRIX // 2] = 300.0  # not constant inside
    return np.repeat(img[None], n, axis=0)


def test_lung_on_a_probe_slice_beats_the_slice_count(tmp_path, monkeypatch):
    """Two series pass the header checks: the one without lung on its probe slices loses,
    although it has more slices. Only a few probe slices are decoded."""
    study = tmp_path / "study"
    uid = "1.2.826.0.1.3680043.8.498.8"
    corpus.good_study(study / "chest", num_slices=12, study_uid=uid)
    from tests.helpers import series

    series(study / "abdomen", volume_hu=_abdomen(30), seed=3, study_uid=uid,
           series_number=5, slice_thickness_mm=10.0)
    decoded = []
    real = dicom_io.read_hu
    monkeypatch.setattr(dicom_io, "read_hu",
                        lambda h, *a, **k: decoded.append(h.path) or real(h, *a, **k))
    scan = scan_study(study_task(study), CFG)
    assert scan.error is None and scan.slice_count == 12
    assert len(decoded) <= 2 * dicom_io.PROBE_SLICES
    (why,) = [i.detail for i in scan.issues if i.reason == "series_rejected"]
    assert why == ("series 1/2 (30 files): passed over for series 2/2 (12 slices): no lung "
                   "found on its probe slices")


def test_the_slice_count_breaks_ties_and_one_series_is_never_probed(tmp_path, monkeypatch):
    study = tmp_path / "study"
    uid = "1.2.826.0.1.3680043.8.498.9"
    corpus.good_study(study / "a", num_slices=16, study_uid=uid, series_number=2)
    corpus.good_study(study / "b", num_slices=10, study_uid=uid, series_number=3, seed=4)
    decoded = []
    real = dicom_io.read_hu
    monkeypatch.setattr(dicom_io, "read_hu",
                        lambda h, *a, **k: decoded.append(h.path) or real(h, *a, **k))
    scan = scan_study(study_task(study), CFG)
    assert scan.slice_count == 16
    assert [i.detail for i in scan.issues if i.reason == "series_rejected"] == [
        "series 2/2 (10 files): fewer slices than the chosen series (16)"]
    # the longer series is probed first: lung on its middle slice ends the probing
    assert len(decoded) == 1 and Path(decoded[0]).parent.name == "a"
    # a study of one series decodes nothing while its headers are read
    shutil.rmtree(study / "b")
    monkeypatch.setattr(dicom_io, "read_hu", lambda *a, **k: pytest.fail("pixels decoded"))
    assert scan_study(study_task(study), CFG).slice_count == 16


def test_a_tiny_series_alone_is_still_tried(tmp_path):
    """Usability chooses among series; it never rejects the only one (it then fails for
    what its pixels are)."""
    study = tmp_path / "study"
    corpus.tiny_series(study, 20)
    run = run_study(study)
    assert run.scan.error is None and run.scan.slice_count == 20
    assert run.result.error is not None and run.result.error.reason == "no_lung_slices"


# ------------------------------------------------------------------ item 4: shared SOP UIDs
def test_slices_sharing_a_sop_uid_are_named_and_keyed_apart(tmp_path):
    study = tmp_path / "study"
    paths = corpus.good_study(study, num_slices=12)
    clean = run_study(study)
    corpus.share_sop_uid(paths[:11])
    run = run_study(study)
    assert run.scan.error is None and run.result.error is None
    shared = [i for i in run.scan.issues if i.reason == "duplicate_sop_uid"]
    assert {i.file for i in shared} == {run.names[p.name] for p in paths[:11]}
    assert all(i.detail.startswith("11 slices of the series share one SOPInstanceUID")
               for i in shared)
    keys = [r[schema.SOP_KEY] for r in run.result.records]
    assert len(keys) == len(set(keys)) == len(clean.result.records)
    # the slice that kept its own UID keeps its key
    own = {s.sop_key for s in clean.scan.sampled + clean.scan.spares
           if Path(s.path).name == paths[11].name}
    assert own <= {s.sop_key for s in run.scan.sampled + run.scan.spares}
    assert run_study(study).result.records == run.result.records  # deterministic


# ------------------------------------------------------------------ one file against its series
@pytest.mark.parametrize("case", ["spacing_in_metres", "no_rescale", "multiframe",
                                  "other_matrix"])
def test_one_file_disagreeing_with_its_series_is_dropped_and_named(tmp_path, case):
    """What used to reject the whole series (one file's implausible spacing or frame
    count) or silently shift its HU by 1024 (a file without the series' rescale) now costs
    that file only."""
    study = tmp_path / "study"
    paths = corpus.good_study(study, num_slices=12)
    bad = paths[5]

    def change(ds, i):
        if case == "spacing_in_metres":
            ds.PixelSpacing = ["0.0007", "0.0007"]
        elif case == "no_rescale":
            del ds.RescaleSlope, ds.RescaleIntercept
        elif case == "multiframe":
            ds.NumberOfFrames = 2
        else:
            ds.Rows = MATRIX // 2
            ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]
    edit_dicom([bad], change)
    run = run_study(study)
    assert run.scan.error is None and run.result.error is None
    assert run.scan.slice_count == 11 and bad.name not in run.members
    expected = {"spacing_in_metres": "bad_pixel_spacing", "no_rescale": "missing_rescale",
                "multiframe": "multiframe_unsupported", "other_matrix": "mixed_matrix"}
    assert run.named(bad.name) == {expected[case]}


@pytest.mark.parametrize("shape", [(2, 2), (1, 7), (16, 16), (3, 4096)])
@pytest.mark.parametrize("spacing", [None, 0.1, 20.0])
def test_the_lung_mask_takes_any_image_size(shape, spacing):
    """A tiny image without PixelSpacing (0.7 mm at 512 scaled: 179 mm pixels) or a wide one
    shrunk for the mask (20 mm x 8) used to raise ValueError from the mask's own spacing
    check: an internal_error for what a file holds."""
    from data_prep.lung import lung_and_body_masks, lung_fraction

    hu = np.random.default_rng(0).uniform(-1024, 3071, shape).astype(np.float32)
    lung, body = lung_and_body_masks(hu, spacing)
    assert lung.shape == body.shape == shape
    assert 0.0 <= lung_fraction(hu, spacing) <= 1.0
