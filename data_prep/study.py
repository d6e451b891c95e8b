"""The per-study work, in two steps that run in worker processes (or Beam DoFns).

:func:`scan_study` (headers only): find the study's files, recognise DICOM / PNG / JPEG by
content, choose and order the series, sample the slice indices, derive the pseudonymous
keys. Cheap (pixels are decoded only to probe a few slices for lung when several series of
one study compete); it is all the split needs.

:func:`process_study` (pixels): decode only the sampled slices, preprocess them
(:func:`data_prep.preprocess.prepare_slice`) and return the records, with the split known
(the rotated-lung fill is for the train split only).

Both return picklable values and never raise for bad input: problems become
:class:`data_prep.errors.Issue` rows, which name the study and its files by pseudonymous
names only (:mod:`data_prep.redact`; paths and tag values stay in the worker). Both run
under the study's limits (:mod:`data_prep.limits`: regular files only, bytes, pixels from
headers, time) with library messages captured and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from covid_keras.core import schema
from covid_keras.core.imaging import grey_to_hu
from data_prep import dicom_io, limits, redact, slice_images
from data_prep.errors import Issue, StudyError
from data_prep.limits import Limits, StudyTimeout
from data_prep.preprocess import PreparedSlice, PrepConfig, prepare_slice, sample_indices
from data_prep.settings import DEFAULTS, PrepSettings

# Bytes read to find a PNG / JPEG's dimensions (a JPEG's frame header can follow EXIF and
# ICC segments of up to 64 KiB each).
IMAGE_HEADER_BYTES = 256 * 1024


@dataclass(frozen=True)
class StudyTask:
    """One row of the input: a study folder (or a single slice image) and what we know.

    ``study_id`` (the path as the input gives it) and ``path`` are private: they only ever
    feed salted hashes. Outputs name the study by :attr:`StudyScan.name`."""

    study_id: str
    path: str
    label: str
    patient_id: str = ""  # from the manifest; empty -> DICOM PatientID -> study folder name
    site: str = "default"
    split: str = ""  # from the manifest; empty -> assigned by data_prep.split
    origin: str = ""  # where in the input: "line00017" (manifest), "entry00003" (folders)
    error: tuple[str, str] | None = None  # a bad input row: (reason, detail)


@dataclass(frozen=True)
class ScanConfig:
    """Which slices of a study, and the study's limits; the defaults are
    :class:`data_prep.settings.PrepSettings`'s (the one home of data_prep's settings)."""

    salt: bytes
    num_slices: int = DEFAULTS.num_slices
    sampling: str = DEFAULTS.sampling
    min_slices: int = DEFAULTS.min_slices
    # The window 8-bit slice images are assumed to have been exported with: their grey
    # levels are mapped back to pseudo-HU through it.
    image_window_hu: tuple[float, float] = DEFAULTS.image_window_hu
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_settings(cls, s: PrepSettings, salt: bytes,
                      limits: Limits | None = None) -> ScanConfig:
        """The scan of :class:`~data_prep.settings.PrepSettings` ``s`` with ``salt``;
        ``limits``: the run's (its time and memory caps; the file and pixel limits are the
        settings'), default data_prep's."""
        limits = dataclasses.replace(limits or Limits(), max_file_bytes=s.max_file_bytes,
                                     max_image_pixels=s.max_image_pixels)
        return cls(salt=salt, num_slices=s.num_slices, sampling=s.sampling,
                   min_slices=s.min_slices, image_window_hu=s.image_window_hu,
                   limits=limits)


@dataclass
class SampledSlice:
    path: str
    index: int  # in the ordered series
    position_mm: float
    sop_key: str
    pixel_spacing_mm: float | None
    header: dicom_io.SliceHeader | None = None  # DICOM: the scan's header, not read again


@dataclass
class StudyScan:
    task: StudyTask
    name: str = ""  # the study's pseudonymous name (data_prep.redact.study_name)
    kind: str = ""  # "dicom" | "images"
    patient_key: str = ""
    # the patient's split-order key (split_order_key): unsalted, so the split follows
    # --seed and the patients alone; kept in memory, never written
    split_key: str = ""
    study_key: str = ""
    series_key: str = ""
    slice_count: int = 0
    fingerprint: str = ""  # every file's relative path, size and mtime, hashed
    sampled: list[SampledSlice] = field(default_factory=list)
    spares: list[SampledSlice] = field(default_factory=list)  # the series' other slices
    file_names: dict[str, str] = field(default_factory=dict)  # path -> pseudonymous name
    issues: list[Issue] = field(default_factory=list)
    error: Issue | None = None


@dataclass
class StudyResult:
    study_key: str
    patient_key: str
    label: str
    site: str
    split: str
    records: list[dict] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    sampled: int = 0
    error: Issue | None = None
    spool_key: str = ""
    #: schema.content_digest of each record (salt-free), in slice order: spooled with the
    #: study, so the shards are ordered and the manifest's content_sha256 is made without
    #: hashing the records again; never written to a record or a log.
    content_digests: list[str] = field(default_factory=list)

    @property
    def order_key(self) -> str:
        """The study's place in its split's shards: the digest of its records' content, so a
        rebuild with another salt writes the same records in the same order."""
        return schema.digest_of(self.content_digests)


def salted_key(salt: bytes, kind: str, value: str, length: int = 16) -> str:
    """Pseudonymous key: the first ``length`` hex chars of SHA-256(salt | kind | value)."""
    h = hashlib.sha256(salt + b"\x00" + kind.encode() + b"\x00" + redact.to_bytes(value))
    return h.hexdigest()[:length]


def split_order_key(patient: str) -> str:
    """The patient's place in the split order: independent of the per-folder salt, so a
    rebuild elsewhere (or at another --image_size) gives the same split for the same --seed.
    Held in memory only: never written to a record, the manifest or a log."""
    return hmac.new(b"data_prep.split_order", redact.to_bytes(patient),
                    hashlib.sha256).hexdigest()


def list_files(path: str) -> list[str]:
    """Every file entry under ``path`` (recursively, links to folders not followed), sorted;
    ``path`` itself if it is not a folder. Entries are not opened here: FIFOs, devices and
    dangling links are listed, and rejected (never opened) by :mod:`data_prep.limits`."""
    if not os.path.isdir(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path, onerror=_raise):
        limits.check_deadline()
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return out


def _raise(err: OSError) -> None:
    raise err


def _sniff(path: str, lim: Limits) -> str:
    """'dicom', 'png', 'jpeg', 'image_suffix' or 'other', from the first bytes. Raises
    StudyError(not_regular_file | file_too_large) without opening what is not a file."""
    head = limits.read_bytes(path, lim, 132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    kind = slice_images.sniff(head)
    if kind:
        return kind
    if path.lower().endswith((".png", ".jpg", ".jpeg")):
        return "image_suffix"  # an image name whose bytes are not an image
    return "other"  # may still be a preamble-less DICOM file: read_header decides


def scan_study(task: StudyTask, cfg: ScanConfig) -> StudyScan:
    """Never raises for bad input; every issue it returns names the study and its files by
    their pseudonymous names only."""
    scan = StudyScan(task=task, name=redact.study_name(task.origin or "study", task.study_id,
                                                        cfg.salt))
    started = time.monotonic()
    with redact.capture_library_messages() as messages:
        try:
            with limits.deadline(cfg.limits.study_timeout_s):
                _scan(scan, cfg)
        except StudyError as err:
            scan.error = Issue(task.study_id, err.file, err.reason, err.detail, "error")
        except StudyTimeout:
            scan.error = Issue(task.study_id, "", "study_timeout",
                               f"reading headers took over --study_timeout_s="
                               f"{cfg.limits.study_timeout_s:g} s "
                               f"({time.monotonic() - started:.1f} s)", "error")
        except Exception as exc:  # noqa: BLE001 - one bad study must never stop the run
            scan.error = Issue(task.study_id, "", *_unexpected(exc), "error")
    if messages:
        scan.issues.append(Issue(task.study_id, "", "library_warning",
                                 "while reading headers: " + redact.summarise(messages),
                                 "warning"))
    scan.issues = [_redacted(i, scan) for i in scan.issues]
    if scan.error is not None:
        scan.error = _redacted(scan.error, scan)
        scan.sampled, scan.spares = [], []
    # The driver holds every study's scan: keep the names processing can still need.
    needed = {s.path for s in scan.sampled} | {s.path for s in scan.spares}
    scan.file_names = {p: n for p, n in scan.file_names.items() if p in needed}
    return scan


def _redacted(issue: Issue, scan: StudyScan) -> Issue:
    """The issue with the study's and file's pseudonymous names in place of paths."""
    return dataclasses.replace(issue, study=scan.name, file=scan.file_names.get(issue.file, ""))


def _unexpected(exc: Exception) -> tuple[str, str]:
    """(reason, detail) of an unexpected exception: out_of_memory for a failed allocation
    (NumPy's MemoryError, OpenCV's), else internal_error. The detail never holds the
    exception's message (it can quote input values)."""
    text = str(exc) if isinstance(exc, cv2.error) else ""
    if isinstance(exc, MemoryError) or "Insufficient memory" in text or \
            "Failed to allocate" in text:
        return "out_of_memory", f"{type(exc).__name__} | {_last_frame(exc)}"
    return "internal_error", f"{type(exc).__name__} | {_last_frame(exc)}"


