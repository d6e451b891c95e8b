"""Chest CT studies (DICOM series or PNG/JPEG slices) -> sharded, gzipped TFRecords.

    python -m data_prep.build_tfrecords --flagfile=configs/data/<name>.cfg
    python -m data_prep.build_tfrecords --input=studies/ --output_dir=tfrecords/mine

--input is a manifest CSV (study_path,label[,patient_id,site,split]) or a folder laid out
as <root>/<label>/<study>/. --output_dir receives <split>-NNNNN-of-NNNNN.tfrecord.gz,
manifest.json (counts, dropped slices, flags, versions, hashes) and failures.csv (every
rejected study, file and slice warning, with its reason). The exit code is 0 when at least
one record was written (1 otherwise); with --strict, any failed study also exits 1.

Every flag is checked before anything is written (the salt file, the output folder): an
unknown flag is absl's one line with "did you mean", a run-time error a user can cause
(missing input, read-only output path, bad values) one line ``data_prep.build_tfrecords:
error: ...`` and exit 1; ``--verbosity=1`` shows the traceback (and Beam's INFO logs).
``--output_dir`` may be on any file system TensorFlow knows (``gs://``, ``s3://``...): the
local runner then works in a local folder and copies the finished files over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets

from absl import flags

from covid_keras.core import cli, files, provenance
from covid_keras.core.imaging import parse_windows
from data_prep import inputs, limits, pipeline
from data_prep.errors import StudyError
from data_prep.lung import LungMaskParams
from data_prep.preprocess import FILL_MODES, SAMPLING_MODES, PrepConfig
from data_prep.settings import DEFAULTS, PrepSettings
from data_prep.split import SCHEMES
from data_prep.study import ScanConfig

FLAGS = flags.FLAGS

flags.DEFINE_string("input", None, "Manifest CSV (study_path,label[,patient_id,site,split]) "
                    "or a folder <root>/<label>/<study>/.")
flags.DEFINE_string("output_dir", None, "Where shards, manifest.json and failures.csv go. "
                    "Default: tfrecords/<dataset>.")
flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2)), "Worker processes (1: inline). "
                     "The beam runner ignores it (use Beam's --direct_num_workers).")
flags.DEFINE_integer("seed", 0, "Seed for the split and the train-time rotated-lung fill.")
flags.DEFINE_bool("strict", False, "Exit non-zero when any study fails.")
flags.DEFINE_string("dataset", None, "Dataset name (default: --output_dir's base name; "
                    "never --input's, which may identify a patient).")
flags.DEFINE_enum("runner", "local", ["local", "beam"],
                  "local: processes on this machine; beam: an Apache Beam pipeline (needs the "
                  "[beam] extra). Beam pipeline options (e.g. --project, --region, "
                  "--temp_location, --setup_file) pass through; any other unknown flag is an "
                  "error. --beam_runner=X is Beam's --runner=X (e.g. DirectRunner, "
                  "DataflowRunner).")
flags.DEFINE_list("classes", [], "Class order (label index = position). Default: sorted "
                  "labels found. A folder input's other <label>/ folders are excluded "
                  "(counted apart in manifest.json, not failures); see --exclude_labels for a "
                  "manifest.")
flags.DEFINE_list("exclude_labels", [], "Labels (after --label_map) of a manifest input that "
                  "are left out on purpose, e.g. normal for a covid,bacterial task: counted "
                  "apart as excluded, not failures. Other labels not in --classes fail their "
                  "study (label_unknown).")
flags.DEFINE_list("label_map", [], "FROM:TO label renames, e.g. COVID:covid,NonCOVID:non_covid.")
flags.DEFINE_list("manifest_columns", [], "OURS:THEIRS column names for a manifest with other "
                  "headers, e.g. study_path:file.")
flags.DEFINE_list("split_map", [], "FROM:TO renames of the manifest's split values.")
# The preparation flags; their defaults are data_prep.settings.PrepSettings's.
flags.DEFINE_integer("image_size", DEFAULTS.image_size,
                     "Output slice size in pixels (square).")
flags.DEFINE_list("windows", [n for n, _, _ in DEFAULTS.windows],
                  "1 or 3 windows, each a name (lung, mediastinal, bone) or LEVEL:WIDTH in HU; "
                  "one image channel each.")
flags.DEFINE_integer("num_slices", DEFAULTS.num_slices, "Slices sampled per series (paper: 15).")
flags.DEFINE_enum("sampling", DEFAULTS.sampling, list(SAMPLING_MODES),
                  "paper: indices i*n/15; middle50: the authors' code, ~15 from the middle 50% "
                  "of the stack.")
flags.DEFINE_integer("min_slices", DEFAULTS.min_slices,
                     "Series with fewer slices are rejected (too_few_slices).")
flags.DEFINE_float("min_lung_fraction", DEFAULTS.min_lung_fraction,
                   "Drop slices whose lung mask is below this fraction of the body "
                   "cross-section.")
flags.DEFINE_bool("lung_filter", DEFAULTS.lung_filter,
                  "Drop slices with too little lung. Off: keep every slice (those without a "
                  "found lung are kept whole).")
flags.DEFINE_bool("crop_to_lung", DEFAULTS.crop_to_lung,
                  "Crop to the lung box and zero outside the lung. Off: the whole slice, "
                  "padded square.")
flags.DEFINE_enum("fill_blank", DEFAULTS.fill_blank, list(FILL_MODES), "Fill the "
                  "blank around the lungs with rotated lung (paper), in every split, the same "
                  "for a slice on every run. none: zeros. rotate_train: the paper's train-only "
                  "fill; train and val/test become different image distributions (on the demo "
                  "5 % vs 77 % zero pixels, lesions 4x denser in train), which costs "
                  "accuracy.")
flags.DEFINE_list("image_window", [f"{v:g}" for v in DEFAULTS.image_window_hu],
                  "LEVEL,WIDTH in HU that 8-bit slice images are assumed to be windowed with "
                  "(maps grey back to pseudo-HU).")
flags.DEFINE_float("gas_median_hu", DEFAULTS.lung.gas_median_hu,
                   "Lung-mask air regions whose median HU is below this are gas (bowel, "
                   "stomach), not lung. Slice images ignore it (no real HU).")
flags.DEFINE_enum("split_scheme", "paper", list(SCHEMES), "paper: 60/10/30 by patient; "
                  "repeated_3to1: seed 004's five 3:1 train/val splits (see --repeat).")
flags.DEFINE_list("split_fractions", ["0.6", "0.1", "0.3"], "train,val,test patient fractions.")
flags.DEFINE_integer("repeat", 0, "Which of the five repeated 3:1 splits the records carry.")
flags.DEFINE_float("val_from_train", 0.0, "Move this fraction of the train patients "
                   "(stratified, seeded) to val, e.g. when the manifest's val is the "
                   "held-out test (--split_map=val:test).")
flags.DEFINE_float("shard_size_mb", 128.0, "Target shard size; shards per split = "
                   "ceil(total / this), balanced by study.")
flags.DEFINE_string("manifest_encoding", "auto", "The manifest CSV's text encoding. auto: "
                    "UTF-8 (with or without BOM) or UTF-16 with a BOM; rows with other bytes "
                    "fail with manifest_encoding (a path's bytes are kept). E.g. cp1252, "
                    "latin-1 for legacy Windows files.")
flags.DEFINE_float("max_file_mb", limits.DEFAULT_MAX_FILE_MB, "Files larger than this are "
                   "never read (file_too_large).")
flags.DEFINE_integer("max_image_pixels", limits.DEFAULT_MAX_IMAGE_PIXELS, "Images whose "
                     "header gives more rows x columns (x frames) are never decoded "
                     "(image_too_large): a small PNG can decode to gigabytes.")
flags.DEFINE_float("study_timeout_s", limits.DEFAULT_STUDY_TIMEOUT_S, "A study whose headers "
                   "(or whose pixels) take longer fails with study_timeout; 0: no limit.")
flags.DEFINE_float("worker_memory_mb", limits.DEFAULT_WORKER_MEMORY_MB, "Address-space cap "
                   "of each worker process (--workers > 1): a study allocating more fails "
                   "with out_of_memory; 0: no cap.")
flags.DEFINE_string("salt_file", None, "Secret salt for patient/study keys; created (random) if "
                    "missing. Default: <output_dir>/patient_salt.key. Keep it private.")


def _salt(path: str) -> bytes:
    """The salt at ``path`` (any file system); created (random, private) when missing."""
    if not files.exists(path):
        parent = os.path.dirname(path)
        if parent:
            files.makedirs(parent)
        files.atomic_write_bytes(path, secrets.token_hex(32).encode())
        if not files.is_remote(path):
            os.chmod(path, 0o600)
        logging.info("Created a new salt in %s (keep it private, reuse it for this dataset).",
                     path)
    salt = files.read_bytes(path).strip()
    if len(salt) < 16:
        raise ValueError(f"Salt file {path} is too short (need >= 16 bytes)")
    return salt


# Flags that cannot change a byte of the records are left out of manifest.json, so that the
# same input gives the same files wherever and however parallel the run (and the salt's
# location stays private).
# --input is not recorded either: its folder names may name a patient.
NOT_RECORDED = ("input", "output_dir", "workers", "salt_file", "runner", "study_timeout_s",
                "worker_memory_mb")


def resolved_flags() -> dict:
    """The flags of this module and their values (what manifest.json records)."""
    return provenance.module_flags(__name__, exclude=NOT_RECORDED)


def _dataset_and_output() -> tuple[str, str]:
    # Never named after --input's folder: a hospital export's folder name can identify a
    # patient, and the name goes into manifest.json and the default output path.
    if FLAGS.dataset:
        dataset = FLAGS.dataset
    elif FLAGS.output_dir:
        dataset = os.path.basename(os.path.normpath(FLAGS.output_dir.rstrip("/")))
    else:
        raise ValueError("give --output_dir or --dataset (the dataset is not named after "
                         "--input's folder, which may identify a patient)")
    if not dataset or dataset in (".", "..") or "/" in dataset:
        raise ValueError(f"--dataset must be a plain name. Received: {dataset!r}")
    return dataset, FLAGS.output_dir or os.path.join("tfrecords", dataset)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_values() -> None:
    """Flag values that cannot make a run (one line each), before anything is read."""
    _check(FLAGS.workers >= 1, f"--workers must be >= 1. Received: {FLAGS.workers}")
    _check(FLAGS.num_slices >= 1, f"--num_slices must be >= 1. Received: {FLAGS.num_slices}")
    _check(FLAGS.min_slices >= 1, f"--min_slices must be >= 1. Received: {FLAGS.min_slices}")
    _check(FLAGS.shard_size_mb > 0, f"--shard_size_mb must be > 0. Received: "
                                    f"{FLAGS.shard_size_mb}")
    _check(len(FLAGS.image_window) == 2, "--image_window is LEVEL,WIDTH. Received: "
                                         f"{','.join(FLAGS.image_window)}")
    _check(len(FLAGS.split_fractions) == 3, "--split_fractions needs 3 values. Received: "
                                            f"{','.join(FLAGS.split_fractions)}")
    try:
        fractions = [float(v) for v in FLAGS.split_fractions + FLAGS.image_window]
    except ValueError:
        raise ValueError("--split_fractions and --image_window take numbers. Received: "
                         f"{','.join(FLAGS.split_fractions)} and "
                         f"{','.join(FLAGS.image_window)}") from None
    _check(min(fractions[:3]) >= 0 and sum(fractions[:3]) > 0, "--split_fractions must be "
           f"non-negative with a positive sum. Received: {','.join(FLAGS.split_fractions)}")
    _check(0.0 <= FLAGS.val_from_train < 1.0, "--val_from_train must be in [0, 1). Received: "
                                              f"{FLAGS.val_from_train}")
    _check(0 <= FLAGS.repeat < 5, f"--repeat must be in [0, 5). Received: {FLAGS.repeat}")
    _check(len(set(FLAGS.classes)) == len(FLAGS.classes),
           f"--classes names a class twice. Received: {','.join(FLAGS.classes)}")
    _check(not set(FLAGS.exclude_labels) & set(FLAGS.classes),
           "--exclude_labels and --classes share labels. Received: "
           f"{sorted(set(FLAGS.exclude_labels) & set(FLAGS.classes))}")
    _check(not FLAGS.exclude_labels or bool(FLAGS.classes),
           "--exclude_labels needs --classes (the classes that are kept)")
    _check(FLAGS.max_file_mb > 0, f"--max_file_mb must be > 0. Received: {FLAGS.max_file_mb}")
    _check(FLAGS.max_image_pixels > 0, "--max_image_pixels must be > 0. Received: "
                                       f"{FLAGS.max_image_pixels}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, what: str, *, beside: bool = False) -> None:
    """A one-line error when ``path`` (a local folder or file to be made) cannot be written;
    ``beside``: files are also made in its parent folder (the lock, the staging folder).
    Nothing is written. Paths on other file systems are left to the run."""
    if files.is_remote(path):
        return
    targets = [path] + ([os.path.dirname(os.path.abspath(path))] if beside else [])
    for target in targets:
        existing = _nearest_existing(target)
        if not os.path.isdir(existing):
            raise ValueError(f"{what} {path} cannot be made: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path} cannot be written: {existing} is read-only")


def build_config(salt: bytes | None = None) -> pipeline.RunConfig:
    """The run's configuration from the flags (``salt=None``: the salt file is read or
    created, the run's first write)."""
    _check_values()
    dataset, output_dir = _dataset_and_output()
    level, width = (float(v) for v in FLAGS.image_window)
    settings = PrepSettings(
        num_slices=FLAGS.num_slices, sampling=FLAGS.sampling, min_slices=FLAGS.min_slices,
        image_window_hu=(level, width), max_file_bytes=int(FLAGS.max_file_mb * 1024 * 1024),
        max_image_pixels=FLAGS.max_image_pixels, image_size=FLAGS.image_size,
        windows=tuple(parse_windows(FLAGS.windows)), lung_filter=FLAGS.lung_filter,
        min_lung_fraction=FLAGS.min_lung_fraction, crop_to_lung=FLAGS.crop_to_lung,
        fill_blank=FLAGS.fill_blank, lung=LungMaskParams(gas_median_hu=FLAGS.gas_median_hu))
    scan = ScanConfig.from_settings(settings, salt or b"", limits.Limits(
        study_timeout_s=FLAGS.study_timeout_s, worker_memory_mb=FLAGS.worker_memory_mb))
    prep = PrepConfig.from_settings(settings)
    fractions = tuple(float(v) for v in FLAGS.split_fractions)
    cfg = pipeline.RunConfig(
        output_dir=output_dir, scan=scan, prep=prep, classes=tuple(FLAGS.classes),
        split_scheme=FLAGS.split_scheme, split_fractions=fractions,  # type: ignore[arg-type]
        repeat=FLAGS.repeat, val_from_train=FLAGS.val_from_train, seed=FLAGS.seed,
        workers=FLAGS.workers, shard_size_mb=FLAGS.shard_size_mb, dataset=dataset,
        exclude_labels=tuple(FLAGS.exclude_labels))
    if salt is None:
        cfg = with_salt(cfg, _salt(salt_path(cfg)))
    return cfg


