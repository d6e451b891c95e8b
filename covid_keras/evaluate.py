"""Evaluate a training run on a split: metrics with CIs, patient decisions, explanations.

    python -m covid_keras.evaluate --run_dir=runs/drenet --data_dir=tfrecords/covid_ct \\
        --split=test --output_dir=reports/drenet_test
    python -m covid_keras.evaluate --compare runs/drenet runs/vgg16 runs/densenet \\
        runs/resnet50 --split=test --output_dir=reports/table1

Writes to ``--output_dir``: ``metrics.json`` (sections ``slice`` and ``patient``, each
metric ``{"value", "ci95"}``; per-class and macro entries over more than 2 classes;
calibration, confusion matrices, ROC points, per-site breakdown, warnings), ``slices.csv``,
``patients.csv``, ``report.html`` with ``roc.png``, ``pr.png``, ``reliability.png``,
``confusion.png`` and ``explanations/<patient_key>.png``.

The model is the run's ``best.keras`` (``--checkpoint`` picks another). The patient rule
and threshold are the run's ``decision.json``; a run without one gets them chosen now on
its validation split (``--val_split``, default the run's), never on ``--split``
(``--save_decision`` keeps them in the run folder).

``--compare RUN RUN ...`` (space- or comma-separated) writes ``comparison.md`` and
``comparison.csv``: one row per run, laid out like the DRENet paper's Table 1 (two
classes) or Table 2 (more), with CIs. A RUN is an evaluation output folder (its
metrics.json is read) or a training run (evaluated now on ``--split`` into
``<output_dir>/<run name>/``).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

from covid_keras.core import cli
from covid_keras.io.run_dir import RunDir

FLAGS = flags.FLAGS

def define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the library functions
    below import without claiming flag names that other entry points use)."""
    flags.DEFINE_string("run_dir", None, "Training run folder (best.keras, run_info.json).")
    flags.DEFINE_string("data_dir", None, "TFRecords folder (default: the run's --data_dir).")
    flags.DEFINE_string("split", "test", "Split to evaluate.")
    flags.DEFINE_string("output_dir", None, "Output folder (default: <run_dir>/eval_<split>).")
    flags.DEFINE_string("checkpoint", None, "Model file (a path or a file of the run; default "
                        "best.keras, else final.keras).")
    flags.DEFINE_string("val_split", None, "Split that chooses the decision when the run has no "
                        "decision.json (default: the run's --val_split).")
    flags.DEFINE_string("val_data_dir", None, "TFRecords of --val_split (default: the run's "
                        "--data_dir).")
    flags.DEFINE_enum("criterion", "youden", ["youden", "sensitivity"], "How the decision is "
                      "chosen on val (without decision.json): Youden's J, or the highest "
                      "specificity at sensitivity >= --target_sensitivity.")
    flags.DEFINE_float("target_sensitivity", 0.9, "For --criterion=sensitivity.")
    flags.DEFINE_bool("save_decision", False, "Write a decision chosen now into the run folder "
                      "(decision.json), where export and predict read it.")
    flags.DEFINE_integer("batch_size", 8, "Prediction batch size.")
    flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of patients for the 95 % CIs "
                         "(0: none).")
    flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
    flags.DEFINE_integer("top_slices", 3, "Slices shown per patient in the explanations.")
    flags.DEFINE_integer("max_explained_patients", -1, "Patients with explanations (-1: all).")
    flags.DEFINE_bool("report", True, "Write the plots, explanations and report.html.")
    flags.DEFINE_list("compare", [], "Runs or evaluation folders to tabulate (space- or "
                      "comma-separated).")



log = logging.getLogger("covid_keras.evaluate")


def expand_compare(argv: list[str]) -> list[str]:
    """``--compare A B C`` -> ``--compare=A,B,C`` (absl list flags take one value)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--compare" or arg.startswith("--compare="):
            values = [arg.split("=", 1)[1]] if "=" in arg else []
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
            out.append("--compare=" + ",".join(v for v in values if v))
            continue
        out.append(arg)
        i += 1
    return out


def evaluate_settings() -> dict:
    """``evaluate_run``'s arguments from the flags, but the run and output folders."""
    return dict(data_dir=FLAGS.data_dir, split=FLAGS.split, checkpoint=FLAGS.checkpoint,
                val_split=FLAGS.val_split, val_data_dir=FLAGS.val_data_dir,
                criterion=FLAGS.criterion, target_sensitivity=FLAGS.target_sensitivity,
                batch_size=FLAGS.batch_size, n_bootstrap=FLAGS.bootstrap, seed=FLAGS.seed,
                top_slices=FLAGS.top_slices, max_explained=FLAGS.max_explained_patients,
                save_decision=FLAGS.save_decision, report=FLAGS.report)


def check_paths() -> None:
    """The folders the command reads exist: checked before TensorFlow loads, so a mistyped
    path is an error in well under a second, not after the imports (5-14 s)."""
    from covid_keras.core import files

    def folder(path, what: str) -> None:
        if path and not files.is_remote(path) and not os.path.isdir(path):
            raise FileNotFoundError(f"{what} {path}: no such folder")

    if FLAGS.compare:
        for path in FLAGS.compare:
            folder(path, "--compare")
        return
    if not FLAGS.run_dir:
        return
    run = RunDir(FLAGS.run_dir)
    run.checkpoint(FLAGS.checkpoint)  # a run folder at all?
    folder(FLAGS.data_dir or run.flags().get("data_dir"),
           "--data_dir" if FLAGS.data_dir else "the run's --data_dir")
    folder(FLAGS.val_data_dir, "--val_data_dir")


def main(argv):
    del argv  # cli.run refuses stray arguments
    check_paths()
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    cli.import_keras_quietly(FLAGS.verbosity >= 1)
    from covid_keras.evaluation import evaluation

    if FLAGS.compare:
        if not FLAGS.output_dir:
            raise ValueError("--compare needs --output_dir")
        out = evaluation.compare_runs(FLAGS.compare, FLAGS.output_dir, evaluate_settings())
        print(out["markdown"])
        print(f"written to {FLAGS.output_dir}: comparison.md, comparison.csv")
        return 0
    if not FLAGS.run_dir:
        raise ValueError("--run_dir is required (or --compare)")
    evaluation.evaluate_run(run_dir=FLAGS.run_dir, output_dir=FLAGS.output_dir,
                            **evaluate_settings())
    return 0


def run_main(argv=None):
    define_flags()
    cli.run(main, argv=expand_compare(list(sys.argv if argv is None else argv)),
            program="covid_keras.evaluate")


if __name__ == "__main__":
    run_main()
