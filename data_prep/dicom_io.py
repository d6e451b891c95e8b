"""Defensive DICOM reading: headers first, one axial CT series, pixels only where sampled.

The flow for one study folder:

1. :func:`read_headers` reads every file's header (``stop_before_pixels``), recognising
   DICOM by content, not by name; DICOMDIR and non-DICOM files become warnings.
2. :func:`choose_series` groups headers by SeriesInstanceUID, rejects localizers, non-CT,
   non-axial, multi-frame, single-slice and too-short series (each with a reason), picks the
   axial CT series with the most slices, orders it by ImagePositionPatient projected on the
   slice normal (fallback: InstanceNumber) and checks that its transfer syntax can be
   decoded. Everything the choice uses is taken over the whole series, never from whichever
   file sorts first: files whose transfer syntax cannot be decoded, and a minority of
   slices with another matrix size or pixel spacing, are dropped with a warning when enough
   slices remain; an implausible pixel spacing (NaN, <= 0, metres) rejects the series
   before any pixel is read.
3. :func:`read_hu` decodes one slice's pixels (only the sampled ones are ever decoded) and
   returns Hounsfield units in float32: stored value x RescaleSlope + RescaleIntercept.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ImplicitVRLittleEndian

from data_prep import limits
from data_prep.errors import Issue, StudyError
from data_prep.limits import Limits

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM")
# Modality codes a detail may name (anything else is "not recognised": a tag value is never
# echoed).
KNOWN_MODALITIES = ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SC",
                    "SR", "PR", "SEG", "REG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTIMAGE", "KO",
                    "DOC", "ECG", "IO", "PX", "ES", "XC", "OP")
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
    slice_location: float | None
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


def _finite(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """None unless every value is finite (a NaN position or orientation is no position)."""
    if values is None or not all(np.isfinite(v) and abs(v) < 1e9 for v in values):
        return None
    return values


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


def read_header(path: str | os.PathLike, lim: Limits | None = None) -> SliceHeader:
    """Reads one file's header. Raises StudyError(not_dicom | dicomdir | truncated_file |
    not_regular_file | file_too_large | image_too_large | bad_pixel_spacing)."""
    path = str(path)
    lim = lim or Limits()
    with limits.open_regular(path, lim) as f:
        head = f.read(132)
        preamble = len(head) == 132 and head[128:132] == b"DICM"
        size = os.fstat(f.fileno()).st_size
        if preamble:
            check_deflated(f, path, lim)
        f.seek(0)
        ds = _parse_header(f, path, preamble)
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise StudyError("dicomdir", "DICOMDIR index file", path)
    if "Rows" not in ds or "Columns" not in ds:
        sop = sop_class or _text(ds, "SOPClassUID")
        if preamble and (not sop or _is_image_class(sop)):  # an image, or cut before saying
            raise StudyError("truncated_file", f"DICOM file of {size} bytes ends before its "
                             "image attributes (Rows/Columns)", path)
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
    position = _finite(_floats(ds, "ImagePositionPatient", 3))
    spacing = _floats(ds, "PixelSpacing", 2)
    location = _finite(_floats(ds, "SliceLocation", 1))
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise StudyError("not_dicom", "Rows, Columns or NumberOfFrames is not a number", path)
    if rows <= 0 or columns <= 0:
        raise StudyError("not_dicom", f"no image (Rows x Columns = {rows} x {columns})", path)
    limits.check_pixels(rows, columns, lim, path, frames)
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
        slice_location=location[0] if location else None,
        orientation=_finite(_floats(ds, "ImageOrientationPatient", 6)),
        position=position if position is None else (position[0], position[1], position[2]),
        pixel_spacing_mm=spacing if spacing is None else (spacing[0], spacing[1]),
        rows=rows,
        columns=columns,
        frames=frames,
        transfer_syntax=tsuid or None,
    )


def check_deflated(f, path: str, lim: Limits) -> None:
    """A Deflated Explicit VR Little Endian file is inflated whole, in memory, by pydicom: a
    small file can inflate to gigabytes. Its inflated size is measured first (1 MiB at a
    time); over the byte limit it is file_too_large."""
    f.seek(0)
    try:
        pydicom.filereader.read_preamble(f, False)
        meta = pydicom.filereader._read_file_meta_info(f)
        deflated = meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - pydicom's own parse says what is wrong
        return
    if not deflated:
        return
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunk = 0, f.read(1 << 20)
    try:
        while chunk and not inflate.eof:
            out = inflate.decompress(chunk, 1 << 20)
            total += len(out)
            if total > lim.max_file_bytes:
                raise StudyError("file_too_large", "the deflated dataset inflates to more than "
                                 f"--max_file_mb ({lim.max_file_bytes} bytes)", path)
            if not out and inflate.unconsumed_tail == chunk:
                return  # no progress: pydicom's parse decides
            chunk = inflate.unconsumed_tail or f.read(1 << 20)
    except zlib.error:
        return  # a broken stream: pydicom's parse fails and names it


def _is_image_class(sop_class: str) -> bool:
    try:
        return "Image Storage" in UID(sop_class).name
    except Exception:  # noqa: BLE001 - not a UID
        return False


def _parse_header(f, path: str, preamble: bool) -> pydicom.Dataset:
    """pydicom's header parse of an open file. A file with the DICOM preamble that cannot be
    parsed was cut short (truncated_file); without it, it is not DICOM (not_dicom)."""
    try:
        return pydicom.dcmread(f, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        # No preamble / file meta (e.g. "headless" files from old tools): try force, but only
        # accept it when the result looks like an image (force=True parses anything).
        f.seek(0)
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            len(ds)  # force parses lazily: make the failure happen here
        except Exception as exc:  # noqa: BLE001 - any parse failure means not DICOM
            raise StudyError("not_dicom", f"not a DICOM file ({type(exc).__name__})", path)
        if "Rows" not in ds or "SOPInstanceUID" not in ds and "Modality" not in ds:
            raise StudyError("not_dicom", "no DICOM preamble and no image attributes", path)
        return ds
    except Exception as exc:  # noqa: BLE001 - EOF, OSError, a broken element
        if preamble:
            raise StudyError("truncated_file", f"DICOM header cannot be parsed to its end "
                             f"({type(exc).__name__})", path)
        raise StudyError("not_dicom", f"unreadable header ({type(exc).__name__})", path)


def read_headers(paths: list[str], study: str, lim: Limits | None = None
                 ) -> tuple[list[SliceHeader], list[Issue]]:
    """Reads every header; files that are not usable DICOM become warnings."""
    headers: list[SliceHeader] = []
    issues: list[Issue] = []
    for p in paths:
        limits.check_deadline()
        try:
            headers.append(read_header(p, lim))
        except StudyError as err:
            issues.append(Issue(study, p, err.reason, err.detail, "warning"))
    return headers, issues


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:], dtype=np.float64)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _most_common(values: list) -> object:
    """The most common value (ties: the smallest by repr): independent of file order."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], repr(v)))


