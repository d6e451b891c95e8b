"""Defensive DICOM reading: headers first, one axial CT series, pixels only where sampled.

The flow for one study folder:

1. :func:`read_headers` reads every file's header (``stop_before_pixels``), recognising
   DICOM by content, not by name; DICOMDIR and non-DICOM files become warnings.
2. :func:`choose_series` groups headers by SeriesInstanceUID, rejects localizers, non-CT,
   non-axial, multi-frame, single-slice and too-short series (each with a reason), picks the
   axial CT series with the most slices, orders it by ImagePositionPatient projected on the
   slice normal (fallback: InstanceNumber) and checks that its transfer syntax can be
   decoded.
3. :func:`read_hu` decodes one slice's pixels (only the sampled ones are ever decoded) and
   returns Hounsfield units in float32: stored value x RescaleSlope + RescaleIntercept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ImplicitVRLittleEndian

from data_prep.errors import Issue, StudyError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
# |normal . z| above this is "axial": 0.9 accepts gantry tilts up to ~25 degrees.
MIN_AXIAL_COSINE = 0.9
# HU outside this range is padding or metal: clipped (padding values such as -2000 or
# -3024 mark pixels outside the reconstruction circle, which is air).
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass
class SliceHeader:
    """What one file's header tells, without its pixels."""

    path: str
    series_uid: str
    study_uid: str
    sop_uid: str
    patient_id: str
    modality: str
    image_type: tuple[str, ...]
    series_description: str
    series_number: int
    instance_number: int | None
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    pixel_spacing_mm: tuple[float, float] | None
    rows: int
    columns: int
    frames: int
    transfer_syntax: str | None


@dataclass
class Series:
    """The chosen series, ordered along the slice normal (superior or inferior first, as the
    positions go: ascending position)."""

    series_uid: str
    study_uid: str
    patient_id: str
    slices: list[SliceHeader]
    positions_mm: list[float]
    transfer_syntax: str | None
    warnings: list[Issue] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slices)


def _text(ds: pydicom.Dataset, keyword: str, default: str = "") -> str:
    value = ds.get(keyword, default)
    return default if value is None else str(value).strip()


