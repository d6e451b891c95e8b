"""The Apache Beam runner: the local runner's per-study work as a Beam pipeline.

    python -m data_prep.build_tfrecords --runner=beam --input=... --output_dir=... \\
        [--beam_runner=DirectRunner] [--direct_num_workers=2 \\
         --direct_running_mode=multi_processing]

Needs the ``[beam]`` extra (``pip install -e .[beam]``). Unknown command-line arguments are
Beam pipeline options; ``--beam_runner=X`` is Beam's ``--runner=X`` (``--runner`` itself is
this project's local / beam switch). Without options, Beam's DirectRunner runs in-process.

The pipeline runs the same picklable per-study functions as :mod:`data_prep.pipeline`::

    Create((index, task)) -> Map(scan_study) --> slim metadata -> ToList -> Map(plan)
                                  |                                           | (side input)
                                  +-> Reshuffle -> Map(process_study, spooled) <+
                                                        -> ToList -> Map(write summary)

The plan step is the local runner's global view, done once over every study's header
metadata: duplicate studies, unknown labels, the patient table (``merge_patient``) and the
patient-level split (``assign_splits``). Each processed study is spooled to
``<output_dir>/.partial/`` exactly as the local runner spools it (same file names, so a run
of either runner resumes the other's spool), and a small summary (per-study results without
their records, issues, the plan) is written there at the end. The driver then writes the
shards, manifest.json and failures.csv with :func:`data_prep.pipeline._write_outputs`, so the
outputs are byte-identical to the local runner's for the same input and flags (manifest.json
differs only by the recorded ``runner`` flag).

On a distributed runner (Dataflow, Flink, Spark), ``--output_dir`` (hence the spool) must be a
shared POSIX filesystem that the workers and the driver all mount at the same path (NFS,
Filestore, a GCS FUSE mount): the spool is written with plain ``open`` / ``os.replace``. The
driver-side shard write reads every spooled study once on one machine; for very large data it
is the step to replace with ``beam.io.WriteToTFRecord`` (GZIP, ``shard_name_template=
'-SSSSS-of-NNNNN'``, ``file_name_suffix='.tfrecord.gz'``), at the price of byte-identical
shards. The salt (in ``cfg.scan``) travels inside the pipeline's serialized functions: keep
the job's staging location as private as the salt file.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field

from data_prep import pipeline
from data_prep.errors import Issue, StudyError
from data_prep.split import PatientInfo, assign_splits, check_disjoint, merge_patient
from data_prep.study import StudyResult, StudyScan, StudyTask, scan_study

log = logging.getLogger("data_prep")

SUMMARY_PREFIX = "beam-summary-"


@dataclass(frozen=True)
class _Meta:
    """What the plan needs of one scanned study (small: the plan step sees all of them)."""

    index: int
    study_id: str
    label: str
    site: str
    manifest_split: str
    patient_key: str
    study_key: str
    series_key: str
    failed: bool


@dataclass
class _Plan:
    """The run's global view, computed once from every study's metadata."""

    classes: list[str] = field(default_factory=list)
    patients: dict[str, PatientInfo] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    jobs: dict[int, tuple[str, int]] = field(default_factory=dict)  # index -> split, label
    duplicate: dict[int, Issue] = field(default_factory=dict)
    label_unknown: dict[int, Issue] = field(default_factory=dict)
    fatal: tuple[str, str, str] | None = None  # a run-level StudyError: reason, detail, file


@dataclass
class _Outcome:
    index: int
    scan_issues: list[Issue]
    scan_error: Issue | None
    result: StudyResult | None  # None: not processed (failed scan, duplicate, unknown label)
    spool_file: str = ""


# ---------------------------------------------------------------- pipeline steps
def _scan(item: tuple[int, StudyTask], cfg: pipeline.RunConfig) -> tuple[int, StudyScan]:
    index, task = item
    return index, scan_study(task, cfg.scan)


def _meta(item: tuple[int, StudyScan]) -> _Meta:
    index, scan = item
    t = scan.task
    return _Meta(index, t.study_id, t.label, t.site, t.split, scan.patient_key, scan.study_key,
                 scan.series_key, scan.error is not None)


def make_plan(metas: list[_Meta], cfg: pipeline.RunConfig) -> _Plan:
    """Steps 1-2 of :func:`data_prep.pipeline.run`, over the metadata, in input order."""
    plan = _Plan()
    good: list[_Meta] = []
    seen_studies: dict[tuple[str, str], str] = {}
    for m in sorted(metas, key=lambda m: m.index):
        if m.failed:
            continue
        dup_key = (m.study_key, m.series_key)
        if dup_key in seen_studies:
            plan.duplicate[m.index] = Issue(m.study_id, "", "duplicate_study",
                                            f"same study and series as {seen_studies[dup_key]}",
                                            "error")
            continue
        seen_studies[dup_key] = m.study_id
        good.append(m)
    plan.classes = list(cfg.classes) or sorted({m.label for m in good})
    class_index = {c: i for i, c in enumerate(plan.classes)}
    usable: list[_Meta] = []
    try:
        for m in good:
            if m.label not in class_index:
                plan.label_unknown[m.index] = Issue(
                    m.study_id, "", "label_unknown",
                    f"label {m.label!r} not in --classes {plan.classes}", "error")
                continue
            merge_patient(plan.patients, m.patient_key,
                          PatientInfo(m.label, m.site, m.manifest_split), m.study_id)
            usable.append(m)
        plan.splits = assign_splits(plan.patients, scheme=cfg.split_scheme,
                                    fractions=cfg.split_fractions, seed=cfg.seed,
                                    repeat=cfg.repeat)
    except StudyError as err:  # raised again by the driver, as the local runner raises it
        plan.fatal = (err.reason, err.detail, err.file)
        return plan
    plan.jobs = {m.index: (plan.splits[m.patient_key], class_index[m.label]) for m in usable}
    return plan


def _process(item: tuple[int, StudyScan], plan: _Plan, cfg: pipeline.RunConfig, spool: str,
             cfg_hash: str) -> _Outcome:
    index, scan = item
    job = None if plan.fatal else plan.jobs.get(index)
    if job is None:
        return _Outcome(index, scan.issues, scan.error, None)
    split, label_index = job
    spool_file = pipeline._spool_path(spool, scan.task, split, cfg_hash)
    result = pipeline._process_to_spool(scan, split, label_index, cfg.scan, cfg.prep, cfg.seed,
                                        spool_file)
    return _Outcome(index, scan.issues, scan.error, result, spool_file)


def _write_summary(outcomes: list[_Outcome], plan: _Plan, path: str) -> None:
    pipeline.atomic_write_bytes(path, pickle.dumps((outcomes, plan), protocol=4))


def _process_fn():
    """A DoFn (made lazily: apache_beam is optional) running :func:`_process`, one OpenCV
    thread per worker as the local runner's pool has."""
    import apache_beam as beam

    class ProcessStudy(beam.DoFn):
        def setup(self):
            pipeline._init_worker()

        def process(self, item, plan, cfg, spool, cfg_hash):
            yield _process(item, plan, cfg, spool, cfg_hash)

    return ProcessStudy()


