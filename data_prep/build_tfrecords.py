"""Chest CT studies (DICOM series or PNG/JPEG slices) -> sharded, gzipped TFRecords.

    python -m data_prep.build_tfrecords --flagfile=configs/data/<name>.cfg
    python -m data_prep.build_tfrecords --input=studies/ --output_dir=tfrecords/mine

--input is a manifest CSV (study_path,label[,patient_id,site,split]) or a folder laid out
as <root>/<label>/<study>/. --output_dir receives <split>-NNNNN-of-NNNNN.tfrecord.gz,
manifest.json (counts, dropped slices, flags, versions, hashes) and failures.csv (every
rejected study, file and slice warning, with its reason). The exit code is 0 when at least
one record was written (1 otherwise); with --strict, any failed study also exits 1.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

from absl import app, flags

from covid_keras.imaging import parse_windows
from data_prep import inputs, limits, pipeline
from data_prep.errors import StudyError
from data_prep.lung import LungMaskParams
from data_prep.preprocess import SAMPLING_MODES, PrepConfig
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
                  "[beam] extra). Other --flags pass through as Beam pipeline options; "
                  "--beam_runner=X is Beam's --runner=X (e.g. DirectRunner, DataflowRunner).")
flags.DEFINE_list("classes", [], "Class order (label index = position). Default: sorted "
                  "labels found.")
flags.DEFINE_list("label_map", [], "FROM:TO label renames, e.g. COVID:covid,NonCOVID:non_covid.")
flags.DEFINE_list("manifest_columns", [], "OURS:THEIRS column names for a manifest with other "
                  "headers, e.g. study_path:file.")
flags.DEFINE_list("split_map", [], "FROM:TO renames of the manifest's split values.")
flags.DEFINE_integer("image_size", 448, "Output slice size in pixels (square).")
flags.DEFINE_list("windows", ["lung"], "1 or 3 windows, each a name (lung, mediastinal, bone) "
                  "or LEVEL:WIDTH in HU; one image channel each.")
flags.DEFINE_integer("num_slices", 15, "Slices sampled per series (paper: 15).")
flags.DEFINE_enum("sampling", "paper", list(SAMPLING_MODES), "paper: indices i*n/15; middle50: "
                  "the authors' code, ~15 from the middle 50% of the stack.")
flags.DEFINE_integer("min_slices", 8, "Series with fewer slices are rejected (too_few_slices).")
flags.DEFINE_float("min_lung_fraction", 0.05, "Drop slices whose lung mask is below this "
                   "fraction of the body cross-section.")
flags.DEFINE_bool("lung_filter", True, "Drop slices with too little lung. Off: keep every slice "
                  "(those without a found lung are kept whole).")
flags.DEFINE_bool("crop_to_lung", True, "Crop to the lung box and zero outside the lung. Off: "
                  "the whole slice, padded square.")
flags.DEFINE_enum("fill_blank", "rotate", ["rotate", "none", "rotate_train"], "Fill the "
                  "blank around the lungs with rotated lung (paper), in every split, the same "
                  "for a slice on every run. none: zeros. rotate_train: the paper's train-only "
                  "fill; train and val/test become different image distributions (on the demo "
                  "5 %% vs 77 %% zero pixels, lesions 4x denser in train), which costs "
                  "accuracy.")
flags.DEFINE_list("image_window", ["-700", "1500"], "LEVEL,WIDTH in HU that 8-bit slice images "
                  "are assumed to be windowed with (maps grey back to pseudo-HU).")
flags.DEFINE_float("gas_median_hu", -900.0, "Lung-mask air regions whose median HU is below this "
                   "are gas (bowel, stomach), not lung. Slice images ignore it (no real HU).")
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
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pipeline.atomic_write_bytes(path, secrets.token_hex(32).encode())
        os.chmod(path, 0o600)
        logging.info("Created a new salt in %s (keep it private, reuse it for this dataset).",
                     path)
    with open(path, "rb") as f:
        salt = f.read().strip()
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
    return {flag.name: flag.value for flag in FLAGS.get_flags_for_module(sys.modules[__name__])
            if flag.name not in NOT_RECORDED}


def build_config() -> pipeline.RunConfig:
    # Never named after --input's folder: a hospital export's folder name can identify a
    # patient, and the name goes into manifest.json and the default output path.
    if FLAGS.dataset:
        dataset = FLAGS.dataset
    elif FLAGS.output_dir:
        dataset = os.path.basename(os.path.normpath(FLAGS.output_dir))
    else:
        raise ValueError("give --output_dir or --dataset (the dataset is not named after "
                         "--input's folder, which may identify a patient)")
    output_dir = FLAGS.output_dir or os.path.join("tfrecords", dataset)
    level, width = (float(v) for v in FLAGS.image_window)
    scan = ScanConfig(salt=_salt(FLAGS.salt_file or os.path.join(output_dir, "patient_salt.key")),
                      num_slices=FLAGS.num_slices, sampling=FLAGS.sampling,
                      min_slices=FLAGS.min_slices, image_window_hu=(level, width),
                      limits=limits.Limits(
                          max_file_bytes=int(FLAGS.max_file_mb * 1024 * 1024),
                          max_image_pixels=FLAGS.max_image_pixels,
                          study_timeout_s=FLAGS.study_timeout_s,
                          worker_memory_mb=FLAGS.worker_memory_mb))
    prep = PrepConfig(image_size=FLAGS.image_size, windows=tuple(parse_windows(FLAGS.windows)),
                      lung_filter=FLAGS.lung_filter, min_lung_fraction=FLAGS.min_lung_fraction,
                      crop_to_lung=FLAGS.crop_to_lung, fill_blank=FLAGS.fill_blank,
                      lung=LungMaskParams(gas_median_hu=FLAGS.gas_median_hu))
    fractions = tuple(float(v) for v in FLAGS.split_fractions)
    if len(fractions) != 3:
        raise ValueError(f"--split_fractions needs 3 values. Received: {FLAGS.split_fractions}")
    return pipeline.RunConfig(
        output_dir=output_dir, scan=scan, prep=prep, classes=tuple(FLAGS.classes),
        split_scheme=FLAGS.split_scheme, split_fractions=fractions,  # type: ignore[arg-type]
        repeat=FLAGS.repeat, val_from_train=FLAGS.val_from_train, seed=FLAGS.seed,
        workers=FLAGS.workers,
        shard_size_mb=FLAGS.shard_size_mb, dataset=dataset)


def main(argv: list[str]) -> int:
    logging.getLogger().setLevel(logging.INFO)
    try:
        tasks = inputs.read_input(
            FLAGS.input,
            columns=inputs.parse_mapping(FLAGS.manifest_columns, "--manifest_columns"),
            label_map=inputs.parse_mapping(FLAGS.label_map, "--label_map"),
            split_map=inputs.parse_mapping(FLAGS.split_map, "--split_map"),
            encoding=FLAGS.manifest_encoding)
    except (ValueError, OSError) as err:  # the input as a whole cannot be read: one line
        logging.error("%s", err)
        return 1
    try:
        cfg = build_config()
    except (ValueError, OSError) as err:  # flags that cannot make a run: one line
        logging.error("%s", err)
        return 1
    logging.info("%d studies -> %s (%d workers)", len(tasks), cfg.output_dir, cfg.workers)
    try:
        if FLAGS.runner == "beam":
            from data_prep import beam_pipeline

            summary = beam_pipeline.run(tasks, cfg, resolved_flags(), argv[1:])
        else:
            if len(argv) > 1:
                raise app.UsageError(f"Unknown arguments: {argv[1:]}")
            summary = pipeline.run(tasks, cfg, resolved_flags())
    except (StudyError, RuntimeError) as err:  # run-level: e.g. another run on the folder
        logging.error("Run failed: %s", err)
        return 1
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


def run_main() -> None:
    flags.mark_flag_as_required("input")
    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    # Beam's own options (--beam_runner=..., --direct_num_workers=...) pass through.
    return FLAGS(argv, known_only=True)


if __name__ == "__main__":
    run_main()
