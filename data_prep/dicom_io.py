"""Defensive DICOM reading: headers first, one axial CT series, pixels only where sampled.

The flow for one study folder:

1. :func:`read_headers` reads every file's header (``stop_before_pixels``), recognising
   DICOM by content, not by name; DICOMDIR and non-DICOM files become warnings. Whatever a
   file holds, reading it either gives a :class:`SliceHeader` or a
   :class:`data_prep.errors.StudyError` naming that file: a header element with an unknown
   Value Representation (``bad_vr``), a binary value that is not a whole number of values,
   an empty or malformed Rows / Columns (``bad_tag_value``), a RescaleSlope / Intercept that
   is no usable number (``bad_rescale``). Optional values that are absent, empty or
   malformed (position, orientation, spacing, rescale) are recorded as missing, with why.
2. :func:`choose_series` groups headers by SeriesInstanceUID, rejects localizers, non-CT,
   non-axial, multi-frame, single-slice and too-short series (each with a reason), and
   prepares each remaining candidate: a minority of files that disagree with their series
   (multi-frame, implausible or other pixel spacing, other matrix size, no rescale where
   the others have one, no position where the others have one) are dropped, each named;
   the rest is ordered by ImagePositionPatient projected on the slice normal (fallback:
   InstanceNumber). Among the candidates it picks the one that makes a usable chest series
   - matrix at or above :data:`MIN_MATRIX`, a field of view and slice gap a chest CT can
   have, lung found on a probe slice (decoded only when several series compete) - with
   the slice count as the tie-break, and says why each other one was passed over. Files
   whose transfer syntax cannot be decoded are dropped with a warning when enough slices
   remain; an implausible pixel spacing on most files rejects the series before any pixel
   is read. Slices sharing one SOPInstanceUID are named (``duplicate_sop_uid``).
3. :func:`read_hu` decodes one slice's pixels (only the sampled ones are ever decoded) and
   returns Hounsfield units in float32: stored value x RescaleSlope + RescaleIntercept.
   Every failure of that one file - parse, element, pixel decode - is a StudyError naming
   it, so the study goes on with a neighbouring slice.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from data_prep import limits, lung
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
# What makes a candidate series a usable chest series (used to choose among several series
# of one study, never to reject the only one). A matrix under 64 pixels a side is an icon or
# a thumbnail (a series of 2 x 2 "CT" slices must not win by its file count); a chest needs
# a field of view of at least 150 mm; slices more than 50 mm apart sample no chest.
MIN_MATRIX = 64
MIN_FIELD_OF_VIEW_MM = 150.0
MAX_SLICE_GAP_MM = 50.0
# Lung found on a probe slice: lung area / body area (data_prep.preprocess's default
# --min_lung_fraction). Up to this many slices are probed (middle first).
PROBE_MIN_LUNG_FRACTION = 0.05
PROBE_SLICES = 3
# VRs and the byte size of one value: a length that is not a multiple is a damaged element.
_VALUE_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8,
               "UV": 8}
_KNOWN_VRS = frozenset(str(v) for v in VR)
# Every element data_prep reads (or pydicom reads for it: the character set for text, the
# pixel module for decoding). Only these are checked: a damaged element the pipeline never
# reads (a vendor's private tag with a VR of its own) costs nothing.
READ_KEYWORDS = (
    "MediaStorageSOPClassUID", "TransferSyntaxUID", "SpecificCharacterSet", "ImageType",
    "SOPClassUID", "SOPInstanceUID", "Modality", "SeriesDescription", "PatientID",
    "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows", "Columns",
    "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleIntercept", "RescaleSlope", "PixelData")
_READ_TAGS = tuple(int(pydicom.datadict.tag_for_keyword(k)) for k in READ_KEYWORDS)


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
    # False when RescaleSlope or RescaleIntercept is absent or empty (1 and 0 are assumed).
    has_rescale: bool = True
    # Why an optional value is missing (keyword -> "ImagePositionPatient is empty", ...):
    # the detail of a warning if the file is dropped or its value assumed.
    problems: dict[str, str] = field(default_factory=dict)


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
    # SOPInstanceUIDs that more than one slice of the series carries: those slices are
    # keyed by their file, not by the UID (data_prep.study).
    shared_sop_uids: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.slices)


# ---------------------------------------------------------------- one file's elements
def _tag_name(tag: int) -> str:
    """A standard tag's keyword; never a value from the file."""
    keyword = pydicom.datadict.keyword_for_tag(tag)
    return keyword or "a private or unlisted tag"


