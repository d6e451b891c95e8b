"""The local runner: scan -> split -> process (parallel, resumable) -> shards + manifest.

Work is spooled per study under ``<output_dir>/.partial/`` (one pickle per processed study,
written atomically), so a killed run resumes where it stopped; shards are written at the
end from the spool, in a fixed order, so the same input always gives the same bytes
whatever the number of workers. The spool is removed after a successful run.

Resume trusts only what it can: a spool file's name is a hash of everything that changes the
study's records (the configuration, the class order and label, the split, the manifest's
patient id and site, and the identity of every file of the study: relative path, size,
modification time, inode), so a changed input or flag reprocesses the study. The outputs
are written into a staging folder beside ``output_dir`` and swapped in whole (an atomic
exchange where the OS has it), so a reader never sees new shards under an old
``manifest.json``. A lock beside ``output_dir`` keeps two runs apart; the next run removes
what a killed one left (staging folders, ``*.tmp-*`` files).

An ``output_dir`` on another file system (``gs://``, ``s3://``, ``ram://``: anything
``tf.io.gfile`` knows) is built in a local working folder (the spool, hence resume, stay
local) and copied over when finished: shards first, stale shards removed, ``manifest.json``
last.

Excluded labels (a class left out of a binary task) are counted apart in
``manifest.json``'s ``studies.excluded``, never scanned and never failures. A split that ends
up empty (too few patients for its fraction, or all its studies failed) is a warning in the
log and in ``manifest.json`` (``empty_splits``: split -> why; ``warnings``).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from covid_keras.core import files as fs
from covid_keras.core import provenance, schema
from data_prep import redact, storage, workers
from data_prep.errors import Issue, StudyError
from data_prep.preprocess import PrepConfig
from data_prep.progress import Progress
from data_prep.settings import MANIFEST_KEY as SETTINGS_KEY
from data_prep.settings import PrepSettings
from data_prep.split import PatientInfo, assign_splits, check_disjoint, merge_patient
from data_prep.split import repeated_splits as all_repeats
from data_prep.study import (
    ScanConfig,
    StudyResult,
    StudyScan,
    StudyTask,
    process_study,
    scan_study,
)

log = logging.getLogger("data_prep")

MANIFEST = schema.MANIFEST
FAILURES = "failures.csv"
SPOOL = ".partial"
SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord\.gz$")
MANIFEST_VERSION = 1
# Bump when a code change alters records: the spool of an older version is then not reused.
SPOOL_VERSION = 5
# a killed writer's temporary file: <name>.tmp-<pid> (here) or <name>.tmp-<pid>-<hex>
# (covid_keras.core.files.unique_suffix: manifest.json and the other JSON files)
TMP_RE = re.compile(r"\.tmp-\d+(-[0-9a-f]+)?$")
OURS_RE = re.compile(r"^((train|val|test)-\d{5}-of-\d{5}\.tfrecord\.gz|manifest\.json|"
                     r"failures\.csv|\.partial)$|\.tmp-\d+(-[0-9a-f]+)?$")


@dataclass(frozen=True)
class RunConfig:
    output_dir: str
    scan: ScanConfig
    prep: PrepConfig
    classes: tuple[str, ...] = ()  # empty: sorted labels found
    split_scheme: str = "paper"
    split_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    repeat: int = 0
    val_from_train: float = 0.0
    seed: int = 0
    workers: int = 1
    shard_size_mb: float = 128.0
    dataset: str = ""
    # labels left out on purpose (not in ``classes``): counted apart, never failures
    exclude_labels: tuple[str, ...] = ()


@dataclass
class RunSummary:
    manifest: dict
    issues: list[Issue]
    written_records: int

    @property
    def failed_studies(self) -> int:
        return sum(1 for i in self.issues if i.level == "error")


# ---------------------------------------------------------------- parallel helpers
def _init_worker() -> None:
    workers.init_worker()


def parallel_map(fn: Callable, arg_list: list[tuple], n_workers: int, desc: str,
                 on_lost: Callable[[tuple, str, str], Any], hard_timeout_s: float = 0.0,
                 memory_limit_mb: float = 0.0) -> Iterator:
    """fn(*args) for each args, in order, over ``n_workers`` spawned processes (0/1: inline),
    with a progress bar (log lines when not on a terminal). A task whose worker dies or runs past
    ``hard_timeout_s`` becomes ``on_lost(args, "crashed" | "timeout", detail)``
    (:mod:`data_prep.workers`); the others go on."""
    bar = Progress(len(arg_list), desc, "study")
    try:
        if n_workers <= 1 or len(arg_list) <= 1:
            outputs: Iterable = (fn(*args) for args in arg_list)
        else:
            outputs = workers.run_tasks(fn, arg_list, n_workers, on_lost, hard_timeout_s,
                                        memory_limit_mb)
        for out in outputs:
            yield out
            bar.update()
    finally:
        bar.close()


def hard_timeout(cfg: RunConfig) -> float:
    """Seconds after which a worker still busy with one study is killed (0: never): well past
    the study's own limit, which normally ends it first."""
    soft = cfg.scan.limits.study_timeout_s
    return soft * 1.5 + 30.0 if soft > 0 else 0.0


