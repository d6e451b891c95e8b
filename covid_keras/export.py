r"""A trained run -> a versioned SavedModel for TF Serving.

    python -m covid_keras.export --run_dir=runs/drenet --export_base=exports --model_name=drenet
    tensorflow_model_server --model_name=drenet --model_base_path=$PWD/exports/drenet \
        --port=8500 --rest_api_port=8501        # or: python -m covid_keras.serve (same flags)

Writes ``<export_base>/<model_name>/<version>/`` (``saved_model.pb``, ``variables/``,
``assets.extra/``) atomically: it is built in a hidden folder beside (TF Serving ignores
names that are not integers) and renamed into place, so a server polling the base path
never sees half a version. Without ``--version`` the version is the highest existing one
plus 1 (1 for the first).

Signatures (``serving_default``, ``predict_images``, ``predict_study``, ``gradcam``): see
:mod:`covid_keras.serving.serving_signatures`. ``assets.extra/`` (TF Serving's folder for files
that are not the graph) holds:

* ``covid_keras.json`` (:data:`INFO_FILE`): class names, input size, backbone and its
  normalisation, the model kind, the record windows and data_prep's preprocessing settings
  (what ``covid_keras.predict`` needs to prepare a new study as the training records were),
  the decision (rule, threshold, positive class, criterion; or argmax when the run has no
  decision.json), the package version, the git sha of the exporting code and of the
  training run, and the signatures' input/output description;
* ``class_names.txt``: one class per line, in output order;
* ``tf_serving_warmup_requests``: a TFRecord of ``PredictionLog`` protos, one Predict
  request per signature, which TF Serving replays at load time so the first real request is
  not slow.

Nothing in the export names a patient or a path of the training machine.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from covid_keras.core import cli
from covid_keras.serving import exporter

FLAGS = flags.FLAGS
log = logging.getLogger("covid_keras.export")


def define_flags() -> None:
    flags.DEFINE_string("run_dir", None, "Training run folder (best.keras, decision.json, "
                        "run_info.json).")
    flags.DEFINE_string("export_base", None, "Base folder: the export goes to "
                        "<export_base>/<model_name>/<version>/.")
    flags.DEFINE_string("model_name", "drenet", "The model's name (TF Serving's "
                        "--model_name; the folder under --export_base).")
    flags.DEFINE_integer("version", None, "Version number (a positive integer). Default: "
                         "the highest existing version + 1.")
    flags.DEFINE_string("checkpoint", None, "Model file of the run (default: best.keras, "
                        "else final.keras).")


def main(argv: list[str]) -> int:
    # before TensorFlow loads: a typo is instant
    exporter.check_run(FLAGS.run_dir, FLAGS.checkpoint)
    cli.setup_logging(FLAGS.verbosity)
    model, info, decision = exporter.load_run(FLAGS.run_dir, FLAGS.checkpoint)
    for w in info["warnings"]:
        log.warning("warning: %s", w)
    path = exporter.export_model(model, info, decision, FLAGS.export_base, FLAGS.model_name,
                                 FLAGS.version)
    d = info["decision"]
    rule = (f"{d['rule']} rule, {d['positive_class']} >= {d['threshold']:.4g}"
            if d["method"] == "threshold" else "argmax (no decision.json)")
    print(f"exported {FLAGS.model_name} version {os.path.basename(path)} to {path} "
          f"({info['model']}, {info['input_size']} px, classes {info['class_names']}, "
          f"{rule})", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, required=["run_dir", "export_base"], program="covid_keras.export")