def _element_fault(exc: BaseException, what: str) -> tuple[str, str]:
    """(reason, detail) for a pydicom exception raised by an element of one file."""
    if isinstance(exc, NotImplementedError):
        return "bad_vr", f"{what} has an unknown Value Representation"
    if isinstance(exc, BytesLengthException):
        return "bad_tag_value", f"{what} is not a whole number of values"
    return "bad_tag_value", f"{what} cannot be read ({type(exc).__name__})"


def check_elements(ds: pydicom.Dataset, path: str) -> None:
    """Raises StudyError(bad_vr | bad_tag_value) when an element the pipeline reads
    (:data:`READ_KEYWORDS`, meta group included) is structurally damaged: a Value
    Representation pydicom does not know, or a binary value (US, UL, FL, ...) whose length
    is not a whole number of values. Nothing is converted, so nothing is validated (or
    warned about) here."""
    meta = getattr(ds, "file_meta", None)
    for part in (meta, ds):
        if part is None:
            continue
        for tag in _READ_TAGS:
            if tag not in part:
                continue
            elem = part.get_item(tag, keep_deferred=True)  # never converted here
            vr = elem.VR
            if vr is None:  # implicit VR: taken from the dictionary when converted
                continue
            if vr not in _KNOWN_VRS:
                raise StudyError("bad_vr", f"{_tag_name(elem.tag)} has an unknown Value "
                                 "Representation", path)
            size = _VALUE_SIZE.get(vr)
            length = getattr(elem, "length", None)  # raw elements only
            if size and isinstance(length, int) and length % size:
                raise StudyError("bad_tag_value", f"{_tag_name(elem.tag)}: {length} bytes "
                                 f"is not a whole number of {vr} values", path)


def _get(ds: pydicom.Dataset | None, keyword: str, path: str) -> object:
    """The element's value (None when absent); a failure of pydicom's conversion is this
    file's StudyError."""
    if ds is None:
        return None
    try:
        return ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - whatever the element holds, it is the file's
        raise StudyError(*_element_fault(exc, keyword), path) from None


def _text(ds: pydicom.Dataset | None, keyword: str, default: str = "", path: str = "") -> str:
    value = _get(ds, keyword, path)
    if value is None:
        return default
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _finite(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """None unless every value is finite (a NaN position or orientation is no position)."""
    if values is None or not all(np.isfinite(v) and abs(v) < 1e9 for v in values):
        return None
    return values


def _numbers(ds: pydicom.Dataset, keyword: str, n: int, path: str
             ) -> tuple[tuple[float, ...] | None, str]:
    """(n floats, "") or (None, why: "" when absent, else "... is empty", "... holds 5
    values, not 6", "... is not a number")."""
    value = _get(ds, keyword, path)
    if keyword not in ds:
        return None, ""
    if value is None or value == "":
        return None, f"{keyword} is empty"
    values = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    if len(values) != n:
        return None, f"{keyword} holds {len(values)} values, not {n}"
    try:
        return tuple(float(v) for v in values), ""
    except (TypeError, ValueError):
        return None, f"{keyword} is not a number"


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: str = "",
            problems: dict[str, str] | None = None, finite: bool = True
            ) -> tuple[float, ...] | None:
    values, why = _numbers(ds, keyword, n, path)
    if values is not None and finite and _finite(values) is None:
        values, why = None, f"{keyword} is not finite"
    if why and problems is not None:
        problems[keyword] = why
    return values


