"""The TFRecord schema: one ``tf.train.Example`` per CT slice, defined once.

data_prep writes records with :func:`serialize`; the input pipeline, export and predict
read them with :func:`parse_spec` / :func:`parse`. Nothing else in the project spells a
feature name: import the constants below.

Every field, with its dtype and shape (all fixed-length, so parsing needs no defaults):

=======================  =======  =====  ==============================================
feature                  dtype    shape  meaning
=======================  =======  =====  ==============================================
image/encoded            bytes    ()     PNG, uint8, height x width x channels: the lung
                                         crop, windowed (one channel per window in the
                                         dataset manifest's ``windows``), zero (or, in
                                         the train split, rotated lung) outside the lung
image/height             int64    ()     pixels
image/width              int64    ()     pixels
image/channels           int64    ()     number of windows (1 = lung window)
mask/encoded             bytes    ()     PNG, uint8, height x width, 255 = lung, 0 = not
label/name               bytes    ()     class name, lower case (``covid``, ``normal``...)
label/index              int64    ()     index of label/name in the manifest's ``classes``
patient/key              bytes    ()     pseudonymous patient key: salted SHA-256 (hex,
                                         16 chars). Never PatientID / PatientName.
study/key                bytes    ()     salted hash of StudyInstanceUID (or study path)
series/key               bytes    ()     salted hash of SeriesInstanceUID (or study path)
slice/sop_key            bytes    ()     salted hash of SOPInstanceUID (or file path)
slice/index              int64    ()     index of the slice in the ordered series
slice/count              int64    ()     number of slices in the ordered series
slice/position_mm        float32  ()     ImagePositionPatient projected on the slice
                                         normal, mm (slice index for slice images)
slice/lung_fraction      float32  ()     lung mask area / original slice area
site                     bytes    ()     acquisition site (manifest column or "default")
split                    bytes    ()     ``train``, ``val`` or ``test``
=======================  =======  =====  ==============================================

The source file's format (DICOM, PNG, JPEG, RGBA...) is deliberately *not* recorded: every
slice is normalised to the same grey representation, so a model cannot learn it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Mapping

IMAGE = "image/encoded"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
MASK = "mask/encoded"
LABEL_NAME = "label/name"
LABEL_INDEX = "label/index"
PATIENT_KEY = "patient/key"
STUDY_KEY = "study/key"
SERIES_KEY = "series/key"
SOP_KEY = "slice/sop_key"
SLICE_INDEX = "slice/index"
SLICE_COUNT = "slice/count"
POSITION_MM = "slice/position_mm"
LUNG_FRACTION = "slice/lung_fraction"
SITE = "site"
SPLIT = "split"

SPLITS = ("train", "val", "test")
#: The dataset manifest of a data_prep output folder (counts, files, settings).
MANIFEST = "manifest.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # "bytes" | "int64" | "float32"
    doc: str


FIELDS: tuple[Field, ...] = (
    Field(IMAGE, "bytes", "PNG uint8 HxWxC windowed lung crop"),
    Field(HEIGHT, "int64", "image height, pixels"),
    Field(WIDTH, "int64", "image width, pixels"),
    Field(CHANNELS, "int64", "image channels (one per window)"),
    Field(MASK, "bytes", "PNG uint8 HxW lung mask, 255 = lung"),
    Field(LABEL_NAME, "bytes", "class name"),
    Field(LABEL_INDEX, "int64", "class index in the manifest's classes"),
    Field(PATIENT_KEY, "bytes", "pseudonymous patient key (salted hash)"),
    Field(STUDY_KEY, "bytes", "salted hash of the study"),
    Field(SERIES_KEY, "bytes", "salted hash of the series"),
    Field(SOP_KEY, "bytes", "salted hash of the slice instance"),
    Field(SLICE_INDEX, "int64", "slice index in the ordered series"),
    Field(SLICE_COUNT, "int64", "slices in the ordered series"),
    Field(POSITION_MM, "float32", "slice position along the normal, mm"),
    Field(LUNG_FRACTION, "float32", "lung area / slice area"),
    Field(SITE, "bytes", "acquisition site"),
    Field(SPLIT, "bytes", "train / val / test"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
#: The fields that hold the folder's salted hashes: another salt, other values.
SALTED = (PATIENT_KEY, STUDY_KEY, SERIES_KEY, SOP_KEY)
_BY_NAME = {f.name: f for f in FIELDS}


def validate(record: Mapping[str, Any]) -> None:
    """Raises ValueError unless ``record`` has exactly the schema's fields, well typed."""
    missing = sorted(set(FIELD_NAMES) - set(record))
    extra = sorted(set(record) - set(FIELD_NAMES))
    if missing or extra:
        raise ValueError(
            f"Record does not match the schema. Missing: {missing}; unexpected: {extra}"
        )
    for f in FIELDS:
        value = record[f.name]
        ok = {
            "bytes": isinstance(value, (bytes, str)),
            "int64": isinstance(value, int) and not isinstance(value, bool),
            "float32": isinstance(value, (int, float)) and not isinstance(value, bool),
        }[f.dtype]
        if not ok:
            raise ValueError(
                f"Field {f.name!r} must be {f.dtype}. "
                f"Received: {type(value).__name__} {value!r:.60}"
            )
    if not bytes(record[IMAGE]).startswith(PNG_SIGNATURE):
        raise ValueError(f"Field {IMAGE!r} must hold PNG bytes.")
    if not bytes(record[MASK]).startswith(PNG_SIGNATURE):
        raise ValueError(f"Field {MASK!r} must hold PNG bytes.")
    if record[SPLIT] not in SPLITS and record[SPLIT] not in tuple(s.encode() for s in SPLITS):
        raise ValueError(f"Field {SPLIT!r} must be one of {SPLITS}. Received: {record[SPLIT]!r}")