def _floats(ds: pydicom.Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    values = [value] if isinstance(value, (str, int, float)) else list(value)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def read_header(path: str | os.PathLike) -> SliceHeader:
    """Reads one file's header. Raises StudyError(not_dicom | dicomdir | truncated_file)."""
    path = str(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        # No preamble / file meta (e.g. "headless" files from old tools): try force, but only
        # accept it when the result looks like an image (force=True parses anything).
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure means not DICOM
            raise StudyError("not_dicom", f"not a DICOM file ({type(exc).__name__})", path)
        if "Rows" not in ds or "SOPInstanceUID" not in ds and "Modality" not in ds:
            raise StudyError("not_dicom", "no DICOM preamble and no image attributes", path)
    except (EOFError, OSError) as exc:
        raise StudyError("truncated_file", f"header ends early: {exc}", path)
    except Exception as exc:  # noqa: BLE001
        raise StudyError("not_dicom", f"unreadable header ({type(exc).__name__}: {exc})", path)
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise StudyError("dicomdir", "DICOMDIR index file", path)
    if "Rows" not in ds or "Columns" not in ds:
        raise StudyError("not_dicom", "DICOM object without an image (no Rows/Columns)", path)
    tsuid = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        instance = None
    try:
        series_number = int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        series_number = 0
    position = _floats(ds, "ImagePositionPatient", 3)
    spacing = _floats(ds, "PixelSpacing", 2)
    return SliceHeader(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID", "unknown-series"),
        study_uid=_text(ds, "StudyInstanceUID", ""),
        sop_uid=_text(ds, "SOPInstanceUID", ""),
        patient_id=_text(ds, "PatientID", ""),
        modality=_text(ds, "Modality", "").upper(),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        series_description=_text(ds, "SeriesDescription"),
        series_number=series_number,
        instance_number=instance,
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        position=position if position is None else (position[0], position[1], position[2]),
        pixel_spacing_mm=spacing if spacing is None else (spacing[0], spacing[1]),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames") or 1),
        transfer_syntax=tsuid or None,
    )


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_headers(paths: list[str], study: str) -> tuple[list[SliceHeader], list[Issue]]:
    """Reads every header; files that are not usable DICOM become warnings."""
    headers: list[SliceHeader] = []
    issues: list[Issue] = []
    for p in paths:
        try:
            headers.append(read_header(p))
        except StudyError as err:
            issues.append(Issue(study, p, err.reason, err.detail, "warning"))
    return headers, issues


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _series_reason(group: list[SliceHeader], min_slices: int) -> tuple[str, str] | None:
    """Why a series cannot be used, or None."""
    first = group[0]
    words = set(first.image_type) | set(first.series_description.upper().split())
    if any(w in words for w in LOCALIZER_WORDS):
        return "localizer", "ImageType " + ("\\".join(first.image_type) or "-")
    if first.modality != "CT":
        return "non_ct_modality", f"Modality {first.modality or 'absent'}"
    if first.frames > 1:
        return "multiframe_unsupported", f"NumberOfFrames {first.frames}"
    if first.orientation is not None:
        cos_z = abs(float(slice_normal(first.orientation)[2]))
        if cos_z < MIN_AXIAL_COSINE:
            return "non_axial", f"slice normal . z = {cos_z:.2f} < {MIN_AXIAL_COSINE}"
    if len(group) == 1:
        return "single_slice", "1 slice"
    if len(group) < min_slices:
        return "too_few_slices", f"{len(group)} slices < --min_slices={min_slices}"
    return None


def _decoder_problem(tsuid: str | None) -> str | None:
    """None when pixels with this transfer syntax can be decoded here, else a message."""
    if not tsuid:
        return None
    uid = UID(tsuid)
    if not uid.is_compressed:
        return None
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"{uid.name} ({uid}): no pixel decoder exists for it in pydicom"
    if not decoder.is_available:
        return (f"{uid.name} ({uid}) needs a decoder plugin: install the [dicom] extra "
                "(pylibjpeg with its libjpeg/openjpeg/rle plugins, python-gdcm)")
    return None


def choose_series(headers: list[SliceHeader], study: str, min_slices: int) -> Series:
    """Picks the axial CT series with the most slices and orders it. Raises StudyError."""
    groups: dict[str, list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault(h.series_uid, []).append(h)
    rejected: list[tuple[str, str, int, str]] = []  # reason, detail, n, series label
    usable: list[list[SliceHeader]] = []
    for uid, group in groups.items():
        reason = _series_reason(group, min_slices)
        label = f"series {group[0].series_number} '{group[0].series_description}'".strip()
        if reason is None:
            usable.append(group)
        else:
            rejected.append((reason[0], reason[1], len(group), label))
    if not usable:
        detail = "; ".join(f"{lab} ({n} files): {r} ({d})" for r, d, n, lab in rejected)
        codes = {r for r, _, _, _ in rejected}
        raise StudyError(codes.pop() if len(codes) == 1 else "no_usable_series", detail)
    usable.sort(key=lambda g: (-len(g), g[0].series_number, g[0].series_uid))
    group = usable[0]
    warnings = [
        Issue(study, "", "series_rejected", f"{lab} ({n} files): {r} ({d})", "warning")
        for r, d, n, lab in rejected
    ]
    for other in usable[1:]:
        warnings.append(Issue(
            study, "", "series_rejected",
            f"series {other[0].series_number} ({len(other)} files): fewer slices than the "
            f"chosen series ({len(group)})", "warning"))
    problem = _decoder_problem(group[0].transfer_syntax)
    if problem:
        raise StudyError("compressed_no_decoder", problem, group[0].path)
    ordered, positions, order_warnings = _order(group, study)
    warnings.extend(order_warnings)
    if len(ordered) < min_slices:
        raise StudyError("too_few_slices",
                         f"{len(ordered)} distinct slices < --min_slices={min_slices}")
    first = ordered[0]
    return Series(first.series_uid, first.study_uid, first.patient_id, ordered, positions,
                  first.transfer_syntax, warnings)


def _order(group: list[SliceHeader], study: str
           ) -> tuple[list[SliceHeader], list[float], list[Issue]]:
    warnings: list[Issue] = []
    orientation = next((h.orientation for h in group if h.orientation is not None), None)
    if orientation is None:
        warnings.append(Issue(study, "", "missing_orientation",
                              "ImageOrientationPatient absent; assumed axial", "warning"))
        orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    normal = slice_normal(orientation)
    if all(h.position is not None for h in group):
        keyed = [(float(np.dot(normal, h.position)), h) for h in group]
    else:
        missing = sum(h.position is None for h in group)
        warnings.append(Issue(study, "", "missing_position",
                              f"{missing} of {len(group)} files lack ImagePositionPatient; "
                              "ordered by InstanceNumber", "warning"))
        spacing = 1.0
        keyed = [(float(h.instance_number if h.instance_number is not None else i) * spacing, h)
                 for i, h in enumerate(sorted(group, key=lambda h: h.path))]
    keyed.sort(key=lambda kh: (kh[0], kh[1].instance_number or 0, kh[1].path))
    ordered: list[SliceHeader] = []
    positions: list[float] = []
    for pos, h in keyed:
        if positions and abs(pos - positions[-1]) < 1e-3:
            warnings.append(Issue(study, h.path, "duplicate_position",
                                  f"same position {pos:.2f} mm as {Path(ordered[-1].path).name}",
                                  "warning"))
            continue
        ordered.append(h)
        positions.append(pos)
    return ordered, positions, warnings


def read_hu(header: SliceHeader, study: str) -> tuple[np.ndarray, list[Issue]]:
    """Decodes one slice to float32 HU (rows x columns). Raises StudyError for this file."""
    warnings: list[Issue] = []
    try:
        ds = pydicom.dcmread(header.path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise StudyError("truncated_file", f"cannot re-read file: {exc}", header.path)
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ("1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"))
        warnings.append(Issue(study, header.path, "missing_transfer_syntax",
                              f"assumed {UID(ds.file_meta.TransferSyntaxUID).name}", "warning"))
    if "PhotometricInterpretation" not in ds:  # old tools omit it; CT is always grey
        ds.PhotometricInterpretation = "MONOCHROME2"
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1
    if "PixelData" not in ds:
        raise StudyError("truncated_file", "no pixel data", header.path)
    expected = header.rows * header.columns * int(ds.get("BitsAllocated", 16)) // 8
    tsuid = UID(ds.file_meta.TransferSyntaxUID)
    if not tsuid.is_compressed and len(ds.PixelData) < expected:
        raise StudyError("truncated_file",
                         f"pixel data has {len(ds.PixelData)} bytes, header says {expected}",
                         header.path)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise StudyError("pixel_decode_error", f"{tsuid.name}: {type(exc).__name__}: {exc}",
                         header.path)
    if stored.ndim != 2:
        raise StudyError("pixel_decode_error", f"expected one 2-D frame, got {stored.shape}",
                         header.path)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None or intercept is None:
        warnings.append(Issue(study, header.path, "missing_rescale",
                              "RescaleSlope/Intercept absent; assumed 1 and 0", "warning"))
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, warnings