def _count(ds: pydicom.Dataset, keyword: str, path: str, default: int | None = None) -> int:
    """A required whole number (Rows, Columns, NumberOfFrames, BitsAllocated): absent gives
    ``default`` (None: required), anything unusable is StudyError(bad_tag_value)."""
    values, why = _numbers(ds, keyword, 1, path)
    if values is None and (not why or why.endswith("is empty")) and default is not None:
        return default  # absent or empty: the default
    if values is None:
        raise StudyError("bad_tag_value", why or f"{keyword} is absent", path)
    v = values[0]
    if not np.isfinite(v) or v != int(v):
        raise StudyError("bad_tag_value", f"{keyword} is not a whole number", path)
    return int(v)


def _rescale(ds: pydicom.Dataset, path: str) -> tuple[float, float, bool]:
    """(slope, intercept, both present). Absent or empty values are 1 and 0; anything else
    that is no usable number is StudyError(bad_rescale)."""
    out, present = [], True
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        values, why = _numbers(ds, keyword, 1, path)
        if values is None and (not why or why.endswith("is empty")):
            out.append(default)
            present = False
        elif values is None:
            raise StudyError("bad_rescale", why, path)
        else:
            out.append(values[0])
    slope, intercept = out
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0.0
            and abs(slope) < 1e6 and abs(intercept) < 1e6):
        raise StudyError("bad_rescale", "RescaleSlope / RescaleIntercept is NaN, infinite, "
                         "zero (slope) or implausibly large", path)
    return slope, intercept, present


def read_header(path: str | os.PathLike, lim: Limits | None = None) -> SliceHeader:
    """Reads one file's header. Raises StudyError(not_dicom | dicomdir | truncated_file |
    not_regular_file | unreadable_file | file_too_large | image_too_large | bad_vr |
    bad_tag_value | bad_rescale) naming the file: never anything else for what a file
    holds."""
    path = str(path)
    lim = lim or Limits()
    with limits.open_regular(path, lim) as f:
        try:
            head = f.read(132)
            size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise StudyError("unreadable_file", f"cannot read ({type(exc).__name__})", path)
        preamble = len(head) == 132 and head[128:132] == b"DICM"
        if preamble:
            check_deflated(f, path, lim)
        f.seek(0)
        ds = _parse_header(f, path, preamble)
    check_elements(ds, path)
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(meta, "MediaStorageSOPClassUID", path=path)
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise StudyError("dicomdir", "DICOMDIR index file", path)
    if "Rows" not in ds or "Columns" not in ds:
        sop = sop_class or _text(ds, "SOPClassUID", path=path)
        if preamble and (not sop or _is_image_class(sop)):  # an image, or cut before saying
            raise StudyError("truncated_file", f"DICOM file of {size} bytes ends before its "
                             "image attributes (Rows/Columns)", path)
        raise StudyError("not_dicom", "DICOM object without an image (no Rows/Columns)", path)
    tsuid = _text(meta, "TransferSyntaxUID", path=path)
    problems: dict[str, str] = {}
    instance = _floats(ds, "InstanceNumber", 1, path)
    series_number = _floats(ds, "SeriesNumber", 1, path)
    position = _floats(ds, "ImagePositionPatient", 3, path, problems)
    spacing = _floats(ds, "PixelSpacing", 2, path, problems, finite=False)
    location = _floats(ds, "SliceLocation", 1, path)
    orientation = _floats(ds, "ImageOrientationPatient", 6, path, problems)
    rows, columns = _count(ds, "Rows", path), _count(ds, "Columns", path)
    frames = _count(ds, "NumberOfFrames", path, default=1)
    if rows <= 0 or columns <= 0:
        raise StudyError("not_dicom", f"no image (Rows x Columns = {rows} x {columns})", path)
    limits.check_pixels(rows, columns, lim, path, frames)
    _, _, has_rescale = _rescale(ds, path)
    if not has_rescale:
        problems["Rescale"] = "RescaleSlope or RescaleIntercept is absent or empty"
    sop_uid = _get(ds, "SOPInstanceUID", path)
    if isinstance(sop_uid, MultiValue):  # a UID is one value: keyed by the file instead
        problems["SOPInstanceUID"] = f"SOPInstanceUID holds {len(sop_uid)} values, not 1"
        sop_uid = ""
    elif not sop_uid:
        problems["SOPInstanceUID"] = ("SOPInstanceUID is empty" if "SOPInstanceUID" in ds
                                      else "SOPInstanceUID is absent")
    image_type = _get(ds, "ImageType", path)
    if isinstance(image_type, (str, bytes)):
        image_type = [image_type] if image_type else []
    return SliceHeader(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID", "unknown-series", path) or "unknown-series",
        study_uid=_text(ds, "StudyInstanceUID", "", path),
        sop_uid=str(sop_uid or "").strip(),
        patient_id=_text(ds, "PatientID", "", path),
        modality=_text(ds, "Modality", "", path).upper(),
        image_type=tuple(str(v).upper() for v in (image_type or ())),
        series_description=_text(ds, "SeriesDescription", "", path),
        series_number=_whole(series_number) or 0,
        instance_number=_whole(instance),
        slice_location=location[0] if location else None,
        orientation=orientation,
        position=position if position is None else (position[0], position[1], position[2]),
        pixel_spacing_mm=spacing if spacing is None else (spacing[0], spacing[1]),
        rows=rows,
        columns=columns,
        frames=frames,
        transfer_syntax=tsuid or None,
        has_rescale=has_rescale,
        problems=problems,
    )