# ---------------------------------------------------------------- options
def pipeline_options(beam_argv: list[str]):
    """Beam's PipelineOptions from the command line's leftovers (--beam_runner -> --runner)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = []
    for arg in beam_argv:
        if not arg.startswith("-"):
            raise ValueError(f"Unexpected argument {arg!r}: only --flags pass through to Beam.")
        if arg == "--beam_runner":
            arg = "--runner"
        elif arg.startswith("--beam_runner="):
            arg = "--runner=" + arg.split("=", 1)[1]
        args.append(arg)
    return PipelineOptions(args)


# ---------------------------------------------------------------- the run
def build(p, tasks: list[StudyTask], cfg: pipeline.RunConfig, spool: str, summary_path: str):
    """Adds the pipeline to ``p`` (a ``beam.Pipeline``)."""
    import apache_beam as beam

    cfg_hash = pipeline._config_hash(cfg)
    scans = (p
             | "Tasks" >> beam.Create(list(enumerate(tasks)))
             | "Scan" >> beam.Map(_scan, cfg))
    plan = (scans
            | "Metadata" >> beam.Map(_meta)
            | "AllMetadata" >> beam.combiners.ToList()
            | "Plan" >> beam.Map(make_plan, cfg))
    plan_side = beam.pvalue.AsSingleton(plan)
    return (scans
            | "Spread" >> beam.Reshuffle()
            | "Process" >> beam.ParDo(_process_fn(), plan_side, cfg, spool, cfg_hash)
            | "AllOutcomes" >> beam.combiners.ToList()
            | "Summary" >> beam.Map(_write_summary, plan_side, summary_path))


def run(tasks: list[StudyTask], cfg: pipeline.RunConfig, resolved_flags: dict,
        beam_argv: list[str]) -> pipeline.RunSummary:
    import apache_beam as beam

    options = pipeline_options(beam_argv)
    os.makedirs(cfg.output_dir, exist_ok=True)
    spool = os.path.join(cfg.output_dir, pipeline.SPOOL)
    os.makedirs(spool, exist_ok=True)
    summary_path = os.path.join(spool, f"{SUMMARY_PREFIX}{uuid.uuid4().hex}.pkl")
    log.info("Beam pipeline: %d studies, options %s", len(tasks),
             options.get_all_options(drop_default=True))
    with beam.Pipeline(options=options) as p:
        build(p, tasks, cfg, spool, summary_path)
    with open(summary_path, "rb") as f:
        outcomes, plan = pickle.load(f)
    os.remove(summary_path)
    if plan.fatal is not None:
        raise StudyError(*plan.fatal)

    # The local runner's order: scans (issues, error or duplicate), unknown labels, results.
    outcomes = sorted(outcomes, key=lambda o: o.index)
    issues: list[Issue] = []
    for o in outcomes:
        issues.extend(o.scan_issues)
        if o.scan_error is not None:
            issues.append(o.scan_error)
        elif o.index in plan.duplicate:
            issues.append(plan.duplicate[o.index])
    issues.extend(plan.label_unknown[i] for i in sorted(plan.label_unknown))
    results: list[tuple[StudyResult, str]] = []
    slice_stats: Counter = Counter()  # over every processed study, failed ones included
    for o in outcomes:
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

    manifest = pipeline._write_outputs(results, cfg, plan.classes, plan.patients, plan.splits,
                                       resolved_flags, len(tasks), issues, slice_stats)
    shutil.rmtree(spool, ignore_errors=True)
    return pipeline.RunSummary(manifest, issues, sum(len(r.records) for r, _ in results))