def serialize(record: Mapping[str, Any]) -> bytes:
    """Validates ``record`` and returns a serialized ``tf.train.Example``."""
    import tensorflow as tf  # lazy: data_prep workers and `import covid_keras` stay TF-free

    validate(record)
    feature = {}
    for f in FIELDS:
        value = record[f.name]
        if f.dtype == "bytes":
            value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        elif f.dtype == "int64":
            feature[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        else:
            feature[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def content_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a record's fields other than the :data:`SALTED` keys: the same for
    the same slice in every build of the same data with the same settings, whatever the
    folder's salt. It orders the records (data_prep's shards, the folds of ``--folds``), so
    a rebuild with another salt trains the same; it is never written to a record.
    ``record``: a record dict or :func:`parse`'s values (floats as float32)."""
    h = hashlib.sha256()
    for f in FIELDS:
        if f.name in SALTED:
            continue
        value = record[f.name]
        if f.dtype == "bytes":
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        elif f.dtype == "int64":
            raw = str(int(value)).encode()
        else:
            raw = struct.pack("<f", float(value))
        h.update(f.name.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def digest_of(digests: list[str]) -> str:
    """One SHA-256 (hex) of a sequence of :func:`content_digest`s, in order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def parse_spec() -> dict:
    """The ``tf.io.parse_example`` feature spec for every field."""
    import tensorflow as tf

    dtypes = {"bytes": tf.string, "int64": tf.int64, "float32": tf.float32}
    return {f.name: tf.io.FixedLenFeature([], dtypes[f.dtype]) for f in FIELDS}


def parse(serialized: bytes) -> dict[str, Any]:
    """Parses one serialized example into Python values (bytes, int, float), eagerly.

    For tests, tools and predict; the input pipeline uses :func:`parse_spec` in tf.data.
    """
    import tensorflow as tf

    return values_of(tf.train.Example.FromString(serialized))


def values_of(example) -> dict[str, Any]:
    """:func:`parse` of an already parsed ``tf.train.Example``."""
    out: dict[str, Any] = {}
    for name, feat in example.features.feature.items():
        if name not in _BY_NAME:
            raise ValueError(f"Unknown feature {name!r} in record (schema: {FIELD_NAMES}).")
        kind = feat.WhichOneof("kind")
        values = list(getattr(feat, kind).value)
        if len(values) != 1:
            raise ValueError(f"Feature {name!r} must hold one value. Received: {len(values)}")
        out[name] = values[0]
    return out
