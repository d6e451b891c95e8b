"""Named reasons for rejected studies, files and slices.

Every problem data_prep meets has a reason code from :data:`REASONS`: it goes to
``failures.csv`` (``level`` = ``error`` when the study was not written, ``warning`` when it
was written anyway) and, counted, to ``manifest.json``. Tests assert on these codes, so they
are a contract: add new ones, never rename.

Naming, and what never appears downstream. A study is named in ``failures.csv``, the log and
``manifest.json`` by its *pseudonymous name*: where it came from in the input, plus a salted
hash of its path, e.g. ``line00017.3fa9c2d1e0`` (the manifest's 17th line) or
``entry00003.3fa9c2d1e0`` (the 3rd ``<label>/<study>`` entry of a folder input, in sorted
order). A file of a study is named ``file00012.5be0c1d2`` (the 12th file of the study's sorted
listing, and a salted hash of its path inside the study). Folder and file names, absolute
paths and DICOM tag values (names, ids, dates, descriptions, UIDs) are never written: they can
hold patient data. ``python -m data_prep.study_names --input=... --salt_file=...`` prints the
name -> path table on the operator's terminal (it writes no file). Details say what was wrong
in words and numbers of our own (counts, sizes, reason codes, the names of standard transfer
syntaxes), never a value read from the input. Library warnings (pydicom's, which quote tag
values) are captured and counted by kind in one ``library_warning`` row per study.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONS: dict[str, str] = {
    # whole study (level "error": nothing written for it)
    "unreadable_path": "the study path does not exist or cannot be read",
    "empty_study": "the study folder holds no files",
    "no_readable_slices": "no file in the study is DICOM or a PNG/JPEG slice",
    "mixed_dicom_and_images": "the study mixes DICOM files and slice images",
    "no_usable_series": "every series was rejected (see detail for each series' reason)",
    "localizer": "localizer / scout / topogram series",
    "non_ct_modality": "series modality is not CT",
    "single_slice": "series has a single slice",
    "non_axial": "series is not axial (coronal, sagittal or oblique reformat)",
    "multiframe_unsupported": "multi-frame (enhanced) DICOM is not supported (warning for a "
                              "multi-frame file in a series of single frames: dropped)",
    "too_few_slices": "series has fewer slices than --min_slices",
    "compressed_no_decoder": "compressed transfer syntax and no installed decoder supports it",
    "no_lung_slices": "no sampled slice kept enough lung (see the dropped-slice reasons)",
    "label_unknown": "the study's label is not in --classes",
    "duplicate_study": "the same study and series were already listed under another path",
    "patient_split_conflict": "a patient is assigned to two splits",
    "internal_error": "unexpected error while processing the study (a bug: please report)",
    "study_timeout": "the study took longer than --study_timeout_s (its worker is killed "
                     "when it does not stop by itself)",
    "out_of_memory": "the study needed more memory than --worker_memory_mb allows",
    "worker_crashed": "the worker process died while handling the study (a decoder crash, "
                      "or the OS killed it, e.g. for memory); a fresh worker goes on",
    "bad_pixel_spacing": "PixelSpacing absent-but-required, NaN, <= 0 or outside the "
                         "plausible range (e.g. in metres); rejected before any pixel is read "
                         "(warning for a minority of files of a series: they are dropped)",
    "mixed_matrix": "slices of the series differ in Rows x Columns (warning naming each file "
                    "dropped when the most common size still has enough slices; else error)",
    "mixed_pixel_spacing": "slices of the series differ in PixelSpacing, or lack it (warning "
                           "naming each file dropped when the most common spacing still has "
                           "enough slices; else error)",
    # manifest rows (level "error": the row's study is not processed; other rows go on)
    "missing_study_path": "the manifest row has no study_path",
    "missing_label": "the manifest row (or folder) has no label",
    "unknown_split": "the manifest row's split is not train, val or test (after --split_map)",
    "invalid_label": "the label is not printable text of at most 64 characters starting with "
                     "a letter or digit (NUL, control characters, formula-like '=+-@' starts)",
    "invalid_site": "the site is not printable text of at most 64 characters starting with "
                    "a letter or digit",
    "manifest_encoding": "a cell of the row is not text in the manifest's encoding (see "
                         "--manifest_encoding)",
    # single file (level "warning" unless it leaves the study empty)
    "not_dicom": "file is neither DICOM nor a PNG/JPEG slice; ignored",
    "not_regular_file": "not a regular file (FIFO, device, socket, dangling or looping link); "
                        "never opened",
    "file_too_large": "file larger than --max_file_mb; never read",
    "bad_rescale": "RescaleSlope / RescaleIntercept not a number, infinite, zero slope or "
                   "implausibly large: the slice is not read",
    "unreadable_file": "the file cannot be opened or read (permission denied, I/O error)",
    "bad_vr": "an element of the file's header has a Value Representation pydicom does not "
              "know (a damaged or non-conformant file); the file is not used",
    "bad_tag_value": "a value the file must have is empty or malformed (Rows, Columns, "
                     "NumberOfFrames, BitsAllocated: empty, the wrong number of values, not a "
                     "whole number; a binary element whose length is not a whole number of "
                     "values); the file is not used",
    "image_too_large": "image dimensions (from its header, before decoding) over "
                       "--max_image_pixels",
    "dicomdir": "DICOMDIR index file; ignored",
    "truncated_file": "file ends early (a DICOM preamble or header cut short) or its pixel data "
                      "is shorter than the header says",
    "pixel_decode_error": "pixel data could not be decoded",
    "image_decode_error": "the slice image could not be decoded",
    # warnings on studies that are still written
    "series_rejected": "another series of the study was rejected or passed over (detail says "
                       "why: its reason, or what made the chosen series the more usable chest "
                       "series - matrix, field of view, slice gap, lung on a probe slice - or "
                       "its slice count); a series of one file names it",
    "missing_rescale": "RescaleSlope/RescaleIntercept absent or empty: assumed slope 1, "
                       "intercept 0 when most of the series lacks them; a file lacking them "
                       "in a series that has them is dropped (its HU cannot be trusted)",
    "missing_position": "ImagePositionPatient absent, empty, malformed or not finite: a file "
                        "lacking it in a series that has it is dropped (named); when most of "
                        "the series lacks it, the series is ordered by InstanceNumber, else "
                        "SliceLocation, else file name (the detail says which)",
    "library_warning": "a library (pydicom) warned while reading; counted by kind, values "
                       "withheld",
    "missing_orientation": "ImageOrientationPatient absent, empty or malformed: the series' "
                           "orientation is used for such a file (named); assumed axial when "
                           "no file of the series has one",
    "missing_transfer_syntax": "no Transfer Syntax UID; read with the encoding pydicom detected",
    "duplicate_position": "two slices share a position; the duplicate was dropped",
    "missing_sop_uid": "SOPInstanceUID absent, empty or holding more than one value: the "
                       "slice is kept, keyed by its file",
    "duplicate_sop_uid": "slices of the series share one SOPInstanceUID (each is named): they "
                         "are kept, each keyed by its file so slice keys stay unique",
    "slice_substituted": "a sampled file could not be read; a neighbouring slice (between the "
                         "same sampled neighbours) was used instead",
    "rgba_image": "RGBA slice image flattened to grey over black",
    "colour_image": "colour slice image converted to grey",
    "sixteen_bit_image": "16-bit slice image rescaled to 8 bits",
    # dropped slices (counted in the manifest)
    "low_lung_fraction": "lung mask smaller than --min_lung_fraction of the slice",
    "all_air": "slice holds only air (no body)",
    "constant_image": "slice has a single value (e.g. all zero)",
}


class StudyError(Exception):
    """A study (or one of its files) cannot be used. ``reason`` is a key of REASONS."""

    def __init__(self, reason: str, detail: str, file: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"Unknown reason code. Received: {reason!r}")
        super().__init__(f"{reason}: {detail}" + (f" [{file}]" if file else ""))
        self.reason = reason
        self.detail = detail
        self.file = file


@dataclass(frozen=True)
class Issue:
    """One row of failures.csv."""

    study: str
    file: str
    reason: str
    detail: str
    level: str  # "error" | "warning"

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"Unknown reason code. Received: {self.reason!r}")
        if self.level not in ("error", "warning"):
            raise ValueError(f"level must be 'error' or 'warning'. Received: {self.level!r}")