def salt_path(cfg: pipeline.RunConfig) -> str:
    return FLAGS.salt_file or os.path.join(cfg.output_dir, "patient_salt.key")


def with_salt(cfg: pipeline.RunConfig, salt: bytes) -> pipeline.RunConfig:
    return dataclasses.replace(cfg, scan=dataclasses.replace(cfg.scan, salt=salt))


def main(argv: list[str]) -> int:
    debug = FLAGS.verbosity >= 1
    logging.getLogger().setLevel(logging.INFO)
    # Beam's INFO lines (a dozen per stage) only with --verbosity >= 1
    logging.getLogger("apache_beam").setLevel(logging.INFO if debug else logging.WARNING)
    # 1. every flag, the input and the output paths: nothing is written before they pass
    cfg = build_config(salt=b"")
    beam_options = None
    if FLAGS.runner == "beam":
        try:
            with _quiet_beam_import():
                from data_prep import beam_pipeline

                beam_options = beam_pipeline.pipeline_options(_BEAM_ARGV)
        except ImportError:
            raise ValueError("--runner=beam needs the [beam] extra: "
                             "pip install -e .[beam]") from None
    tasks = inputs.read_input(
        FLAGS.input,
        columns=inputs.parse_mapping(FLAGS.manifest_columns, "--manifest_columns"),
        label_map=inputs.parse_mapping(FLAGS.label_map, "--label_map"),
        split_map=inputs.parse_mapping(FLAGS.split_map, "--split_map"),
        encoding=FLAGS.manifest_encoding)
    if cfg.classes and os.path.isdir(FLAGS.input):
        # a folder input's <label>/ folders are its classes: the ones not asked for are
        # excluded on purpose (counted apart), never failures
        found = {t.label for t in tasks if t.error is None}
        cfg = dataclasses.replace(cfg, exclude_labels=tuple(
            sorted(set(cfg.exclude_labels) | (found - set(cfg.classes)))))
    check_writable(cfg.output_dir, "--output_dir", beside=True)
    if not files.exists(salt_path(cfg)):
        check_writable(salt_path(cfg), "--salt_file")
    # 2. the run (TensorFlow writes the shards: imported without its C++ start-up notices)
    cli.import_tensorflow_quietly(debug)
    cfg = with_salt(cfg, _salt(salt_path(cfg)))
    logging.info("%d studies -> %s (%s)", len(tasks), cfg.output_dir,
                 "Beam" if beam_options is not None else f"{cfg.workers} workers")
    try:
        if beam_options is not None:
            from data_prep import beam_pipeline

            summary = beam_pipeline.run(tasks, cfg, resolved_flags(), beam_options)
        else:
            summary = pipeline.run(tasks, cfg, resolved_flags())
    except StudyError as err:  # run-level: e.g. the split cannot be made
        raise ValueError(f"Run failed: {err}") from err
    print(pipeline.summary_table(summary.manifest))
    print(f"wrote {summary.written_records} records to {cfg.output_dir} "
          f"({len(summary.manifest['files'])} shards); failures: "
          f"{os.path.join(cfg.output_dir, pipeline.FAILURES)}")
    if summary.written_records == 0:
        logging.error("Nothing was written.")
        return 1
    if FLAGS.strict and summary.failed_studies:
        logging.error("--strict: %d studies failed.", summary.failed_studies)
        return 1
    return 0