def _last_frame(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""


def _fingerprint(files: list[str], root: str) -> str:
    """A hash of every file's path (relative to the study), size and modification time:
    a changed, added or removed file changes it (resume must not reuse its records)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            ident = f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        except OSError:
            ident = "unreadable"
        rel = os.path.relpath(f, root) if os.path.isdir(root) else os.path.basename(f)
        h.update(redact.to_bytes(rel) + b"\x00" + ident.encode() + b"\x00")
    return h.hexdigest()[:24]


def _scan(scan: StudyScan, cfg: ScanConfig) -> None:
    task = scan.task
    if task.error is not None:
        raise StudyError(*task.error)
    if not os.path.lexists(task.path):
        hint = ""
        if any("\udc80" <= c <= "\udcff" for c in task.path):
            hint = " (its bytes in the manifest are not UTF-8: see --manifest_encoding)"
        raise StudyError("unreadable_path", "path does not exist" + hint, task.path)
    if not os.access(task.path, os.R_OK):
        raise StudyError("unreadable_path", "permission denied", task.path)
    try:
        files = list_files(task.path)
    except OSError as exc:
        raise StudyError("unreadable_path", f"cannot list folder ({type(exc).__name__})",
                         task.path)
    scan.file_names = redact.file_names(files, task.path, cfg.salt)
    scan.fingerprint = _fingerprint(files, task.path)
    if not files:
        raise StudyError("empty_study", "no files", task.path)
    kinds: dict[str, str] = {}
    for f in files:
        limits.check_deadline()
        try:
            kinds[f] = _sniff(f, cfg.limits)
        except StudyError as err:
            kinds[f] = "rejected"
            scan.issues.append(Issue(task.study_id, f, err.reason, err.detail, "warning"))
    if len(files) == 1 and kinds[files[0]] == "rejected":  # a single file: its reason
        last = scan.issues.pop()
        raise StudyError(last.reason, last.detail, last.file)
    images = [f for f in files if kinds[f] in ("png", "jpeg")]
    dicom_like = [f for f in files if kinds[f] in ("dicom", "other")]
    for f in files:
        if kinds[f] == "image_suffix":
            scan.issues.append(Issue(task.study_id, f, "not_dicom",
                                     "image name, not image bytes", "warning"))
    if images and any(kinds[f] == "dicom" for f in files):
        raise StudyError("mixed_dicom_and_images",
                         f"{len(images)} images and {sum(k == 'dicom' for k in kinds.values())}"
                         " DICOM files", task.path)
    if images:
        for f in dicom_like:
            scan.issues.append(Issue(task.study_id, f, "not_dicom", "not a PNG/JPEG slice",
                                     "warning"))
        _scan_images(scan, images, cfg)
    elif dicom_like:
        _scan_dicom(scan, dicom_like, cfg)
    else:
        reasons = sorted({i.reason for i in scan.issues if i.level == "warning"})
        raise StudyError(reasons[0] if len(reasons) == 1 else "no_readable_slices",
                         f"none of {len(files)} files can be read", task.path)


def _scan_images(scan: StudyScan, images: list[str], cfg: ScanConfig) -> None:
    task = scan.task
    usable = []
    for f in images:  # dimensions from the header, before anything is decoded
        limits.check_deadline()
        try:
            slice_images.check_header(f, cfg.limits)
            usable.append(f)
        except StudyError as err:
            scan.issues.append(Issue(task.study_id, f, err.reason, err.detail, "warning"))
    if not usable:
        last = scan.issues.pop()
        raise StudyError(last.reason, f"every slice image rejected ({last.detail})", last.file)
    ordered = sorted(usable, key=slice_images.natural_key)
    scan.kind = "images"
    scan.slice_count = len(ordered)
    rel = _study_name(task)
    scan.patient_key = salted_key(cfg.salt, "patient", task.patient_id or rel)
    scan.split_key = split_order_key(task.patient_id or rel)
    scan.study_key = salted_key(cfg.salt, "study", rel)
    scan.series_key = scan.study_key
    slices = []
    for i, path in enumerate(ordered):
        name = os.path.relpath(path, task.path) if os.path.isdir(task.path) else ""
        slices.append(SampledSlice(path, i, float(i),
                                   salted_key(cfg.salt, "sop", rel + "/" + name), None))
    _sample(scan, slices, cfg)


def _sample(scan: StudyScan, slices: list[SampledSlice], cfg: ScanConfig) -> None:
    """The sampled slices and, as spares for a sampled file that fails to decode, the few
    unsampled slices nearest to each (the driver holds every study's scan: not all slices)."""
    chosen = sample_indices(len(slices), cfg.num_slices, cfg.sampling)
    scan.sampled = [slices[i] for i in chosen]
    spare: set[int] = set()
    for k, i in enumerate(chosen):
        lo = chosen[k - 1] if k > 0 else -1
        hi = chosen[k + 1] if k + 1 < len(chosen) else len(slices)
        near = sorted((j for j in range(lo + 1, hi) if j not in chosen),
                      key=lambda j: (abs(j - i), j))
        spare.update(near[:2 * MAX_SUBSTITUTES])
    scan.spares = [slices[j] for j in sorted(spare)]


def _study_name(task: StudyTask) -> str:
    return task.study_id or os.path.basename(os.path.normpath(task.path))


def _scan_dicom(scan: StudyScan, files: list[str], cfg: ScanConfig) -> None:
    task = scan.task
    headers, issues = dicom_io.read_headers(files, task.study_id, cfg.limits)
    scan.issues.extend(issues)
    if not headers:
        reasons = sorted({i.reason for i in issues})
        raise StudyError(reasons[0] if len(reasons) == 1 else "no_readable_slices",
                         f"none of {len(files)} files is usable DICOM or a PNG/JPEG slice",
                         task.path)
    series = dicom_io.choose_series(headers, task.study_id, cfg.min_slices, cfg.limits)
    scan.issues.extend(series.warnings)
    scan.kind = "dicom"
    scan.slice_count = len(series)
    patient = task.patient_id or series.patient_id or _study_name(task)
    scan.patient_key = salted_key(cfg.salt, "patient", patient)
    scan.split_key = split_order_key(patient)
    scan.study_key = salted_key(cfg.salt, "study", series.study_uid or _study_name(task))
    scan.series_key = salted_key(cfg.salt, "series", series.series_uid)
    _sample(scan, [SampledSlice(h.path, i, series.positions_mm[i],
                                salted_key(cfg.salt, "sop", _sop_identity(h, series, task)),
                                h.pixel_spacing_mm[0] if h.pixel_spacing_mm else None, h)
                   for i, h in enumerate(series.slices)], cfg)


def _sop_identity(h: dicom_io.SliceHeader, series: dicom_io.Series, task: StudyTask) -> str:
    """What a slice's sop_key hashes: its SOPInstanceUID; its path when it has none; the UID
    and its path inside the study when other slices of the series carry the same UID (the
    keys stay unique)."""
    if not h.sop_uid:
        return h.path
    if h.sop_uid in series.shared_sop_uids:
        rel = os.path.relpath(h.path, task.path) if os.path.isdir(task.path) else h.path
        return h.sop_uid + "\x00" + rel
    return h.sop_uid


def _load_hu(scan: StudyScan, s: SampledSlice, cfg: ScanConfig) -> tuple[np.ndarray, list]:
    if scan.kind == "dicom":
        header = s.header if s.header is not None else dicom_io.read_header(s.path, cfg.limits)
        return dicom_io.read_hu(header, scan.task.study_id, cfg.limits)
    grey, warnings = slice_images.read_grey(s.path, scan.task.study_id, cfg.limits)
    level, width = cfg.image_window_hu
    return grey_to_hu(grey, level, width), warnings


def process_study(scan: StudyScan, split: str, label_index: int, scan_cfg: ScanConfig,
                  prep: PrepConfig, seed: int) -> StudyResult:
    """Decodes and preprocesses the sampled slices of a scanned study. The result's issues
    are this step's only (the scan's own are in ``scan.issues``). Never raises for bad
    input; bounded by ``scan_cfg.limits``."""
    task = scan.task
    result = StudyResult(scan.study_key, scan.patient_key, task.label, task.site, split,
                         sampled=len(scan.sampled))
    if scan.error is not None:
        result.error = scan.error
        return result
    started = time.monotonic()
    with redact.capture_library_messages() as messages:
        try:
            with limits.deadline(scan_cfg.limits.study_timeout_s):
                _process(scan, result, label_index, scan_cfg, prep, seed)
        except StudyTimeout:
            result.records = []
            result.error = Issue(task.study_id, "", "study_timeout",
                                 f"decoding and preprocessing took over --study_timeout_s="
                                 f"{scan_cfg.limits.study_timeout_s:g} s "
                                 f"({time.monotonic() - started:.1f} s)", "error")
        except Exception as exc:  # noqa: BLE001 - one bad study must never stop the run
            result.records = []
            result.error = Issue(task.study_id, "", *_unexpected(exc), "error")
    if messages:
        result.issues.append(Issue(task.study_id, "", "library_warning",
                                   "while decoding: " + redact.summarise(messages), "warning"))
    result.issues = [_redacted(i, scan) for i in result.issues]
    if result.error is not None:
        result.error = _redacted(result.error, scan)
    return result


# A sampled file failing for one of these is replaced by a neighbouring slice (a StudyError
# naming a file is always that file's: it is replaced whatever its reason).
FILE_REASONS = frozenset({"truncated_file", "pixel_decode_error", "image_decode_error",
                          "not_regular_file", "unreadable_file", "file_too_large",
                          "image_too_large", "bad_rescale", "bad_vr", "bad_tag_value"})
MAX_SUBSTITUTES = 2


def _with_substitutes(scan: StudyScan, k: int, used: set[int]):
    """The k-th sampled slice, then up to MAX_SUBSTITUTES unused slices nearest to it that
    lie strictly between its sampled neighbours (the sampling's spacing is kept)."""
    s = scan.sampled[k]
    yield s
    lo = scan.sampled[k - 1].index if k > 0 else -1
    hi = scan.sampled[k + 1].index if k + 1 < len(scan.sampled) else scan.slice_count
    near = sorted((x for x in scan.spares if lo < x.index < hi and x.index not in used),
                  key=lambda x: (abs(x.index - s.index), x.index))
    yield from near[:MAX_SUBSTITUTES]


def _process(scan: StudyScan, result: StudyResult, label_index: int, scan_cfg: ScanConfig,
             prep: PrepConfig, seed: int) -> None:
    task = scan.task
    is_train = result.split == "train"
    if scan.kind == "images":  # no real HU: the gas test would call dark lung "gas"
        prep = dataclasses.replace(prep, lung=dataclasses.replace(prep.lung,
                                                                   gas_median_hu=-math.inf))
    used = {s.index for s in scan.sampled}
    for k, sampled in enumerate(scan.sampled):
        loaded = None
        for s in _with_substitutes(scan, k, used):
            limits.check_deadline()
            if s is not sampled:
                result.sampled += 1
                used.add(s.index)
            try:
                loaded = _load_hu(scan, s, scan_cfg)
                break
            except StudyError as err:
                result.issues.append(Issue(task.study_id, err.file, err.reason, err.detail,
                                           "warning"))
                result.dropped[err.reason] = result.dropped.get(err.reason, 0) + 1
                if err.reason not in FILE_REASONS and not err.file:
                    break
        if loaded is None:
            continue
        if s is not sampled:
            result.issues.append(Issue(task.study_id, s.path, "slice_substituted",
                                       f"slice {s.index} used in place of slice "
                                       f"{sampled.index}, which could not be read",
                                       "warning"))
        hu, warnings = loaded
        result.issues.extend(warnings)
        # seeded by the slice's pixels, not its salted key: a rebuild with another salt
        # writes the same images (the fill outside the lung; and so trains the same)
        rng = np.random.default_rng(
            [seed, int(hashlib.sha256(np.ascontiguousarray(hu).tobytes()).hexdigest()[:8], 16)])
        prepared = prepare_slice(hu, prep, pixel_spacing_mm=s.pixel_spacing_mm,
                                 is_train=is_train, rng=rng)
        if isinstance(prepared, str):
            result.dropped[prepared] = result.dropped.get(prepared, 0) + 1
            continue
        result.records.append(_record(scan, s, prepared, result, label_index))
    if not result.records:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(result.dropped.items())) or "none"
        reason = "no_lung_slices"
        if result.dropped and set(result.dropped) <= FILE_REASONS:
            reason = max(sorted(result.dropped), key=result.dropped.get)
        result.error = Issue(task.study_id, "", reason,
                             f"all {len(scan.sampled)} sampled slices dropped ({counts})",
                             "error")
        # Per-file decode warnings stay: they name the files.


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes with the channels in array order (OpenCV writes 3 channels as BGR)."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    elif img.ndim == 3:
        img = np.ascontiguousarray(img[..., ::-1])
    # Level 3: half the time of level 6 for 5 % more bytes (bench/prep.py).
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _record(scan: StudyScan, s: SampledSlice, p: PreparedSlice, result: StudyResult,
            label_index: int) -> dict:
    return {
        schema.IMAGE: encode_png(p.image),
        schema.HEIGHT: int(p.image.shape[0]),
        schema.WIDTH: int(p.image.shape[1]),
        schema.CHANNELS: int(p.image.shape[2]),
        schema.MASK: encode_png(p.mask),
        schema.LABEL_NAME: result.label,
        schema.LABEL_INDEX: int(label_index),
        schema.PATIENT_KEY: scan.patient_key,
        schema.STUDY_KEY: scan.study_key,
        schema.SERIES_KEY: scan.series_key,
        schema.SOP_KEY: s.sop_key,
        schema.SLICE_INDEX: int(s.index),
        schema.SLICE_COUNT: int(scan.slice_count),
        schema.POSITION_MM: float(s.position_mm),
        schema.LUNG_FRACTION: float(p.lung_fraction),
        schema.SITE: result.site,
        schema.SPLIT: result.split,
    }
