r"""One study in, one answer out.

    python -m covid_keras.predict --study=<DICOM folder | .zip | folder of PNG/JPEG slices> \
        --model=<export dir | run dir | .keras> --output_dir=<dir> [--server=http://host:8501]

The study is read and prepared by data_prep's own functions (:func:`data_prep.study.
scan_study` and :func:`data_prep.study.process_study`: series choice, sampling, lung mask,
crop, window, fill), with the settings the training records were built with (stored in the
export's ``assets.extra/covid_keras.json``, or read from the run's dataset manifest); the
prepared slices reach the model through the input pipeline's decoding
(:func:`covid_keras.io.data.decode_image`). The model is the export's ``predict_study``
signature (a SavedModel, a run folder or a .keras file loaded here), or, with ``--server``,
the same signature on a running TF Serving / ``covid_keras.serve`` over REST.

``--output_dir`` receives, all at once (built beside and renamed into place):

* ``prediction.json`` (:data:`FORMAT_VERSION`): the patient's probabilities per class, the
  decision, its rule and threshold (made by the signature as evaluation makes it:
  :func:`covid_keras.evaluation.evaluation.decide_patient`; with the ``any`` rule a patient
  is normal only if every slice is); the series used and why; every slice used (salted hash
  of its SOPInstanceUID, index and position in the series, lung fraction, ``no_lung``,
  probabilities, boxes (y0, x0, y1, x1 in the model's input pixels of the prepared slice,
  clipped to it) and scores); the top slices; warnings (``few_slices``,
  ``not_ct_verified``, ``no_lung``, dropped slices, rejected series, ...);
* ``evidence_<n>.png`` for the top slices: the prepared slice with the lung outline
  (data_prep's lung mask, cyan) and its boxes, and its Grad-CAM overlay for the decided
  class.

Nothing in them (or in the log) names the patient: the study is named by a salted hash of
its path, slices by salted hashes of their UIDs (the salt: ``--salt_file``, created once
and kept private), and no DICOM attribute value is copied.

Bad input (not CT, no lung slices, a corrupt file, a zip with ``../`` paths, links or an
expansion bomb, a model that refuses the request) is a one-line error naming the study's
pseudonym and the reason; nothing is written then.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from covid_keras.core import cli
from covid_keras.serving import predictor

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("study", None, "A DICOM study folder, a .zip of one, or a folder of "
                        "PNG/JPEG slices.")
    flags.DEFINE_string("model", None, "An export (<base>/<name> or <base>/<name>/<version>), "
                        "a training run folder, or a .keras file. With --server: optional, "
                        "where the preprocessing settings are read from.")
    flags.DEFINE_string("output_dir", None, "Where prediction.json and the evidence PNGs go.")
    flags.DEFINE_string("server", None, "http://host:8501: predict through a running TF "
                        "Serving (or covid_keras.serve) over REST instead of loading a model.")
    flags.DEFINE_string("model_name", "drenet", "The served model's name (with --server).")
    flags.DEFINE_integer("top_slices", 3, "Slices with evidence PNGs (highest score for the "
                         "decided class).")
    flags.DEFINE_string("salt_file", predictor.DEFAULT_SALT, "Secret salt for the study and "
                        "slice hashes (created, random, when missing). Keep it private.")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
    flags.DEFINE_float("max_zip_mb", 2048.0, "A zipped study may expand to at most this much.")
    flags.DEFINE_integer("max_zip_files", 20000, "A zipped study may hold at most this many "
                         "entries.")
    flags.DEFINE_float("timeout_s", 60.0, "REST request timeout (with --server).")
    cli.define_server_token_flag()
    flags.declare_key_flag("server_token_file")  # this command's --help lists it


def check_paths() -> None:
    """The study, the model and the output folder, checked before TensorFlow loads (a
    mistyped path is an error in well under a second, not after the imports). The user's
    own terminal: the paths are named as typed."""
    if not FLAGS.model and not FLAGS.server:
        raise ValueError("--model or --server is required")
    if not os.path.exists(FLAGS.study):
        raise FileNotFoundError(f"--study {FLAGS.study}: no such file or folder")
    if FLAGS.model and not os.path.exists(FLAGS.model):
        raise FileNotFoundError(f"--model {FLAGS.model}: no such file or folder")
    out = FLAGS.output_dir
    if os.path.isdir(out) and os.listdir(out) and not FLAGS.overwrite:
        raise ValueError(f"--output_dir {out} is not empty (--overwrite replaces it)")


def main(argv: list[str]) -> int:
    check_paths()
    cli.setup_logging(FLAGS.verbosity)
    salt = predictor.read_salt(FLAGS.salt_file)
    if FLAGS.server:
        info = None
        if FLAGS.model:
            export_dir = predictor.find_export(FLAGS.model)
            info = (predictor.read_export_info(export_dir) if export_dir else
                    predictor.LocalModel(FLAGS.model).info)
        model = predictor.ServerModel(FLAGS.server, FLAGS.model_name, info, FLAGS.timeout_s,
                                      predictor.server_token(FLAGS.server_token_file))
    else:
        model = predictor.LocalModel(FLAGS.model)
    try:
        answer = predictor.predict_study(FLAGS.study, model, FLAGS.output_dir, salt,
                                         FLAGS.top_slices, FLAGS.overwrite,
                                         int(FLAGS.max_zip_mb * 1024 * 1024),
                                         FLAGS.max_zip_files)
    except predictor.StudyFailure as exc:
        # the user's own terminal: the study as typed, beside the pseudonym that files and
        # logs use (prediction.json, the web page and the log lines never name the path)
        raise predictor.StudyFailure(f"{FLAGS.study} ({exc.study})", exc.reason,
                                     exc.detail) from None
    p = answer["patient"]
    probs = ", ".join(f"{c} {v:.3f}" for c, v in p["probabilities"].items())
    from covid_keras.evaluation.decision import rule_text

    rule = (rule_text(p["rule"], p["positive_class"], p["threshold"], p.get("normal_class"))
            if p["method"] == "threshold" else "argmax")
    print(f"{answer['study']}: {p['decision']} ({probs}; {rule}; "
          f"{answer['series']['used']} slices) -> {FLAGS.output_dir}", flush=True)
    for line in predictor.warning_lines(answer["warnings"]):
        print(line, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, required=["study", "output_dir"], program="covid_keras.predict")
