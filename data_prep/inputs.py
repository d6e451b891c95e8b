"""The run's input: a manifest CSV or a folder layout ``<root>/<label>/<study>/``.

Manifest columns (names can be remapped with ``columns``, e.g. COVID-CT's ``patients.csv``
calls the path ``file``): ``study_path`` (required; a study folder or a single slice image,
relative to the CSV's folder or absolute), ``label`` (required), ``patient_id``, ``site``,
``split`` (optional; empty cells are allowed). Other columns are ignored - and never reach
the records.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from data_prep.study import StudyTask

COLUMNS = ("study_path", "label", "patient_id", "site", "split")
VALID_SPLITS = ("train", "val", "test")


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


def read_input(path: str, *, columns: dict[str, str] | None = None,
               label_map: dict[str, str] | None = None,
               split_map: dict[str, str] | None = None) -> list[StudyTask]:
    """StudyTasks from a manifest CSV or a ``<root>/<label>/<study>/`` folder."""
    label_map = label_map or {}
    if os.path.isdir(path):
        return _read_folder(path, label_map)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input is neither a folder nor a manifest CSV: {path}")
    return _read_manifest(path, columns or {}, label_map, split_map or {})


def _read_folder(root: str, label_map: dict[str, str]) -> list[StudyTask]:
    tasks = []
    for label_dir in sorted(Path(root).iterdir()):
        if not label_dir.is_dir() or label_dir.name.startswith("."):
            continue
        for study in sorted(label_dir.iterdir()):
            if study.name.startswith("."):
                continue
            rel = f"{label_dir.name}/{study.name}"
            tasks.append(StudyTask(study_id=rel, path=str(study),
                                   label=normalise_label(label_dir.name, label_map)))
    if not tasks:
        raise ValueError(f"No <label>/<study> entries under {root}")
    return tasks


def _read_manifest(path: str, columns: dict[str, str], label_map: dict[str, str],
                   split_map: dict[str, str]) -> list[StudyTask]:
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"--manifest_columns maps unknown columns {unknown}; known: {COLUMNS}")
    col = {c: columns.get(c, c) for c in COLUMNS}
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for required in ("study_path", "label"):
            if col[required] not in header:
                raise ValueError(f"Manifest {path} has no column {col[required]!r} "
                                 f"(columns: {header})")
        tasks = []
        for line, row in enumerate(reader, start=2):
            rel = (row.get(col["study_path"]) or "").strip()
            label = (row.get(col["label"]) or "").strip()
            if not rel or not label:
                raise ValueError(f"{path}:{line}: empty study_path or label")
            split = (row.get(col["split"]) or "").strip().lower()
            split = split_map.get(split, split)
            if split and split not in VALID_SPLITS:
                raise ValueError(f"{path}:{line}: split must be one of {VALID_SPLITS} or empty. "
                                 f"Received: {split!r}")
            tasks.append(StudyTask(
                study_id=rel,
                path=rel if os.path.isabs(rel) else os.path.join(base, rel),
                label=normalise_label(label, label_map),
                patient_id=(row.get(col["patient_id"]) or "").strip(),
                site=(row.get(col["site"]) or "").strip() or "default",
                split=split,
            ))
    if not tasks:
        raise ValueError(f"Manifest {path} has no rows")
    return tasks
