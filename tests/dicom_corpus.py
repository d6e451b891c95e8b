"""A small corpus generator for the DICOM robustness tests (tests only, not a product feature).

A good study is written with the phantom series helper of ``test_build_tfrecords`` (pydicom);
this module then damages one element of one file *in its bytes*, the way a broken exporter
or a flipped byte does, without pydicom re-encoding (or validating) anything:

* ``unknown_vr``: the element's two VR bytes become ``b"D\\xc5"`` (no such VR);
* ``wrong_length``: the value has the wrong length for its tag - a byte short for a binary
  VR (US, OW, ...), one value short for a multi-valued string (ImageOrientationPatient's 6
  numbers become 5), one value too many for a single-valued one ("1" becomes "1\\1");
* ``empty``: the value has zero length.

The element's length field (and, in the file meta group, the group length) is kept in step,
so the rest of the file parses as before. Only Explicit VR Little Endian files are handled:
the phantom's.

Also: :func:`tiny_series` (item 3 of issue 32: many 2 x 2 "CT" slices beside the real
series) and :func:`share_sop_uid` (item 4: one SOPInstanceUID on several files).
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from tests.helpers import series

UNKNOWN_VR = b"D\xc5"
CORRUPTIONS = ("unknown_vr", "wrong_length", "empty")
# VRs whose length field is 4 bytes (after 2 reserved bytes) in Explicit VR.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
# Binary VRs and the size of one value.
BINARY_SIZE = {b"US": 2, b"SS": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"FD": 8, b"AT": 4,
               b"OW": 2, b"OB": 1, b"OF": 4, b"OD": 8, b"OL": 4, b"SV": 8, b"UV": 8}

# Every tag data_prep reads from a DICOM file, by what it is for (issue 32's list first).
SWEPT_TAGS: dict[str, tuple[str, ...]] = {
    "orientation": ("ImageOrientationPatient",),
    "position": ("ImagePositionPatient",),
    "spacing": ("PixelSpacing",),
    "thickness": ("SliceThickness", "SpacingBetweenSlices"),
    "rescale": ("RescaleSlope", "RescaleIntercept"),
    "rows_columns": ("Rows", "Columns"),
    "bits": ("BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"),
    "photometric": ("PhotometricInterpretation", "SamplesPerPixel"),
    "transfer_syntax": ("TransferSyntaxUID",),
    "pixel_data": ("PixelData",),
    "identity": ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "PatientID",
                 "MediaStorageSOPClassUID", "SOPClassUID"),
    "series_choice": ("Modality", "ImageType", "SeriesDescription", "SeriesNumber"),
    "ordering": ("InstanceNumber", "SliceLocation"),
}


@dataclass(frozen=True)
class Element:
    tag: int
    vr: bytes
    start: int  # offset of the tag
    value: int  # offset of the value
    length: int


def elements(data: bytes) -> list[Element]:
    """The top-level elements of an Explicit VR Little Endian file (meta group included)."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM file with a preamble")
    out, i = [], 132
    while i + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, i)
        vr = data[i + 4:i + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", data, i + 8)
            value = i + 12
        else:
            (length,) = struct.unpack_from("<H", data, i + 6)
            value = i + 8
        if length == 0xFFFFFFFF:
            raise ValueError("undefined lengths are not handled (the phantom writes none)")
        out.append(Element((group << 16) | elem, vr, i, value, length))
        i = value + length
    return out


def find(data: bytes, keyword: str) -> Element:
    tag = int(pydicom.datadict.tag_for_keyword(keyword))
    for e in elements(data):
        if e.tag == tag:
            return e
    raise KeyError(f"{keyword} is not in the file")


def _with_value(data: bytes, e: Element, value: bytes) -> bytes:
    if e.vr in LONG_VRS:
        head = data[e.start:e.start + 8] + struct.pack("<I", len(value))
    else:
        head = data[e.start:e.start + 6] + struct.pack("<H", len(value))
    out = data[:e.start] + head + value + data[e.value + e.length:]
    if e.tag >> 16 == 0x0002:  # the meta group's length follows
        g = find(out, "FileMetaInformationGroupLength")
        (n,) = struct.unpack_from("<I", out, g.value)
        out = out[:g.value] + struct.pack("<I", n + len(value) - e.length) + out[g.value + 4:]
    return out


def _wrong_length(e: Element, raw: bytes) -> bytes:
    if e.vr in BINARY_SIZE:
        return raw[:-1]  # not a whole number of values
    pad = b"\x00" if e.vr == b"UI" else b" "
    values = raw.rstrip(b" \x00").split(b"\\")
    if pydicom.datadict.dictionary_VM(e.tag) == "1":
        values = values * 2  # one value too many
    else:
        values = values[:-1] if len(values) > 1 else []  # one value short
    text = b"\\".join(values)
    return text + pad * (len(text) % 2)


def corrupt(data: bytes, keyword: str, kind: str) -> bytes:
    """``data`` with one of :data:`CORRUPTIONS` planted in its ``keyword`` element."""
    e = find(data, keyword)
    if kind == "unknown_vr":
        return data[:e.start + 4] + UNKNOWN_VR + data[e.start + 6:]
    if kind == "empty":
        return _with_value(data, e, b"")
    if kind == "wrong_length":
        return _with_value(data, e, _wrong_length(e, data[e.value:e.value + e.length]))
    raise ValueError(f"kind must be one of {CORRUPTIONS}. Received: {kind!r}")


def mutants() -> list[tuple[str, str, str]]:
    """(what, keyword, corruption) for every swept tag and corruption."""
    return [(what, kw, kind) for what, kws in SWEPT_TAGS.items() for kw in kws
            for kind in CORRUPTIONS]


def good_study(folder: Path, num_slices: int = 16, seed: int = 1, **kw) -> list[Path]:
    """A good covid phantom series (64 x 64), in slice order."""
    return series(folder, kind="covid", seed=seed, num_slices=num_slices,
                  file_names="ordered", **kw)


def copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tiny_series(folder: Path, n: int, seed: int = 2, matrix: int = 2, **kw) -> list[Path]:
    """``n`` "CT" slices of ``matrix`` x ``matrix`` pixels: a series of many tiny files (soft
    tissue, no lung), axial, in the same study as the real series when ``study_uid`` is
    given."""
    vol = np.full((n, matrix, matrix), 40.0, np.float32)
    kw.setdefault("series_number", 9)
    return series(folder, volume_hu=vol, seed=seed, pixel_spacing_mm=0.7,
                  slice_thickness_mm=1.0, **kw)


def share_sop_uid(paths: list[Path], uid: str = "1.2.826.0.1.3680043.8.498.1") -> None:
    """Gives every file in ``paths`` the same SOPInstanceUID (meta and dataset)."""
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(p, enforce_file_format=True)
