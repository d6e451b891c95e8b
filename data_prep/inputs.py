"""The run's input: a manifest CSV or a folder layout ``<root>/<label>/<study>/``.

Manifest columns (names can be remapped with ``columns``, e.g. COVID-CT's ``patients.csv``
calls the path ``file``): ``study_path`` (required; a study folder or a single slice image,
relative to the CSV's folder or absolute), ``label`` (required), ``patient_id``, ``site``,
``split`` (optional; empty cells are allowed). Other columns are ignored - and never reach
the records.

Any manifest, any path: a bad row is that row's failure (``StudyTask.error``, a reason code
of :mod:`data_prep.errors`), never the run's. Labels and sites must be printable text of at
most 64 characters starting with a letter or digit (no NUL, no control character, no
formula-like ``=+-@`` start). The encoding is detected (UTF-8 with or without BOM, UTF-16
with BOM) or given (``encoding``); bytes that are not UTF-8 stay the path's own bytes in
``study_path`` (a path of any bytes resolves) and fail the row elsewhere
(``manifest_encoding``); the log then says, in one line, which encoding to pass.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
from pathlib import Path

from data_prep.study import StudyTask

log = logging.getLogger("data_prep")

COLUMNS = ("study_path", "label", "patient_id", "site", "split")
VALID_SPLITS = ("train", "val", "test")
MAX_CELL_CHARS = 64
MAX_FIELD_CHARS = 16 * 1024 * 1024  # csv's 128 KiB default would abort the whole manifest


def parse_mapping(items: list[str] | None, what: str) -> dict[str, str]:
    """["a:b", "c:d"] -> {"a": "b", "c": "d"}."""
    out = {}
    for item in items or []:
        if ":" not in item:
            raise ValueError(f"{what} entries are FROM:TO. Received: {item!r}")
        k, v = item.split(":", 1)
        out[k.strip()] = v.strip()
    return out


def normalise_label(label: str, label_map: dict[str, str]) -> str:
    label = label.strip()
    return label_map.get(label, label).strip().lower()


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def cell_problem(value: str) -> str | None:
    """Why a label / site cell is unusable (in words, never echoing it), or None."""
    if _has_surrogates(value):
        return "is not text in the manifest's encoding"
    if not value:
        return "is empty"
    if len(value) > MAX_CELL_CHARS:
        return f"has {len(value)} characters (> {MAX_CELL_CHARS})"
    if "\x00" in value:
        return "holds a NUL byte"
    if not value.isprintable():
        return "holds a control or non-printable character"
    if value[0] in "=+-@":
        return f"starts with {value[0]!r} (a spreadsheet formula)"
    if not value[0].isalnum():
        return "does not start with a letter or digit"
    return None


def read_input(path: str, *, columns: dict[str, str] | None = None,
               label_map: dict[str, str] | None = None,
               split_map: dict[str, str] | None = None,
               encoding: str = "auto") -> list[StudyTask]:
    """StudyTasks from a manifest CSV or a ``<root>/<label>/<study>/`` folder. Rows that
    cannot be used come back as tasks with ``error`` set."""
    label_map = label_map or {}
    if os.path.isdir(path):
        return _read_folder(path, label_map)
    if not os.path.isfile(path):
        # the path is not echoed: its folder names may name a patient
        raise ValueError("--input is neither a folder nor a manifest CSV (does it exist?)")
    return _read_manifest(path, columns or {}, label_map, split_map or {}, encoding)


def _read_folder(root: str, label_map: dict[str, str]) -> list[StudyTask]:
    tasks = []
    for label_dir in sorted(Path(root).iterdir()):
        if not label_dir.is_dir() or label_dir.name.startswith("."):
            continue
        label = normalise_label(label_dir.name, label_map)
        problem = cell_problem(label)
        for study in sorted(label_dir.iterdir()):
            if study.name.startswith("."):
                continue
            origin = f"entry{len(tasks) + 1:05d}"
            error = None
            if problem:
                error = ("invalid_label", f"the label folder's name {problem}")
            tasks.append(StudyTask(study_id=f"{label_dir.name}/{study.name}", path=str(study),
                                   label=label, origin=origin, error=error))
    if not tasks:
        raise ValueError("--input holds no <label>/<study> entries")
    return tasks


def decode_manifest(raw: bytes, name: str, encoding: str = "auto") -> str:
    """The manifest's text. ``auto``: UTF-8 (BOM or not; bytes that are not UTF-8 are kept as
    surrogate escapes, see the module docstring) or UTF-16 with a BOM. Raises a one-line
    ValueError naming the file when the text cannot be had."""
    if encoding != "auto":
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise ValueError(f"Manifest {name} cannot be read as {encoding} "
                             f"({type(exc).__name__} at byte "
                             f"{getattr(exc, 'start', '?')}); try --manifest_encoding=utf-8, "
                             "cp1252 or latin-1") from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError(f"Manifest {name} starts with a UTF-16 BOM but is not UTF-16; "
                             "pass --manifest_encoding") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if b"\x00" in raw[:4096] and raw.count(b"\x00") > len(raw) // 4:
        raise ValueError(f"Manifest {name} looks like UTF-16 or UTF-32 without a BOM; "
                         "pass --manifest_encoding=utf-16-le (or the file's encoding)")
    text = raw.decode("utf-8", "surrogateescape")
    bad = [i for i, line in enumerate(text.splitlines(), start=1) if _has_surrogates(line)]
    if bad:
        log.warning("Manifest %s is not UTF-8 on %d line(s) (first: line %d): those rows fail "
                    "with manifest_encoding unless only study_path holds the bytes; if the "
                    "file is Windows-1252 or Latin-1, pass --manifest_encoding=cp1252 (or "
                    "latin-1).", name, len(bad), bad[0])
    return text


def _read_manifest(path: str, columns: dict[str, str], label_map: dict[str, str],
                   split_map: dict[str, str], encoding: str) -> list[StudyTask]:
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"--manifest_columns maps unknown columns {unknown}; known: {COLUMNS}")
    col = {c: columns.get(c, c) for c in COLUMNS}
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        text = decode_manifest(f.read(), os.path.basename(path), encoding)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    for required in ("study_path", "label"):
        if col[required] not in header:
            raise ValueError(f"Manifest {os.path.basename(path)} has no column "
                             f"{col[required]!r} (columns: {len(header)})")
    tasks = []
    rows: list[tuple[int, dict]] = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise ValueError(f"Manifest {os.path.basename(path)} is not valid CSV near line "
                         f"{reader.line_num} ({exc})") from None
    for line, row in rows:
        cells = {c: (row.get(col[c]) or "").strip() for c in COLUMNS}
        rel = cells["study_path"]
        split = split_map.get(cells["split"].lower(), cells["split"].lower())
        label = normalise_label(cells["label"], label_map)
        site = cells["site"] or "default"
        error = _row_error(rel, cells, label, site, split)
        tasks.append(StudyTask(
            study_id=rel or f"<line {line}>",
            path=(rel if os.path.isabs(rel) else os.path.join(base, rel)) if rel else "",
            label=label, patient_id=cells["patient_id"], site=site,
            split=split if split in VALID_SPLITS else "",
            origin=f"line{line:05d}", error=error))
    if not tasks:
        raise ValueError(f"Manifest {os.path.basename(path)} has no rows")
    return tasks


def _row_error(rel: str, cells: dict[str, str], label: str, site: str,
               split: str) -> tuple[str, str] | None:
    if not rel:
        return "missing_study_path", "study_path is empty"
    if "\x00" in rel:
        return "missing_study_path", "study_path holds a NUL byte"
    if not cells["label"]:
        return "missing_label", "label is empty"
    for column in ("label", "site", "split", "patient_id"):
        if _has_surrogates(cells[column]):
            return "manifest_encoding", f"{column} is not text in the manifest's encoding"
    problem = cell_problem(label)
    if problem:
        return "invalid_label", f"label {problem}"
    problem = cell_problem(site)
    if problem:
        return "invalid_site", f"site {problem}"
    if split and split not in VALID_SPLITS:
        return "unknown_split", f"split must be one of {VALID_SPLITS} or empty"
    return None