@contextlib.contextmanager
def _quiet_beam_import():
    """Beam's import logs a root WARNING about GCP clients a local run never needs: off
    unless --verbosity >= 1."""
    root = logging.getLogger()
    level = root.level
    if FLAGS.verbosity < 1:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# The Beam pipeline options of the command line (--runner=beam), set by _parse_flags.
_BEAM_ARGV: list[str] = []


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's strict parse, except that with --runner=beam the flags Beam knows (and
    --beam_runner) are kept for Beam; any other unknown flag is absl's "did you mean"
    error. Returns the program name and the positional arguments (errors for cli.run).
    A flag error is raised as ``flags.Error``: cli.run makes it one line."""
    rest = FLAGS(argv, known_only=True)
    unknown = [a for a in rest[1:] if a.startswith("-") and a != "-"]
    positional = [a for a in rest[1:] if not (a.startswith("-") and a != "-")]
    if unknown and FLAGS.runner == "beam":
        try:
            with _quiet_beam_import():
                from data_prep import beam_pipeline

                _BEAM_ARGV[:] = beam_pipeline.beam_args(unknown)
        except ImportError:
            raise flags.Error("--runner=beam needs the [beam] extra: "
                              "pip install -e .[beam]") from None
        except ValueError as err:
            raise flags.Error(str(err)) from None
    elif unknown:
        FLAGS(argv)  # absl's "Unknown command line flag ... Did you mean"
        raise flags.Error(f"Unknown command line flags {unknown}")  # not reached
    return rest[:1] + positional


def run_main() -> None:
    cli.run(main, required=["input"], program="data_prep.build_tfrecords",
            flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