def _series_reason(group: list[SliceHeader], min_slices: int) -> tuple[str, str] | None:
    """Why a series cannot be used, or None. Decided over all of its files."""
    image_type_words = {w for h in group for w in h.image_type}
    description_words = {w for h in group for w in h.series_description.upper().split()}
    for word in LOCALIZER_WORDS:
        if word in image_type_words:
            return "localizer", f"ImageType says {word}"
        if word in description_words:
            return "localizer", f"SeriesDescription says {word}"
    modality = str(_most_common([h.modality for h in group]))
    if modality != "CT":
        named = modality if modality in KNOWN_MODALITIES else (
            "absent" if not modality else "not recognised")
        return "non_ct_modality", f"Modality {named}"
    frames = max(h.frames for h in group)
    if frames > 1:
        return "multiframe_unsupported", "NumberOfFrames above 1"
    orientations = [h.orientation for h in group if h.orientation is not None]
    if orientations:
        orientation = _most_common(orientations)
        cos_z = abs(float(slice_normal(orientation)[2]))  # type: ignore[arg-type]
        if cos_z < MIN_AXIAL_COSINE:
            return "non_axial", f"slice normal . z = {cos_z:.2f} < {MIN_AXIAL_COSINE}"
    for h in group:
        try:
            limits.check_pixel_spacing(h.pixel_spacing_mm, h.path)
        except StudyError as err:
            return err.reason, err.detail
    if len(group) == 1:
        return "single_slice", "1 slice"
    if len(group) < min_slices:
        return "too_few_slices", f"{len(group)} slices < --min_slices={min_slices}"
    return None


def _ts_name(uid: UID) -> str:
    return uid.name if uid.is_transfer_syntax else "unknown transfer syntax"


def _decoder_problem(tsuid: str | None) -> str | None:
    """None when pixels with this transfer syntax can be decoded here, else a message (it
    names the transfer syntax only when it is a standard one)."""
    if not tsuid:
        return None
    uid = UID(tsuid)
    if not uid.is_transfer_syntax:
        return "Transfer Syntax UID is not a known transfer syntax"
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


