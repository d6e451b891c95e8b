"""K-fold cross-validation by patient: which patient is in which fold, and each fold's data
folder (``covid_keras.train --folds``).

    table, order = patients_and_order(data_dir, ["train", "val"])  # key -> (label, site)
    folds = assign_folds(table, k=5, seed=0, order=order)          # key -> fold
    write_fold_data(data_dir, ["train", "val"], folds, fold=2, out_dir=...)

The patients come from the training splits only (train and the validation split of the
data folder: never a held-out split). The folds follow data_prep's patient-level rules:
a patient is never in two folds, and they are stratified by label and site (each stratum's
patients in a seeded order, dealt to the folds in turn, starting where the previous
stratum stopped, so the folds' sizes differ by at most one patient). They depend only on
the patients' records (their salt-free content orders them: a rebuild of the data with
another salt makes the same folds), their labels and sites, ``k`` and ``seed``.

A fold's data folder is an ordinary data_prep folder: ``train`` (the other folds'
records), ``val`` (this fold's records, which choose its checkpoint) and the held-out
splits of the source folder, unchanged (hard links where the file system allows). Its
records are the source's, with only their ``split`` field rewritten; its manifest is the
source's with the counts, the files and a ``folds`` entry made for the fold.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import time

import numpy as np

from covid_keras.core import files, schema

MANIFEST = schema.MANIFEST
#: folds.json's ``order``: how each stratum's patients were ordered before the seeded
#: permutation (the digest of their records' salt-free content). Documents without it
#: (before stop 45) ordered them by their salted keys: other folds for the same seed, so a
#: --folds run of one is not another's --classifier_dir stage.
ORDER = "content"
#: A fold folder's temporary copy untouched this long was left by a killed writer (a copy
#: takes seconds to minutes): removed when the fold is written again.
STALE_COPY_S = 3600

log = logging.getLogger("covid_keras.train")


def _records(data_dir: str, split: str):
    """(serialized record, parsed tf.train.Example) of every record of a split, in order."""
    import tensorflow as tf

    from covid_keras.io import data

    for raw in tf.data.TFRecordDataset(data.shard_files(data_dir, split), "GZIP"):
        blob = raw.numpy()
        yield blob, tf.train.Example.FromString(blob)


def _text(example, key: str) -> str:
    return example.features.feature[key].bytes_list.value[0].decode()


def patient_table(data_dir: str, splits: list[str]) -> dict[str, tuple[str, str]]:
    """patient key -> (label, site) over the records of ``splits``. A patient with two
    labels or sites is an error (data_prep writes one per patient)."""
    return patients_and_order(data_dir, splits)[0]


def patients_and_order(data_dir: str, splits: list[str]
                       ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """:func:`patient_table`, and patient key -> the digest of its records' salt-free
    content (:func:`schema.content_digest`, sorted): :func:`assign_folds`'s order, the same
    for the same patient in every build of the same data, whatever the folder's salt."""
    out: dict[str, tuple[str, str]] = {}
    contents: dict[str, list[str]] = {}
    for split in splits:
        for _, ex in _records(data_dir, split):
            key = _text(ex, schema.PATIENT_KEY)
            value = (_text(ex, schema.LABEL_NAME), _text(ex, schema.SITE))
            if out.setdefault(key, value) != value:
                raise ValueError(f"{data_dir}: a patient has records with two labels or "
                                 f"sites ({out[key]} and {value}): cannot stratify folds")
            contents.setdefault(key, []).append(schema.content_digest(schema.values_of(ex)))
    return out, {k: schema.digest_of(sorted(v)) for k, v in contents.items()}


def assign_folds(patients: dict[str, tuple[str, str]], k: int, seed: int,
                 order: dict[str, str] | None = None) -> dict[str, int]:
    """patient key -> fold in [0, k): stratified by (label, site), seeded, deterministic.
    Each stratum's patients are permuted in ``order`` (key -> sort key, e.g.
    :func:`patients_and_order`'s content digests; the key itself where none is given)."""
    if k < 2:
        raise ValueError(f"--folds must be at least 2. Received: {k}")
    if len(patients) < k:
        raise ValueError(f"{len(patients)} training patients cannot make {k} folds")
    order = order or {}
    strata: dict[tuple[str, str], list[str]] = {}
    for key in sorted(patients, key=lambda p: (order.get(p, p), p)):
        strata.setdefault(patients[key], []).append(key)
    out, start = {}, 0
    for stratum in sorted(strata):
        keys = strata[stratum]
        digest = hashlib.sha256("|".join(stratum).encode()).hexdigest()[:8]
        rng = np.random.default_rng([int(seed), int(k), int(digest, 16)])
        for i, j in enumerate(rng.permutation(len(keys))):
            out[keys[int(j)]] = (start + i) % k
        start = (start + len(keys)) % k
    return out