def _lost_reason(why: str) -> str:
    return "study_timeout" if why == "timeout" else "worker_crashed"


def _lost_scan(args: tuple, why: str, detail: str) -> StudyScan:
    task, scan_cfg = args
    scan = StudyScan(task=task, name=redact.study_name(task.origin or "study", task.study_id,
                                                        scan_cfg.salt))
    scan.error = Issue(scan.name, "", _lost_reason(why), f"reading headers: {detail}",
                       "error")
    return scan


def _lost_job(args: tuple, why: str, detail: str) -> Outcome:
    index, scan, job, _cfg, _spool, _cfg_hash = args
    result = StudyResult(scan.study_key, scan.patient_key, scan.task.label, scan.task.site,
                         job[0], sampled=len(scan.sampled))
    result.error = Issue(scan.name, "", _lost_reason(why), f"decoding: {detail}", "error")
    return Outcome(index, scan.issues, scan.error, result)


# ---------------------------------------------------------------- spool
def _config_hash(cfg: RunConfig) -> str:
    parts = repr((SPOOL_VERSION, cfg.scan, cfg.prep, cfg.seed, cfg.classes)).encode()
    return hashlib.sha256(parts).hexdigest()[:16]


def spool_key(scan: StudyScan, split: str, label_index: int, cfg_hash: str) -> str:
    """A hash of everything that changes this study's records."""
    t = scan.task
    parts = (cfg_hash, t.study_id, t.path, t.label, t.site, t.patient_id, split, label_index,
             scan.fingerprint, scan.patient_key, scan.study_key, scan.series_key,
             scan.slice_count, [(s.path, s.index, s.sop_key) for s in scan.sampled])
    return hashlib.sha256(redact.to_bytes(repr(parts))).hexdigest()


def _spool_path(spool: str, key: str) -> str:
    return storage.join(spool, key[:32] + ".pkl")


def _process_to_spool(scan: StudyScan, split: str, label_index: int, scan_cfg: ScanConfig,
                      prep: PrepConfig, seed: int, spool_file: str, key: str) -> StudyResult:
    """Worker: process one study, spool its records, return the result without them."""
    if storage.exists(spool_file):
        try:
            result = pickle.loads(storage.read_bytes(spool_file))
            if result.spool_key != key:
                raise ValueError("spool key mismatch")
            result.records = [None] * len(result.records)  # placeholders: counts only
            return result
        except Exception:  # noqa: BLE001 - a damaged or foreign spool file is redone
            storage.remove(spool_file)
    result = process_study(scan, split, label_index, scan_cfg, prep, seed)
    result.spool_key = key
    if result.error is None:
        for r in result.records:
            schema.validate(r)
        result.content_digests = [schema.content_digest(r) for r in sorted(
            result.records, key=lambda r: r[schema.SLICE_INDEX])]
        storage.write_bytes(spool_file, pickle.dumps(result, protocol=4))
    result.records = [None] * len(result.records)
    return result


def _load_spooled(spool_file: str) -> list[dict]:
    return pickle.loads(storage.read_bytes(spool_file)).records


