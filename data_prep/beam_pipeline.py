"""The Apache Beam runner: the local runner's per-study work as a Beam pipeline.

    python -m data_prep.build_tfrecords --runner=beam --input=... --output_dir=... \\
        [--beam_runner=DirectRunner] [--direct_num_workers=2 \\
         --direct_running_mode=multi_processing]

Needs the ``[beam]`` extra (``pip install -e .[beam]``). Command-line flags that are not
data_prep's and that Beam knows are Beam pipeline options (any other is refused with absl's
"did you mean"); ``--beam_runner=X`` is Beam's ``--runner=X`` (``--runner`` itself is this
project's local / beam switch). Without options, Beam's DirectRunner runs in-process. Beam's
INFO logs show only with ``--verbosity=1``.

The pipeline runs the local runner's own picklable functions (:mod:`data_prep.pipeline`:
``scan_study``, ``make_plan``, ``process_planned``, ``finish``)::

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

On a distributed runner (Dataflow, Flink, Spark), ``--output_dir`` (hence the spool) must be
where the workers and the driver all reach it: a bucket (``gs://``, ``s3://``...: the spool
goes through Beam's ``FileSystems``, :mod:`data_prep.storage`; the driver writes the outputs
in a local working folder and copies them over through ``tf.io.gfile``, manifest.json last)
or a shared POSIX file system mounted at the same path everywhere (NFS, Filestore). The
driver-side shard write reads every spooled study once on one machine; for very large data it
is the step to replace with ``beam.io.WriteToTFRecord`` (GZIP, ``shard_name_template=
'-SSSSS-of-NNNNN'``, ``file_name_suffix='.tfrecord.gz'``), at the price of byte-identical
shards. The salt (in ``cfg.scan``) travels inside the pipeline's serialized functions: keep
the job's staging location as private as the salt file.
"""

from __future__ import annotations

import logging
import pickle
import uuid

from data_prep import pipeline, storage
from data_prep.pipeline import Outcome, Plan, StudyMeta, make_plan, process_planned
from data_prep.study import StudyScan, StudyTask, scan_study

log = logging.getLogger("data_prep")

SUMMARY_PREFIX = "beam-summary-"


# ---------------------------------------------------------------- pipeline steps
def _scan(item: tuple[int, StudyTask], cfg: pipeline.RunConfig) -> tuple[int, StudyScan]:
    index, task = item
    return index, scan_study(task, cfg.scan)


def _meta(item: tuple[int, StudyScan]) -> StudyMeta:
    return StudyMeta.of(*item)


def _write_summary(outcomes: list[Outcome], plan: Plan, path: str) -> None:
    storage.write_bytes(path, pickle.dumps((outcomes, plan), protocol=4))


def _process_fn():
    """A DoFn (made lazily: apache_beam is optional) running the local runner's
    :func:`data_prep.pipeline.process_planned`, one OpenCV thread per worker as the local
    runner's pool has."""
    import apache_beam as beam

    class ProcessStudy(beam.DoFn):
        def setup(self):
            pipeline._init_worker()

        def process(self, item, plan, cfg, spool, cfg_hash):
            index, scan = item
            yield process_planned(index, scan, plan, cfg, spool, cfg_hash)

    return ProcessStudy()


# ---------------------------------------------------------------- options
def pipeline_options(args: list[str]):
    """Beam's PipelineOptions from :func:`beam_args`'s (checked) arguments."""
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(args)


def beam_args(beam_argv: list[str]) -> list[str]:
    """The command line's leftovers as Beam arguments (--beam_runner -> --runner). Raises a
    one-line ValueError (absl's "did you mean") for a flag Beam does not know: Beam would
    drop it with a warning."""
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
    known = set(PipelineOptions([]).get_all_options())
    for arg in args:
        name = arg.lstrip("-").split("=", 1)[0]
        if name.replace("-", "_") not in known:  # Beam would drop it with a warning
            raise ValueError(_unknown_flag(name, known))
    return args


def _unknown_flag(name: str, beam_names: set[str]) -> str:
    """absl's "did you mean" line, over this program's flags and Beam's options."""
    import difflib

    from absl import flags

    names = set(flags.FLAGS) | beam_names | {"beam_runner"}
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.75)
    hint = f". Did you mean: {', '.join(close)} ?" if close else ""
    return (f"Unknown command line flag '{name}' (neither a data_prep flag nor a Beam "
            f"pipeline option){hint}")


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
        options) -> pipeline.RunSummary:
    """``options``: Beam's PipelineOptions (:func:`pipeline_options`). The spool lies in
    ``--output_dir``, where every worker reaches it (Beam's FileSystems for a bucket); the
    outputs are written as the local runner writes them (:func:`pipeline.writing_output`)."""
    spool = storage.join(cfg.output_dir, pipeline.SPOOL)
    with pipeline.writing_output(cfg) as out:
        return _run(tasks, out, resolved_flags, options, spool)


def _run(tasks: list[StudyTask], cfg: pipeline.RunConfig, resolved_flags: dict,
         options, spool: str) -> pipeline.RunSummary:
    import apache_beam as beam

    storage.makedirs(spool)
    n_input = len(tasks)
    tasks, excluded = pipeline.select_tasks(tasks, cfg)
    summary_path = storage.join(spool, f"{SUMMARY_PREFIX}{uuid.uuid4().hex}.pkl")
    log.info("Beam pipeline: %d studies, options %s", len(tasks),
             options.get_all_options(drop_default=True))
    with beam.Pipeline(options=options) as p:
        build(p, tasks, cfg, spool, summary_path)
    outcomes, plan = pickle.loads(storage.read_bytes(summary_path))
    storage.remove(summary_path)
    return pipeline.finish(outcomes, plan, cfg, resolved_flags, n_input, excluded, spool)