def folds_document(assignment: dict[str, int], k: int, seed: int, data_dir: str,
                   splits: list[str]) -> dict:
    """folds.json's content: the folds as lists of patient keys (pseudonymous salted hashes,
    as in the records), and what they were made from (a local data folder by its real path:
    the same folder reached through a link makes the same folds)."""
    return {"folds": int(k), "seed": int(seed), "splits": list(splits), "order": ORDER,
            "data_dir": data_dir if files.is_remote(data_dir) else os.path.realpath(data_dir),
            "dataset_manifest_sha256": files.sha256(os.path.join(data_dir, MANIFEST)),
            "patients": {str(f): sorted(p for p, g in assignment.items() if g == f)
                         for f in range(k)}}


def assignment_of(document: dict) -> dict[str, int]:
    """folds.json's patient lists back to key -> fold."""
    return {p: int(f) for f, keys in document["patients"].items() for p in keys}


def _count(counts: dict, ex, study_seen: set, patient_seen: set) -> None:
    label, site = _text(ex, schema.LABEL_NAME), _text(ex, schema.SITE)
    cell = counts.setdefault(label, {}).setdefault(site, {"patients": 0, "slices": 0,
                                                          "studies": 0})
    cell["slices"] += 1
    patient, study = _text(ex, schema.PATIENT_KEY), _text(ex, schema.STUDY_KEY)
    if patient not in patient_seen:
        patient_seen.add(patient)
        cell["patients"] += 1
    if study not in study_seen:
        study_seen.add(study)
        cell["studies"] += 1


def _with_split(ex, split: str) -> bytes:
    import tensorflow as tf

    out = tf.train.Example()
    out.CopyFrom(ex)
    feature = out.features.feature[schema.SPLIT].bytes_list
    del feature.value[:]
    feature.value.append(split.encode())
    # features are a map, serialized in an order of the process's own unless deterministic:
    # the same fold written by two processes is then the same bytes
    return out.SerializeToString(deterministic=True)


def _link_or_copy(src: str, dst: str) -> None:
    if not files.is_remote(src) and not files.is_remote(dst):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    import tensorflow as tf

    tf.io.gfile.copy(src, dst, overwrite=True)


def fold_data_ready(out_dir: str, document: dict, fold: int) -> bool:
    """Whether ``out_dir`` holds fold ``fold``'s data made from these folds (a resume
    reuses it; anything else is rebuilt)."""
    path = os.path.join(out_dir, MANIFEST)
    if not files.exists(path):
        return False
    try:
        made = json.loads(files.read_text(path)).get("folds", {})
    except json.JSONDecodeError:
        return False
    return made.get("fold") == fold and made.get("folds_sha256") == document_sha(document)


def same_fold_data(trained_dir: str, trained_sha: str | None, data_dir: str) -> bool:
    """Whether the fold data folder ``data_dir`` holds the records that a run trained on in
    the fold data folder ``trained_dir`` (whose manifest's sha256 it recorded as
    ``trained_sha``), though the two manifests differ: both made for the same fold of the
    same folds of the same source (their ``folds`` entries equal), so the same records in
    the same order; only their bytes may differ (written before folds were serialized
    deterministically). Another run's --folds stage (``--classifier_dir``) is then reused."""
    if not trained_dir:
        return False
    try:
        trained = files.read_bytes(os.path.join(trained_dir, MANIFEST))
        if hashlib.sha256(trained).hexdigest() != trained_sha:
            return False
        theirs = json.loads(trained).get("folds")
        return bool(theirs) and theirs == json.loads(
            files.read_text(os.path.join(data_dir, MANIFEST))).get("folds")
    except (OSError, ValueError):
        return False