def _whole(values: tuple[float, ...] | None) -> int | None:
    """The one value as an int, or None (absent, not finite, not whole)."""
    if values is None or not np.isfinite(values[0]) or values[0] != int(values[0]):
        return None
    return int(values[0])


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
    try:
        total, chunk = 0, f.read(1 << 20)
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
    except OSError as exc:
        raise StudyError("unreadable_file", f"cannot read ({type(exc).__name__})", path)


def _is_image_class(sop_class: str) -> bool:
    try:
        return "Image Storage" in UID(sop_class).name
    except Exception:  # noqa: BLE001 - not a UID
        return False


def _parse_header(f, path: str, preamble: bool) -> pydicom.Dataset:
    """pydicom's header parse of an open file. An element with an unknown VR or a wrong
    length is bad_vr / bad_tag_value; a file with the DICOM preamble that cannot be parsed
    otherwise was cut short (truncated_file); without it, it is not DICOM (not_dicom)."""
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
    except (NotImplementedError, BytesLengthException) as exc:  # a damaged element
        raise StudyError(*_element_fault(exc, "an element of the header"), path) from None
    except OSError as exc:
        raise StudyError("unreadable_file", f"cannot read ({type(exc).__name__})", path)
    except Exception as exc:  # noqa: BLE001 - EOF, a broken element
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
    """Why a series cannot be used, or None. Decided over all of its files: what only a
    minority of them say (multi-frame, an implausible pixel spacing) drops those files
    instead (:func:`_prepare`), so one bad file never costs its series."""
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
    multi = [h for h in group if h.frames > 1]
    if multi and 2 * len(multi) >= len(group):
        return "multiframe_unsupported", "NumberOfFrames above 1"
    orientations = [h.orientation for h in group if h.orientation is not None]
    if orientations:
        orientation = _most_common(orientations)
        cos_z = abs(float(slice_normal(orientation)[2]))  # type: ignore[arg-type]
        if cos_z < MIN_AXIAL_COSINE:
            return "non_axial", f"slice normal . z = {cos_z:.2f} < {MIN_AXIAL_COSINE}"
    bad = _spacing_problems(group)
    if bad and 2 * len(bad) >= len(group):
        err = bad[min(bad)]
        return err.reason, err.detail
    if len(group) == 1:
        return "single_slice", "1 slice"
    if len(group) < min_slices:
        return "too_few_slices", f"{len(group)} slices < --min_slices={min_slices}"
    return None