def _keep_majority(group: list[SliceHeader], key, reason: str, what: str, study: str,
                   min_slices: int, warnings: list[Issue]) -> list[SliceHeader]:
    """Keeps the slices sharing the most common ``key``; the others are dropped with one
    warning (or the series fails when too few slices remain)."""
    values = [key(h) for h in group]
    if len(set(values)) <= 1:
        return group
    common = _most_common(values)
    kept = [h for h, v in zip(group, values) if v == common]
    counts = sorted(Counter(values).values(), reverse=True)
    detail = f"{len(set(values))} different {what} in one series (slice counts {counts})"
    if len(kept) < max(min_slices, 2):
        raise StudyError(reason, detail + f"; the most common has {len(kept)} slices < "
                         f"--min_slices={min_slices}")
    warnings.append(Issue(study, "", reason, detail + f"; kept the {len(kept)} slices of the "
                          "most common, dropped the others", "warning"))
    return kept


def choose_series(headers: list[SliceHeader], study: str, min_slices: int) -> Series:
    """Picks the axial CT series with the most slices and orders it. Raises StudyError.
    The result does not depend on the order of ``headers``."""
    groups: dict[str, list[SliceHeader]] = {}
    for h in sorted(headers, key=lambda h: h.path):
        groups.setdefault(h.series_uid, []).append(h)
    dropped: dict[str, list[Issue]] = {}
    # Files whose pixels cannot be decoded here leave their series before it is judged.
    for uid, group in list(groups.items()):
        problems = {h.path: _decoder_problem(h.transfer_syntax) for h in group}
        bad = [h for h in group if problems[h.path]]
        if bad and len(bad) < len(group):
            dropped[uid] = [Issue(study, h.path, "compressed_no_decoder",
                                  str(problems[h.path]), "warning") for h in bad]
            groups[uid] = [h for h in group if not problems[h.path]]
    rejected: list[tuple[str, str, int, str]] = []  # reason, detail, n, series label
    usable: list[list[SliceHeader]] = []
    # Series are named by their rank (most files first), never by a tag value.
    ranked = sorted(groups, key=lambda u: (-len(groups[u]), u))
    label_of = {u: f"series {k}/{len(ranked)}" for k, u in enumerate(ranked, start=1)}
    for uid, group in sorted(groups.items()):
        reason = _series_reason(group, min_slices)
        if reason is None:
            problem = next((p for p in (_decoder_problem(h.transfer_syntax) for h in group)
                            if p), None)
            if problem:
                reason = ("compressed_no_decoder", problem)
        label = label_of[uid]
        if reason is None:
            usable.append(group)
        else:
            rejected.append((reason[0], reason[1], len(group), label))
    if not usable:
        detail = "; ".join(f"{lab} ({n} files): {r} ({d})" for r, d, n, lab in rejected)
        codes = {r for r, _, _, _ in rejected}
        raise StudyError(codes.pop() if len(codes) == 1 else "no_usable_series", detail)
    usable.sort(key=lambda g: (-len(g), _most_common([h.series_number for h in g]),
                               g[0].series_uid))
    group = usable[0]
    warnings = list(dropped.get(group[0].series_uid, []))
    warnings += [
        Issue(study, "", "series_rejected", f"{lab} ({n} files): {r} ({d})", "warning")
        for r, d, n, lab in rejected
    ]
    for other in usable[1:]:
        warnings.append(Issue(
            study, "", "series_rejected",
            f"{label_of[other[0].series_uid]} ({len(other)} files): "
            f"fewer slices than the chosen series ({len(group)})", "warning"))
    group = _keep_majority(group, lambda h: (h.rows, h.columns), "mixed_matrix",
                           "matrix sizes (Rows x Columns)", study, min_slices, warnings)
    group = _keep_majority(
        group, lambda h: None if h.pixel_spacing_mm is None else tuple(
            round(v, 3) for v in h.pixel_spacing_mm),
        "mixed_pixel_spacing", "pixel spacings", study, min_slices, warnings)
    ordered, positions, order_warnings = _order(group, study)
    warnings.extend(order_warnings)
    if len(ordered) < min_slices:
        raise StudyError("too_few_slices",
                         f"{len(ordered)} distinct slices < --min_slices={min_slices}")
    first = ordered[0]
    return Series(first.series_uid, first.study_uid,
                  str(_most_common([h.patient_id for h in ordered])), ordered, positions,
                  str(_most_common([h.transfer_syntax or "" for h in ordered])) or None,
                  warnings)