# ---------------------------------------------------------------- shards
def plan_shards(sizes: dict[str, int], shard_size_mb: float,
                order: dict[str, str] | None = None) -> list[list[str]]:
    """Balanced assignment of items (by byte size) to ceil(total / shard size) shards:
    largest first, each to the lightest shard (ties: lowest index). Deterministic. Equal
    sizes and each shard's items go by ``order`` (item -> sort key; the item itself where
    none is given), then by the item."""
    order = order or {}

    def rank(k: str) -> tuple[str, str]:
        return order.get(k, k), k

    total = sum(sizes.values())
    n = max(1, min(len(sizes), math.ceil(total / (shard_size_mb * 1024 * 1024))))
    loads = [0] * n
    shards: list[list[str]] = [[] for _ in range(n)]
    for key in sorted(sizes, key=lambda k: (-sizes[k], rank(k))):
        i = min(range(n), key=lambda j: (loads[j], j))
        shards[i].append(key)
        loads[i] += sizes[key]
    return [sorted(s, key=rank) for s in shards]


def write_tfrecord_gz(path: str, serialized: Iterable[bytes]) -> int:
    """Writes a GZIP TFRecord atomically (temp file + rename). Returns the record count."""
    import tensorflow as tf

    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    # A kill during the write leaves the temp file: clean_stale removes it on the next run.
    with tf.io.TFRecordWriter(tmp, options=tf.io.TFRecordOptions(compression_type="GZIP")) as w:
        for s in serialized:
            w.write(s)
            n += 1
    os.replace(tmp, path)
    return n


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class StudyMeta:
    """What the plan needs of one scanned study (small: the plan sees all of them)."""

    index: int
    name: str  # the study's pseudonymous name
    label: str
    site: str
    manifest_split: str
    patient_key: str
    study_key: str
    series_key: str
    failed: bool
    split_key: str = ""  # in memory only (study.split_order_key)

    @classmethod
    def of(cls, index: int, scan: StudyScan) -> "StudyMeta":
        t = scan.task
        return cls(index, scan.name, t.label, t.site, t.split, scan.patient_key,
                   scan.study_key, scan.series_key, scan.error is not None, scan.split_key)


@dataclass
class Plan:
    """The run's global view, computed once from every study's header metadata."""

    classes: list[str] = field(default_factory=list)
    patients: dict[str, PatientInfo] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    jobs: dict[int, tuple[str, int]] = field(default_factory=dict)  # index -> split, label
    rejected: dict[int, Issue] = field(default_factory=dict)  # duplicate / unknown label
    fatal: tuple[str, str, str] | None = None  # a run-level StudyError: reason, detail, file


def make_plan(metas: list[StudyMeta], cfg: RunConfig) -> Plan:
    """Duplicates, unknown labels, the patient table and the patient-level split. A patient
    given two manifest splits fails that patient's studies only."""
    plan = Plan()
    good: list[StudyMeta] = []
    seen_studies: dict[tuple[str, str], str] = {}
    for m in sorted(metas, key=lambda m: m.index):
        if m.failed:
            continue
        dup_key = (m.study_key, m.series_key)
        if dup_key in seen_studies:
            plan.rejected[m.index] = Issue(m.name, "", "duplicate_study",
                                           f"same study and series as {seen_studies[dup_key]}",
                                           "error")
            continue
        seen_studies[dup_key] = m.name
        good.append(m)
    plan.classes = list(cfg.classes) or sorted({m.label for m in good})
    class_index = {c: i for i, c in enumerate(plan.classes)}
    usable: list[StudyMeta] = []
    for m in good:
        if m.label not in class_index:
            plan.rejected[m.index] = Issue(
                m.name, "", "label_unknown",
                f"the row's label is not one of the {len(plan.classes)} --classes", "error")
            continue
        usable.append(m)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for m in usable:
        if m.manifest_split:
            splits_of[m.patient_key].add(m.manifest_split)
    conflicted = {k for k, v in splits_of.items() if len(v) > 1}
    kept: list[StudyMeta] = []
    for m in usable:
        if m.patient_key in conflicted:
            names = sorted(x.name for x in usable if x.patient_key == m.patient_key)
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                            else "")
            plan.rejected[m.index] = Issue(
                m.name, "", "patient_split_conflict",
                f"patient {m.patient_key} is given splits {sorted(splits_of[m.patient_key])} "
                f"by studies {shown}; none of them is written", "error")
            continue
        merge_patient(plan.patients, m.patient_key,
                      PatientInfo(m.label, m.site, m.manifest_split, m.split_key), m.name)
        kept.append(m)
    try:
        plan.splits = assign_splits(plan.patients, scheme=cfg.split_scheme,
                                    fractions=cfg.split_fractions, seed=cfg.seed,
                                    repeat=cfg.repeat, val_from_train=cfg.val_from_train)
    except StudyError as err:  # the driver raises it again: the run fails loudly
        plan.fatal = (err.reason, err.detail, err.file)
        return plan
    plan.jobs = {m.index: (plan.splits[m.patient_key], class_index[m.label]) for m in kept}
    return plan