def _spacing_problems(group: list[SliceHeader]) -> dict[str, StudyError]:
    """path -> bad_pixel_spacing, for the files whose PixelSpacing is implausible."""
    out = {}
    for h in group:
        try:
            limits.check_pixel_spacing(h.pixel_spacing_mm, h.path)
        except StudyError as err:
            out[h.path] = err
    return out


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
                   min_slices: int, warnings: list[Issue], problem: str = ""
                   ) -> list[SliceHeader]:
    """Keeps the slices sharing the most common ``key``; each other one is dropped with a
    warning naming it (or the series fails when too few slices remain). ``problem``: the
    keyword whose recorded problem (empty, malformed) a dropped file's warning adds."""
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
    for h, v in zip(group, values):
        if v != common:
            own = h.problems.get(problem, "") if problem else ""
            warnings.append(Issue(study, h.path, reason, detail + f"; kept the {len(kept)} "
                                  "slices of the most common, dropped this one"
                                  + (f" ({own})" if own else ""), "warning"))
    return kept


def _drop(group: list[SliceHeader], bad: dict[str, tuple[str, str]], study: str,
          warnings: list[Issue]) -> list[SliceHeader]:
    """The group without the files of ``bad`` (path -> reason, detail), each named."""
    for h in group:
        if h.path in bad:
            warnings.append(Issue(study, h.path, *bad[h.path], "warning"))
    return [h for h in group if h.path not in bad]


def _prepare(group: list[SliceHeader], study: str, min_slices: int,
             warnings: list[Issue]) -> Series:
    """One candidate series made ready: the files that disagree with the rest of their
    series are dropped (each named), the others ordered. Raises StudyError when what is
    left cannot be used."""
    n = len(group)
    group = _drop(group, {h.path: ("multiframe_unsupported", "NumberOfFrames above 1 in a "
                                   "series of single-frame slices; not used")
                          for h in group if h.frames > 1}, study, warnings)
    group = _drop(group, {p: (e.reason, e.detail + "; the rest of the series has a plausible "
                              "spacing: not used")
                          for p, e in _spacing_problems(group).items()}, study, warnings)
    group = _keep_majority(group, lambda h: (h.rows, h.columns), "mixed_matrix",
                           "matrix sizes (Rows x Columns)", study, min_slices, warnings)
    group = _keep_majority(
        group, lambda h: None if h.pixel_spacing_mm is None else tuple(
            round(v, 3) for v in h.pixel_spacing_mm),
        "mixed_pixel_spacing", "pixel spacings", study, min_slices, warnings,
        problem="PixelSpacing")
    # A file without the rescale (or the position) the rest of its series has: its HU
    # cannot be trusted (its place is unknown). A minority is dropped; when most files lack
    # it, the series goes on as a whole (1 and 0 assumed; ordered otherwise).
    for attr, keyword, reason, why in (
            ("has_rescale", "Rescale", "missing_rescale", "its HU cannot be trusted"),
            ("position", "ImagePositionPatient", "missing_position", "it cannot be placed")):
        lacking = [h for h in group if not getattr(h, attr)]
        if lacking and 2 * len(lacking) < len(group):
            have = len(group) - len(lacking)
            group = _drop(group, {h.path: (reason, (h.problems.get(keyword) or f"{keyword} "
                                                    "is absent")
                                           + f" while {have} of {len(group)} slices of the "
                                           f"series have it: {why}; not used")
                                  for h in lacking}, study, warnings)
    ordered, positions, order_warnings = _order(group, study)
    warnings.extend(order_warnings)
    if len(ordered) < max(min_slices, 2):
        raise StudyError("too_few_slices", f"{len(ordered)} usable distinct slices of {n} "
                         f"files < --min_slices={min_slices}")
    counts = Counter(h.sop_uid for h in ordered if h.sop_uid)
    shared = frozenset(u for u, c in counts.items() if c > 1)
    for h in ordered:
        if not h.sop_uid:
            warnings.append(Issue(study, h.path, "missing_sop_uid",
                                  h.problems.get("SOPInstanceUID", "SOPInstanceUID is absent")
                                  + "; the slice is keyed by its file", "warning"))
        elif h.sop_uid in shared:
            warnings.append(Issue(study, h.path, "duplicate_sop_uid",
                                  f"{counts[h.sop_uid]} slices of the series share one "
                                  "SOPInstanceUID; each is keyed by its file", "warning"))
    return Series(ordered[0].series_uid, str(_most_common([h.study_uid for h in ordered])),
                  str(_most_common([h.patient_id for h in ordered])), ordered, positions,
                  str(_most_common([h.transfer_syntax or "" for h in ordered])) or None,
                  warnings, shared)


