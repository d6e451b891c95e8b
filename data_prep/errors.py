"""Named reasons for rejected studies, files and slices.

Every problem data_prep meets has a reason code from :data:`REASONS`: it goes to
``failures.csv`` (``level`` = ``error`` when the study was not written, ``warning`` when it
was written anyway) and, counted, to ``manifest.json``. Tests assert on these codes, so they
are a contract: add new ones, never rename.
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
    "multiframe_unsupported": "multi-frame (enhanced) DICOM is not supported",
    "too_few_slices": "series has fewer slices than --min_slices",
    "compressed_no_decoder": "compressed transfer syntax and no installed decoder supports it",
    "no_lung_slices": "no sampled slice kept enough lung (see the dropped-slice reasons)",
    "label_unknown": "the study's label is not in --classes",
    "duplicate_study": "the same study and series were already listed under another path",
    "patient_split_conflict": "a patient is assigned to two splits",
    "internal_error": "unexpected error while processing the study (a bug: please report)",
    # single file (level "warning" unless it leaves the study empty)
    "not_dicom": "file is neither DICOM nor a PNG/JPEG slice; ignored",
    "dicomdir": "DICOMDIR index file; ignored",
    "truncated_file": "file ends early or its pixel data is shorter than the header says",
    "pixel_decode_error": "pixel data could not be decoded",
    "image_decode_error": "the slice image could not be decoded",
    # warnings on studies that are still written
    "series_rejected": "another series of the study was rejected (detail says why)",
    "missing_rescale": "RescaleSlope/RescaleIntercept absent; assumed slope 1, intercept 0",
    "missing_position": "ImagePositionPatient absent; slices ordered by InstanceNumber",
    "missing_orientation": "ImageOrientationPatient absent; assumed axial",
    "missing_transfer_syntax": "no Transfer Syntax UID; read with the encoding pydicom detected",
    "duplicate_position": "two slices share a position; the duplicate was dropped",
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