@dataclass
class Outcome:
    """One study after the run: its scan's issues and, if it was processed, its result."""

    index: int
    scan_issues: list[Issue]
    scan_error: Issue | None
    result: StudyResult | None  # None: not processed (failed scan, duplicate, unknown label)
    spool_file: str = ""


def process_planned(index: int, scan: StudyScan, plan: Plan, cfg: RunConfig, spool: str,
                    cfg_hash: str) -> Outcome:
    """Worker (local pool or Beam DoFn): process one scanned study as the plan says."""
    job = None if plan.fatal else plan.jobs.get(index)
    return process_job(index, scan, job, cfg, spool, cfg_hash)


def process_job(index: int, scan: StudyScan, job: tuple[str, int] | None, cfg: RunConfig,
                spool: str, cfg_hash: str) -> Outcome:
    """One study's (split, label index) job; ``None``: the plan does not process it."""
    if job is None:
        return Outcome(index, scan.issues, scan.error, None)
    split, label_index = job
    key = spool_key(scan, split, label_index, cfg_hash)
    spool_file = _spool_path(spool, key)
    result = _process_to_spool(scan, split, label_index, cfg.scan, cfg.prep, cfg.seed,
                               spool_file, key)
    return Outcome(index, scan.issues, scan.error, result, spool_file)


def collect(outcomes: list[Outcome], plan: Plan
            ) -> tuple[list[Issue], list[tuple[StudyResult, str]], Counter]:
    """Issues (in input order), written studies and slice counts from every outcome."""
    if plan.fatal is not None:
        raise StudyError(*plan.fatal)
    issues: list[Issue] = []
    results: list[tuple[StudyResult, str]] = []
    slice_stats: Counter = Counter()  # over every processed study, failed ones included
    for o in sorted(outcomes, key=lambda o: o.index):
        issues.extend(o.scan_issues)
        if o.scan_error is not None:
            issues.append(o.scan_error)
        if o.index in plan.rejected:
            issues.append(plan.rejected[o.index])
        if o.result is None:
            continue
        slice_stats["sampled"] += o.result.sampled
        slice_stats.update({f"dropped/{k}": v for k, v in o.result.dropped.items()})
        issues.extend(o.result.issues)
        if o.result.error is not None:
            issues.append(o.result.error)
            continue
        results.append((o.result, o.spool_file))
    check_disjoint([(r.patient_key, r.split) for r, _ in results])
    for issue in issues:
        if issue.level == "error":
            log.warning("study %s not written: %s (%s)", issue.study, issue.reason, issue.detail)
    return issues, results, slice_stats


# ---------------------------------------------------------------- the output folder
class OutputBusyError(OSError, RuntimeError):
    """Another run holds the output folder (a user error: one line, no traceback)."""


def _staging_paths(output_dir: str) -> tuple[str, str]:
    real = os.path.realpath(output_dir)
    return os.path.dirname(real), os.path.basename(real)