def document_sha(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def write_fold_data(data_dir: str, document: dict, fold: int, out_dir: str,
                    val_split: str = "val") -> str:
    """Writes fold ``fold``'s data folder (see the module docstring) into ``out_dir``
    atomically (a temporary folder renamed into place). Returns ``out_dir``."""
    import tensorflow as tf

    from covid_keras.io import data

    if fold_data_ready(out_dir, document, fold):
        return out_dir
    assignment = assignment_of(document)
    manifest = data.read_manifest(data_dir)
    remove_stale_copies(out_dir)
    tmp = out_dir.rstrip("/") + f".{files.unique_suffix()}"
    files.rmtree(tmp)
    files.makedirs(tmp)
    counts: dict = {"train": {}, "val": {}}
    seen = {s: (set(), set()) for s in counts}
    names = {s: f"{s}-00000-of-00001.tfrecord.gz" for s in counts}
    records = {s: 0 for s in counts}
    writers = {s: tf.io.TFRecordWriter(os.path.join(tmp, names[s]), "GZIP") for s in counts}
    try:
        for split in document["splits"]:
            for _, ex in _records(data_dir, split):
                key = _text(ex, schema.PATIENT_KEY)
                if key not in assignment:
                    raise ValueError(f"{data_dir}:{split} has a patient that folds.json does "
                                     "not list: the data folder changed since the folds "
                                     "were made (start again with --overwrite)")
                to = "val" if assignment[key] == fold else "train"
                writers[to].write(_with_split(ex, to))
                records[to] += 1
                _count(counts[to], ex, *seen[to])
    finally:
        for w in writers.values():
            w.close()
    out = copy.deepcopy(manifest)
    held_out = [s for s in manifest.get("counts", {})
                if s not in document["splits"] and s not in ("train", "val", val_split)]
    out["counts"] = {**{s: manifest["counts"][s] for s in held_out}, **counts}
    kept = {n: v for n, v in manifest.get("files", {}).items() if v.get("split") in held_out}
    for name in kept:
        _link_or_copy(os.path.join(data_dir, name), os.path.join(tmp, name))
    for split, name in names.items():
        path = os.path.join(tmp, name)
        kept[name] = {"bytes": os.path.getsize(path) if not files.is_remote(path) else None,
                      "records": records[split], "sha256": files.sha256(path),
                      "split": split, "studies": len(seen[split][0])}
    out["files"] = kept
    out["empty_splits"] = {s: "no patients in this fold" for s in counts if not records[s]}
    out.pop("content_sha256", None)  # the source's build, not this folder's records
    out["dataset"] = f"{manifest.get('dataset', 'data')}/fold_{fold}"
    out["folds"] = {"fold": int(fold), "folds": int(document["folds"]),
                    "seed": int(document["seed"]), "source": document["data_dir"],
                    "source_manifest_sha256": document["dataset_manifest_sha256"],
                    "folds_sha256": document_sha(document)}
    files.write_json(os.path.join(tmp, MANIFEST), out)
    _put_in_place(tmp, out_dir, document, fold)
    return out_dir


def remove_stale_copies(out_dir: str) -> None:
    """Removes the temporary copies of ``out_dir`` (``<out_dir>.tmp-*``) that no writer has
    touched for :data:`STALE_COPY_S` (a killed writer's; a live one, perhaps another
    machine's, writes into its copy all along). Local folders only."""
    if files.is_remote(out_dir):
        return
    now = time.time()
    for tmp in glob.glob(glob.escape(out_dir.rstrip("/")) + ".tmp-*"):
        try:
            newest = max([os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(tmp)
                          for f in fs] + [os.path.getmtime(tmp)])
        except OSError:  # its writer renamed or removed it meanwhile
            continue
        if now - newest > STALE_COPY_S:
            files.rmtree(tmp)
            log.info("removed %s: a copy left by a writer killed %.0f min ago", tmp,
                     (now - newest) / 60)


def _put_in_place(tmp: str, out_dir: str, document: dict, fold: int) -> None:
    """Renames the finished folder ``tmp`` to ``out_dir``. Several workers of one fold
    (--strategy=multi_worker) write the same folder at once: the first rename wins, and a
    ready folder in place is kept (another worker may be reading it). A stale ``out_dir``
    (made from other folds) is first moved aside by an atomic rename to a name of this
    worker's own and deleted there only if it is still stale: a ready folder another
    worker renamed into place since the check goes back instead of this worker's copy."""
    if fold_data_ready(out_dir, document, fold):
        files.rmtree(tmp)
        return
    if files.exists(out_dir):  # stale: made from other folds
        aside = out_dir.rstrip("/") + f".{files.unique_suffix()}"
        try:
            files.rename(out_dir, aside)
        except OSError:  # gone meanwhile (another worker moved it aside)
            aside = None
        if aside is not None:
            if fold_data_ready(aside, document, fold):
                # another worker's ready folder, renamed into place since the check: it
                # goes back instead of this worker's copy
                tmp, aside = aside, tmp
            files.rmtree(aside)
    files.makedirs(os.path.dirname(out_dir.rstrip("/")) or ".")
    try:
        files.rename(tmp, out_dir)
    except OSError:  # another worker's folder came first: kept if it is ready
        if not fold_data_ready(out_dir, document, fold):
            raise
        files.rmtree(tmp)