def _order(group: list[SliceHeader], study: str
           ) -> tuple[list[SliceHeader], list[float], list[Issue]]:
    """Orders along the slice normal by ImagePositionPatient; without a position on every
    slice, by InstanceNumber, else SliceLocation, else the file names - and says which."""
    warnings: list[Issue] = []
    orientations = [h.orientation for h in group if h.orientation is not None]
    if orientations:
        orientation = _most_common(orientations)
    else:
        warnings.append(Issue(study, "", "missing_orientation",
                              "ImageOrientationPatient absent; assumed axial", "warning"))
        orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    normal = slice_normal(orientation)  # type: ignore[arg-type]
    by_name = sorted(group, key=lambda h: h.path)
    if all(h.position is not None for h in group):
        keyed = [(float(np.dot(normal, h.position)), h) for h in by_name]  # type: ignore
    else:
        missing = sum(h.position is None for h in group)
        if all(h.instance_number is not None for h in group):
            basis = "InstanceNumber"
            keyed = [(float(h.instance_number), h) for h in by_name]  # type: ignore[arg-type]
        elif all(h.slice_location is not None for h in group):
            basis = "SliceLocation"
            keyed = [(float(h.slice_location), h) for h in by_name]  # type: ignore[arg-type]
        else:
            basis = "file name (no InstanceNumber or SliceLocation on every slice)"
            keyed = [(float(i), h) for i, h in enumerate(by_name)]
        warnings.append(Issue(study, "", "missing_position",
                              f"{missing} of {len(group)} files lack ImagePositionPatient; "
                              f"ordered by {basis}", "warning"))
    keyed.sort(key=lambda kh: (kh[0], kh[1].instance_number or 0, kh[1].path))
    ordered: list[SliceHeader] = []
    positions: list[float] = []
    for pos, h in keyed:
        if positions and abs(pos - positions[-1]) < 1e-3:
            warnings.append(Issue(study, h.path, "duplicate_position",
                                  "same position as another slice", "warning"))
            continue
        ordered.append(h)
        positions.append(pos)
    return ordered, positions, warnings


def read_hu(header: SliceHeader, study: str, lim: Limits | None = None
            ) -> tuple[np.ndarray, list[Issue]]:
    """Decodes one slice to float32 HU (rows x columns). Raises StudyError for this file.
    The file is re-checked (regular, within the byte limit) and its dimensions checked
    against the pixel limit before anything is decoded."""
    lim = lim or Limits()
    warnings: list[Issue] = []
    with limits.open_regular(header.path, lim) as f:
        check_deflated(f, header.path, lim)
        f.seek(0)
        try:
            ds = pydicom.dcmread(f, force=True)
            rows, columns = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames") or 1)
        except Exception as exc:  # noqa: BLE001
            raise StudyError("truncated_file", f"cannot re-read file ({type(exc).__name__})",
                             header.path)
    limits.check_pixels(rows, columns, lim, header.path, frames)
    if (rows, columns) != (header.rows, header.columns):
        raise StudyError("truncated_file", "the file changed since its header was read",
                         header.path)
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
    compressed = tsuid.is_transfer_syntax and tsuid.is_compressed
    if not compressed and len(ds.PixelData) < expected:
        raise StudyError("truncated_file",
                         f"pixel data has {len(ds.PixelData)} bytes, header says {expected}",
                         header.path)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise StudyError("pixel_decode_error", f"{_ts_name(tsuid)}: {type(exc).__name__}",
                         header.path)
    if stored.ndim != 2:
        raise StudyError("pixel_decode_error", f"expected one 2-D frame, got {stored.shape}",
                         header.path)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None or intercept is None:
        warnings.append(Issue(study, header.path, "missing_rescale",
                              "RescaleSlope/Intercept absent; assumed 1 and 0", "warning"))
    try:
        slope = 1.0 if slope is None else float(slope)
        intercept = 0.0 if intercept is None else float(intercept)
    except (TypeError, ValueError):
        raise StudyError("bad_rescale", "RescaleSlope or RescaleIntercept is not a number",
                         header.path)
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0.0
            and abs(slope) < 1e6 and abs(intercept) < 1e6):
        raise StudyError("bad_rescale", "RescaleSlope / RescaleIntercept is NaN, infinite, "
                         "zero (slope) or implausibly large", header.path)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, warnings