@contextlib.contextmanager
def exclusive_output(output_dir: str) -> Iterator[None]:
    """Holds ``.<name>.lock`` beside the output folder for the run (a second run on the same
    folder fails at once) and removes what a killed run left: staging folders and
    ``*.tmp-*`` files."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    parent, base = _staging_paths(output_dir)
    fd = os.open(os.path.join(parent, f".{base}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(f"Another data_prep run is writing {output_dir}") from None
        clean_stale(output_dir)
        yield
    finally:
        os.close(fd)


def clean_stale(output_dir: str) -> int:
    """Removes staging folders and temp files of earlier (killed) runs. Returns the count."""
    parent, base = _staging_paths(output_dir)
    n = 0
    for entry in os.listdir(parent):
        if entry.startswith((f".{base}.staging-", f".{base}.old-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            n += 1
    for folder in (output_dir, os.path.join(output_dir, SPOOL)):
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            if TMP_RE.search(entry):
                os.remove(os.path.join(folder, entry))
                n += 1
    if n:
        log.info("Removed %d leftovers of an interrupted run.", n)
    return n


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(staging: str, output_dir: str) -> None:
    """Makes ``staging`` the output folder in one step; the old content ends up at
    ``staging`` (the caller removes it). Without an atomic exchange, two renames (the
    folder is briefly absent, never mixed)."""
    real = os.path.realpath(output_dir)
    if _renameat2_exchange(staging, real):
        return
    parent, base = _staging_paths(output_dir)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    os.rename(real, old)
    try:
        os.rename(staging, real)
    except OSError:
        os.rename(old, real)
        raise
    os.rename(old, staging)


def _move_in(staging: str, output_dir: str) -> None:
    """The fallback when the folder cannot be swapped (e.g. it is a mount point): files are
    moved in one by one, old shards removed, manifest.json last."""
    new = set(os.listdir(staging))
    for name in sorted(new - {MANIFEST}):
        if OURS_RE.search(name):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    for name in os.listdir(output_dir):
        if SHARD_RE.match(name) and name not in new:
            os.remove(os.path.join(output_dir, name))
    os.replace(os.path.join(staging, MANIFEST), os.path.join(output_dir, MANIFEST))


def _carry_over(output_dir: str, staging: str) -> None:
    """Entries of the output folder that are not ours (the salt file, a user's notes) are
    linked (or copied) into the staging folder."""
    for entry in sorted(os.listdir(output_dir)):
        if OURS_RE.search(entry):
            continue
        src, dst = os.path.join(output_dir, entry), os.path.join(staging, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def finish(outcomes: list[Outcome], plan: Plan, cfg: RunConfig, resolved_flags: dict,
           n_input: int, excluded: int = 0, spool: str | None = None) -> RunSummary:
    """Shards, manifest.json and failures.csv from the outcomes; removes the spool
    (default ``<output_dir>/.partial``)."""
    issues, results, slice_stats = collect(outcomes, plan)
    notes = run_notes(plan, cfg, results)
    manifest = _write_outputs(results, cfg, plan.classes, plan.patients, plan.splits,
                              resolved_flags, n_input, issues, slice_stats,
                              {"excluded": excluded, **notes})
    storage.rmtree(spool or os.path.join(cfg.output_dir, SPOOL))
    return RunSummary(manifest, issues, sum(len(r.records) for r, _ in results))


def expected_splits(cfg: RunConfig) -> list[str]:
    """The splits the flags ask for (a positive share)."""
    if cfg.split_scheme == "repeated_3to1":
        return ["train", "val"]
    out = [name for name, f in zip(schema.SPLITS, cfg.split_fractions) if f > 0]
    if cfg.val_from_train > 0 and "val" not in out:
        out.insert(1, "val")
    return out


def run_notes(plan: Plan, cfg: RunConfig, results: list[tuple[StudyResult, str]]) -> dict:
    """What the run should say about itself: splits that ended up empty (and why), classes
    without a written study. Logged as warnings; recorded in manifest.json. Counts and
    flag values only (never a name)."""
    empty: dict[str, str] = {}
    assigned = Counter(plan.splits.values())
    written = Counter(r.split for r, _ in results)
    by_fraction = [k for k, p in plan.patients.items() if not p.manifest_split]
    strata = {(plan.patients[k].label, plan.patients[k].site) for k in by_fraction}
    manifest_named = {p.manifest_split for p in plan.patients.values() if p.manifest_split}
    shares = "/".join(f"{100 * f / sum(cfg.split_fractions):g}" for f in cfg.split_fractions)
    for split in schema.SPLITS:
        if written[split]:
            continue
        if assigned[split]:
            empty[split] = (f"all {assigned[split]} of its patients' studies failed "
                            "(see failures.csv)")
        elif split in expected_splits(cfg) or split in manifest_named:
            if not plan.patients:
                why = "no patient at all"
            elif not by_fraction:
                why = ("no patient: every patient's split comes from the manifest, which "
                       "names none for it")
            elif cfg.split_scheme == "paper":
                why = (f"no patient: {len(by_fraction)} patients split {shares} within "
                       f"{len(strata)} label x site strata leave it none (each stratum needs "
                       "a patient per split with a share)")
            else:
                why = (f"no patient: {len(by_fraction)} patients in {len(strata)} label x "
                       "site strata leave it none")
            empty[split] = why
    warnings = [f"split {split!r} is empty: {why}" for split, why in empty.items()]
    written_classes = {r.label for r, _ in results}
    for name in plan.classes:
        if name not in written_classes:
            warnings.append(f"class {name!r} of --classes has no written study")
    for w in warnings:
        log.warning("%s", w)
    return {"empty_splits": empty, "warnings": warnings}


def select_tasks(tasks: list[StudyTask], cfg: RunConfig) -> tuple[list[StudyTask], int]:
    """The tasks to run, and how many were excluded on purpose (``cfg.exclude_labels``:
    classes left out of this task, never scanned, never failures)."""
    if not cfg.exclude_labels:
        return list(tasks), 0
    keep = [t for t in tasks if t.error is not None or t.label not in cfg.exclude_labels
            or t.label in cfg.classes]
    excluded = len(tasks) - len(keep)
    if excluded:
        log.info("%d studies excluded: their labels are not in --classes.", excluded)
    return keep, excluded


def work_dir(output_dir: str) -> str:
    """The local working folder of an output folder on another file system (stable, so a
    killed run resumes from its spool)."""
    digest = hashlib.sha256(output_dir.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "covid_keras-data_prep", digest, "out")


def publish(local_dir: str, output_dir: str) -> None:
    """Copies a finished local output folder to ``output_dir`` (any tf.io.gfile file
    system): shards and failures.csv, stale shards removed, manifest.json last."""
    import tensorflow as tf

    gfile = tf.io.gfile
    gfile.makedirs(output_dir)
    new = sorted(os.listdir(local_dir))
    names = [n for n in new if SHARD_RE.match(n)] + [FAILURES]
    with Progress(len(names) + 1, "copy", "file") as bar:
        for name in names:
            fs.copy_file(os.path.join(local_dir, name), f"{output_dir.rstrip('/')}/{name}")
            bar.update()
        for name in gfile.listdir(output_dir):
            name = name.rstrip("/")
            if SHARD_RE.match(name) and name not in new:
                gfile.remove(f"{output_dir.rstrip('/')}/{name}")
        fs.copy_file(os.path.join(local_dir, MANIFEST), f"{output_dir.rstrip('/')}/{MANIFEST}")
        bar.update()


@contextlib.contextmanager
def writing_output(cfg: RunConfig) -> Iterator[RunConfig]:
    """The config a run writes with, the output folder held exclusively. An output_dir on
    another file system is built in a local working folder (:func:`work_dir`), published
    there when the block ends without an error, then removed."""
    if not fs.is_remote(cfg.output_dir):
        with exclusive_output(cfg.output_dir):
            yield cfg
        return
    local = dataclasses.replace(cfg, output_dir=work_dir(cfg.output_dir))
    with exclusive_output(local.output_dir):
        yield local
    publish(local.output_dir, cfg.output_dir)
    shutil.rmtree(os.path.dirname(local.output_dir), ignore_errors=True)


# ---------------------------------------------------------------- the run
def run(tasks: list[StudyTask], cfg: RunConfig, resolved_flags: dict) -> RunSummary:
    """scan (headers) -> plan (split) -> process (pixels, spooled) -> shards + manifest."""
    with writing_output(cfg) as out:
        return _run(tasks, out, resolved_flags)


def _run(tasks: list[StudyTask], cfg: RunConfig, resolved_flags: dict) -> RunSummary:
    spool = os.path.join(cfg.output_dir, SPOOL)
    os.makedirs(spool, exist_ok=True)
    memory = cfg.scan.limits.worker_memory_mb
    n_input = len(tasks)
    tasks, excluded = select_tasks(tasks, cfg)
    scans = list(parallel_map(scan_study, [(t, cfg.scan) for t in tasks], cfg.workers, "scan",
                              _lost_scan, hard_timeout(cfg), memory))
    plan = make_plan([StudyMeta.of(i, s) for i, s in enumerate(scans)], cfg)
    if plan.fatal is not None:
        raise StudyError(*plan.fatal)
    cfg_hash = _config_hash(cfg)
    outcomes = [process_job(i, scan, None, cfg, spool, cfg_hash)
                for i, scan in enumerate(scans) if i not in plan.jobs]
    args = [(i, scan, plan.jobs[i], cfg, spool, cfg_hash) for i, scan in enumerate(scans)
            if i in plan.jobs]
    outcomes += parallel_map(process_job, args, cfg.workers, "preprocess", _lost_job,
                             hard_timeout(cfg), memory)
    return finish(outcomes, plan, cfg, resolved_flags, n_input, excluded)


def _write_outputs(results: list[tuple[StudyResult, str]], cfg: RunConfig, classes: list[str],
                   patients: dict[str, PatientInfo], splits: dict[str, str],
                   resolved_flags: dict, n_input: int, issues: list[Issue],
                   slice_stats: Counter, notes: dict | None = None) -> dict:
    by_split: dict[str, dict[str, tuple[StudyResult, str]]] = defaultdict(dict)
    for result, spool_file in results:
        key = f"{result.patient_key}/{result.study_key}"
        by_split[result.split][key] = (result, spool_file)
    files: dict[str, dict] = {}
    content: dict[str, str] = {}  # shard -> digest of its records' salt-free content
    parent, base = _staging_paths(cfg.output_dir)
    staging = os.path.join(parent, f".{base}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    bar = Progress(len(results), "write shards", "study")
    for split in schema.SPLITS:
        studies = by_split.get(split, {})
        if not studies:
            continue
        sizes = {k: storage.size(f) for k, (_, f) in studies.items()}
        order = {k: r.order_key for k, (r, _) in studies.items()}
        shards = plan_shards(sizes, cfg.shard_size_mb, order)
        for i, keys in enumerate(shards):
            name = f"{split}-{i:05d}-of-{len(shards):05d}.tfrecord.gz"
            path = os.path.join(staging, name)

            def records(keys: list[str] = keys) -> Iterator[bytes]:
                for k in keys:
                    recs = sorted(_load_spooled(studies[k][1]), key=lambda r: r[schema.SLICE_INDEX])
                    for r in recs:
                        yield schema.serialize(r)
                    bar.update()

            n = write_tfrecord_gz(path, records())
            files[name] = {"split": split, "records": n, "studies": len(keys),
                           "bytes": os.path.getsize(path), "sha256": fs.sha256(path)}
            content[name] = schema.digest_of(
                [d for k in keys for d in studies[k][0].content_digests])
    bar.close()
    manifest = build_manifest(results, cfg, classes, patients, splits, resolved_flags, n_input,
                              issues, files, slice_stats, notes)
    # the build without its salt: the same records in the same shards and order (a rebuild
    # with another salt trains the same; bench/accuracy.py pairs runs by it)
    manifest["content_sha256"] = schema.digest_of([f"{n} {d}" for n, d in sorted(content.items())])
    write_failures(os.path.join(staging, FAILURES), issues)
    fs.atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(
        fs.strict(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n")
    _carry_over(cfg.output_dir, staging)
    try:
        swap_in(staging, cfg.output_dir)  # readers see the old folder or the new one, whole
    except OSError as exc:
        log.warning("The output folder cannot be swapped in whole (%s: a mount point?); "
                    "updating it file by file, manifest.json last.", type(exc).__name__)
        _move_in(staging, cfg.output_dir)
    shutil.rmtree(staging, ignore_errors=True)  # the old content
    return manifest


def build_manifest(results: list[tuple[StudyResult, str]], cfg: RunConfig, classes: list[str],
                   patients: dict[str, PatientInfo], splits: dict[str, str],
                   resolved_flags: dict, n_input: int, issues: list[Issue],
                   files: dict[str, dict], slice_stats: Counter,
                   notes: dict | None = None) -> dict:
    """Counts cover written studies; ``slices`` covers every processed study (the slices
    of studies that failed for lack of lung are counted as dropped). ``notes``: the
    ``excluded`` count, ``empty_splits`` and ``warnings`` (:func:`run_notes`)."""
    notes = notes or {}
    counts: dict = {}
    kept = 0
    for result, _ in results:
        cell = counts.setdefault(result.split, {}).setdefault(result.label, {}).setdefault(
            result.site, {"studies": 0, "patients": set(), "slices": 0})
        cell["studies"] += 1
        cell["patients"].add(result.patient_key)
        cell["slices"] += len(result.records)
        kept += len(result.records)
    dropped = {k.split("/", 1)[1]: v for k, v in slice_stats.items() if k.startswith("dropped/")}
    for split in counts.values():
        for label in split.values():
            for cell in label.values():
                cell["patients"] = len(cell["patients"])
    errors = [i for i in issues if i.level == "error"]
    manifest = {
        "format_version": MANIFEST_VERSION,
        "dataset": cfg.dataset,
        "classes": classes,
        "image": {"size": cfg.prep.image_size, "channels": len(cfg.prep.windows),
                  "encoding": "png", "dtype": "uint8"},
        "windows": [{"name": n, "level_hu": lv, "width_hu": w} for n, lv, w in cfg.prep.windows],
        "schema": {f.name: f.dtype for f in schema.FIELDS},
        "split_scheme": cfg.split_scheme,
        "counts": counts,
        "studies": {"input": n_input, "written": len(results), "failed": len(errors),
                    "excluded": int(notes.get("excluded", 0)),
                    "failed_by_reason": dict(sorted(Counter(i.reason for i in errors).items()))},
        "empty_splits": dict(notes.get("empty_splits", {})),
        "warnings": list(notes.get("warnings", [])),
        "slices": {"sampled": slice_stats["sampled"], "kept": kept,
                   "dropped": dict(sorted(dropped.items()))},
        "warnings_by_reason": dict(sorted(Counter(
            i.reason for i in issues if i.level == "warning").items())),
        "files": files,
        "flags": resolved_flags,
        "preprocessing": _jsonable(dataclasses.asdict(cfg.prep)),
        # every setting the records were built with (data_prep.settings), read back by
        # export and predict
        SETTINGS_KEY: PrepSettings.from_configs(cfg.scan, cfg.prep).to_dict(),
        "versions": provenance.package_versions(),
    }
    if cfg.split_scheme == "repeated_3to1":
        manifest["repeat"] = cfg.repeat
        manifest["repeats"] = all_repeats(patients, cfg.seed)
    return manifest


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_failures(path: str, issues: list[Issue]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["study", "file", "reason", "level", "detail"])
    for i in sorted(issues, key=lambda i: (i.study, i.level, i.file, i.reason, i.detail)):
        w.writerow([redact.spreadsheet_safe(c) for c in (i.study, i.file, i.reason, i.level,
                                                         i.detail)])
    fs.atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def summary_table(manifest: dict) -> str:
    """A plain-text table: split x label -> studies / patients / slices, and the failures."""
    lines = [f"{'split':<6} {'label':<16} {'studies':>8} {'patients':>9} {'slices':>8}"]
    for split in schema.SPLITS:
        for label, sites in sorted(manifest["counts"].get(split, {}).items()):
            s = sum(c["studies"] for c in sites.values())
            p = sum(c["patients"] for c in sites.values())
            n = sum(c["slices"] for c in sites.values())
            lines.append(f"{split:<6} {label:<16} {s:>8} {p:>9} {n:>8}")
    st, sl = manifest["studies"], manifest["slices"]
    line = f"studies: {st['input']} in, {st['written']} written, {st['failed']} failed"
    if st["failed_by_reason"]:
        line += f" {st['failed_by_reason']}"
    if st.get("excluded"):
        line += f", {st['excluded']} excluded (labels not in --classes)"
    lines.append(line)
    lines.append(f"slices: {sl['sampled']} sampled, {sl['kept']} kept, dropped {sl['dropped']}")
    if manifest["warnings_by_reason"]:
        lines.append(f"warnings: {manifest['warnings_by_reason']}")
    for split, why in manifest.get("empty_splits", {}).items():
        lines.append(f"empty split {split}: {why}")
    return "\n".join(lines)


__all__ = ["RunConfig", "RunSummary", "run", "summary_table", "StudyError"]