def _header_problems(series: Series) -> list[str]:
    """What the headers say against ``series`` being a usable chest series."""
    problems = []
    first = series.slices[0]
    rows, columns = first.rows, first.columns
    if min(rows, columns) < MIN_MATRIX:
        problems.append(f"matrix {rows} x {columns} under the {MIN_MATRIX}-pixel floor")
    if first.pixel_spacing_mm is not None:
        fov = min(rows * first.pixel_spacing_mm[0], columns * first.pixel_spacing_mm[1])
        if fov < MIN_FIELD_OF_VIEW_MM:
            problems.append(f"a field of view of {fov:.0f} mm, under "
                            f"{MIN_FIELD_OF_VIEW_MM:g} mm")
    if len(series.positions_mm) > 1:
        gap = float(np.median(np.diff(series.positions_mm)))
        if gap > MAX_SLICE_GAP_MM:
            problems.append(f"slices {gap:.0f} mm apart, over {MAX_SLICE_GAP_MM:g} mm")
    return problems


def _lung_on_probe(series: Series, study: str, lim: Limits | None) -> bool:
    """Whether lung is found on one of up to PROBE_SLICES slices (middle first). A probe
    file that cannot be decoded is skipped (it is named when it is sampled)."""
    n = len(series)
    picks = list(dict.fromkeys((n // 2, n // 4, (3 * n) // 4)))[:PROBE_SLICES]
    for i in picks:
        limits.check_deadline()
        h = series.slices[i]
        try:
            hu, _ = read_hu(h, study, lim)
        except StudyError:
            continue
        spacing = h.pixel_spacing_mm[0] if h.pixel_spacing_mm else None
        if lung.lung_fraction(hu, spacing) >= PROBE_MIN_LUNG_FRACTION:
            return True
    return False


def _rank(candidates: list[Series], study: str, lim: Limits | None
          ) -> list[tuple[Series, list[str]]]:
    """The candidates, best first, each with what speaks against it: a usable chest series
    (matrix, field of view, slice gap, lung on a probe slice) before one that is not, the
    slice count as the tie-break. Pixels are decoded (a few probe slices) only when more
    than one candidate passes the header checks, in the tie-break's order, until lung is
    found: the candidates after that one lose to it on their slice count anyway."""
    def by_count(c: Series) -> tuple:
        return -len(c), _most_common([h.series_number for h in c.slices]), c.series_uid

    problems = {id(c): _header_problems(c) for c in candidates}
    passing = sorted((c for c in candidates if not problems[id(c)]), key=by_count)
    if len(passing) > 1:
        for c in passing:
            if _lung_on_probe(c, study, lim):
                break
            problems[id(c)].append("no lung found on its probe slices")

    def tier(c: Series) -> int:
        p = problems[id(c)]
        return 0 if not p else 1 if p[-1].startswith("no lung") and len(p) == 1 else 2

    ordered = sorted(candidates, key=lambda c: (tier(c), *by_count(c)))
    return [(c, problems[id(c)]) for c in ordered]


def choose_series(headers: list[SliceHeader], study: str, min_slices: int,
                  lim: Limits | None = None) -> Series:
    """Picks the axial CT series that makes the most usable chest series (slice count as
    the tie-break) and orders it; says why each other series was rejected or passed over.
    Raises StudyError. The result does not depend on the order of ``headers``. ``lim``
    bounds the probe slices' decoding (only when several series compete)."""
    groups: dict[str, list[SliceHeader]] = {}
    for h in sorted(headers, key=lambda h: h.path):
        groups.setdefault(h.series_uid, []).append(h)
    n_files = {uid: len(g) for uid, g in groups.items()}
    dropped: dict[str, list[Issue]] = {}
    # Files whose pixels cannot be decoded here leave their series before it is judged.
    for uid, group in list(groups.items()):
        problems = {h.path: _decoder_problem(h.transfer_syntax) for h in group}
        bad = [h for h in group if problems[h.path]]
        if bad and len(bad) < len(group):
            dropped[uid] = [Issue(study, h.path, "compressed_no_decoder",
                                  str(problems[h.path]), "warning") for h in bad]
            groups[uid] = [h for h in group if not problems[h.path]]
    rejected: list[tuple[str, str, list[SliceHeader], str]] = []  # reason, detail, files, label
    candidates: list[Series] = []
    # Series are named by their rank (most files first), never by a tag value.
    ranked = sorted(groups, key=lambda u: (-n_files[u], u))
    label_of = {u: f"series {k}/{len(ranked)}" for k, u in enumerate(ranked, start=1)}
    for uid, group in sorted(groups.items()):
        reason = _series_reason(group, min_slices)
        if reason is None:
            problem = next((p for p in (_decoder_problem(h.transfer_syntax) for h in group)
                            if p), None)
            if problem:
                reason = ("compressed_no_decoder", problem)
        if reason is None:
            try:
                candidates.append(_prepare(group, study, min_slices,
                                           list(dropped.get(uid, []))))
                continue
            except StudyError as err:
                reason = (err.reason, err.detail)
        rejected.append((reason[0], reason[1], group, label_of[uid]))
    if not candidates:
        detail = "; ".join(f"{lab} ({n_files[g[0].series_uid]} files): {r} ({d})"
                           for r, d, g, lab in rejected)
        codes = {r for r, _, _, _ in rejected}
        raise StudyError(codes.pop() if len(codes) == 1 else "no_usable_series", detail)
    choice = _rank(candidates, study, lim)
    chosen = choice[0][0]
    label = label_of[chosen.series_uid]
    warnings = list(chosen.warnings)
    for r, d, g, lab in rejected:  # a series of one file names it
        warnings.append(Issue(study, g[0].path if len(g) == 1 else "", "series_rejected",
                              f"{lab} ({n_files[g[0].series_uid]} files): {r} ({d})",
                              "warning"))
    for other, problems in choice[1:]:
        n = n_files[other.series_uid]
        if problems:
            why = f"passed over for {label} ({len(chosen)} slices): " + "; ".join(problems)
        elif len(other) < len(chosen):
            why = f"fewer slices than the chosen series ({len(chosen)})"
        else:
            why = (f"as many slices as the chosen series ({len(chosen)}), which has the lower "
                   "SeriesNumber (or UID)")
        warnings.append(Issue(study, other.slices[0].path if n == 1 else "", "series_rejected",
                              f"{label_of[other.series_uid]} ({n} files): {why}", "warning"))
    chosen.warnings = warnings
    return chosen


def _order(group: list[SliceHeader], study: str
           ) -> tuple[list[SliceHeader], list[float], list[Issue]]:
    """Orders along the slice normal by ImagePositionPatient; without a position on every
    slice, by InstanceNumber, else SliceLocation, else the file names - and says which. A
    file without the orientation the rest of its series has is named (the series' is
    used)."""
    warnings: list[Issue] = []
    orientations = [h.orientation for h in group if h.orientation is not None]
    if orientations:
        orientation = _most_common(orientations)
        for h in group:
            if h.orientation is None:
                why = h.problems.get("ImageOrientationPatient",
                                     "ImageOrientationPatient is absent")
                warnings.append(Issue(study, h.path, "missing_orientation",
                                      f"{why}; the series' orientation is used", "warning"))
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
    """Decodes one slice to float32 HU (rows x columns). Raises StudyError for this file,
    whatever it holds: the parse, each element read and the pixel decoding are guarded.
    The file is re-checked (regular, within the byte limit) and its dimensions checked
    against the pixel limit before anything is decoded."""
    lim = lim or Limits()
    path = header.path
    warnings: list[Issue] = []
    with limits.open_regular(path, lim) as f:
        check_deflated(f, path, lim)
        f.seek(0)
        try:
            ds = pydicom.dcmread(f, force=True)
        except (NotImplementedError, BytesLengthException) as exc:
            raise StudyError(*_element_fault(exc, "an element of the file"), path) from None
        except OSError as exc:
            raise StudyError("unreadable_file", f"cannot read ({type(exc).__name__})", path)
        except Exception as exc:  # noqa: BLE001 - EOF, a broken element
            raise StudyError("truncated_file", f"cannot re-read file ({type(exc).__name__})",
                             path)
    check_elements(ds, path)
    rows, columns = _count(ds, "Rows", path), _count(ds, "Columns", path)
    frames = _count(ds, "NumberOfFrames", path, default=1)
    limits.check_pixels(rows, columns, lim, path, frames)
    if (rows, columns) != (header.rows, header.columns):
        raise StudyError("truncated_file", "the file changed since its header was read", path)
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    tsuid = _text(ds.file_meta, "TransferSyntaxUID", path=path)
    if not tsuid:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ("1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"))
        warnings.append(Issue(study, path, "missing_transfer_syntax",
                              f"assumed {UID(ds.file_meta.TransferSyntaxUID).name}", "warning"))
    tsuid = UID(str(ds.file_meta.TransferSyntaxUID))
    if not tsuid.is_transfer_syntax:
        raise StudyError("pixel_decode_error", "Transfer Syntax UID is not a known transfer "
                         "syntax", path)
    if not _text(ds, "PhotometricInterpretation", path=path):  # old tools omit it; CT is grey
        ds.PhotometricInterpretation = "MONOCHROME2"
    if _get(ds, "SamplesPerPixel", path) is None:
        ds.SamplesPerPixel = 1
    if "PixelData" not in ds:
        raise StudyError("truncated_file", "no pixel data", path)
    data = _get(ds, "PixelData", path)
    size = len(data) if isinstance(data, (bytes, bytearray)) else 0
    expected = rows * columns * _count(ds, "BitsAllocated", path, default=16) // 8
    if size == 0 or not tsuid.is_compressed and size < expected:
        raise StudyError("truncated_file", f"pixel data has {size} bytes, header says "
                         f"{expected}", path)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - whatever the decoder meets is the file's
        raise StudyError("pixel_decode_error", f"{_ts_name(tsuid)}: {type(exc).__name__}",
                         path)
    if stored.ndim != 2:
        raise StudyError("pixel_decode_error", f"expected one 2-D frame, got {stored.shape}",
                         path)
    slope, intercept, present = _rescale(ds, path)
    if not present:
        warnings.append(Issue(study, path, "missing_rescale",
                              "RescaleSlope/Intercept absent or empty; assumed 1 and 0",
                              "warning"))
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, warnings
