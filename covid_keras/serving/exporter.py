"""A trained run -> a versioned SavedModel (the library of ``python -m covid_keras.export``,
whose docstring describes the export): the version folders, the export info
(``assets.extra/covid_keras.json``), the warmup requests, ``load_run`` (model, info,
decision of a run folder) and ``export_model`` (written atomically).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

from covid_keras.core import files, provenance, schema
from covid_keras.io.run_dir import RunDir
from covid_keras.model.saving import takes_lung_mask

INFO_FILE = "covid_keras.json"
CLASS_NAMES_FILE = "class_names.txt"
WARMUP_FILE = "tf_serving_warmup_requests"
ASSETS_EXTRA = "assets.extra"
FORMAT_VERSION = 1


# ------------------------------------------------------------------ versions
def versions(model_dir: str) -> list[int]:
    """The integer version folders of ``<export_base>/<model_name>`` that hold a model."""
    if not os.path.isdir(model_dir):
        return []
    out = []
    for name in os.listdir(model_dir):
        if re.fullmatch(r"[0-9]+", name) and os.path.isfile(
                os.path.join(model_dir, name, "saved_model.pb")):
            out.append(int(name))
    return sorted(out)


def next_version(model_dir: str) -> int:
    if not os.path.isdir(model_dir):
        return 1
    taken = [int(n) for n in os.listdir(model_dir) if re.fullmatch(r"[0-9]+", n)]
    return max(taken, default=0) + 1


# ------------------------------------------------------------------ what goes in
def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def data_prep_settings(run_info: dict | None, input_size: int) -> tuple[dict, list[str]]:
    """The dataset's windows and data_prep preprocessing (from the training data's
    manifest.json, through run_info.json's data_dir; :class:`data_prep.settings.
    PrepSettings`), with warnings when they are unknown (data_prep's defaults at the
    model's size are then assumed, and ``settings`` is None)."""
    from data_prep.settings import RECORDED_FLAGS, PrepSettings

    warnings = []
    manifest = None
    data_dir = ((run_info or {}).get("flags") or {}).get("data_dir")
    if data_dir:
        try:
            manifest = _read_json(os.path.join(data_dir, schema.MANIFEST))
        except (OSError, ValueError):
            manifest = None
    if manifest is None:
        warnings.append("the training data's manifest.json is not readable: data_prep's "
                        f"default preprocessing at {input_size} px (lung window) is assumed")
        assumed = PrepSettings(image_size=int(input_size))
        return {"windows": assumed.windows_json(), "records_image_size": input_size,
                "flags": {"image_size": input_size}, "preprocessing": None,
                "settings": None, "dataset_manifest_sha256": None}, warnings
    settings = PrepSettings.from_manifest(manifest, input_size)
    sha = files.sha256(os.path.join(data_dir, schema.MANIFEST))
    return {"windows": settings.windows_json(),
            "records_image_size": int(manifest.get("image", {}).get("size", input_size)),
            "flags": {k: v for k, v in (manifest.get("flags") or {}).items()
                      if k in RECORDED_FLAGS},
            "preprocessing": manifest.get("preprocessing"),
            "settings": settings.to_dict(),
            "dataset_manifest_sha256": sha}, warnings


def decision_of(run_dir: str, class_names: list[str]) -> tuple[dict | None, list[str]]:
    from covid_keras.evaluation.decision import read_decision

    d = read_decision(run_dir)
    if d is None:
        return None, ["no decision.json in the run: predict_study decides by argmax (the "
                      "most probable class), without a threshold"]
    if d.get("classes") and list(d["classes"]) != list(class_names):
        raise ValueError(f"decision.json was chosen for classes {d['classes']}, the model "
                         f"has {class_names}")
    if d["positive_class"] not in class_names:
        raise ValueError(f"decision.json's positive class {d['positive_class']!r} is not one "
                         f"of the model's classes {class_names}")
    # read_decision fills normal_class (null: no normal class, the old any rule)
    return {k: d.get(k) for k in ("rule", "threshold", "positive_class", "normal_class",
                                  "criterion", "split", "criterion_value",
                                  "val_sensitivity", "val_specificity")}, []


def export_info(model_info: dict, prep: dict, decision: dict | None, run_info: dict | None,
                checkpoint: str, warnings: list[str]) -> dict:
    from covid_keras import __version__

    d = ({"method": "threshold", "source": "decision.json", **decision} if decision else
         {"method": "argmax", "source": "none (no decision.json in the run)",
          "rule": "mean", "threshold": None, "positive_class": None})
    info = {
        "format_version": FORMAT_VERSION,
        "class_names": list(model_info["class_names"]),
        "input_size": int(model_info["input_size"]),
        "backbone": model_info["backbone"],
        "normalisation": model_info["preprocessing"],
        # the model applies it itself (its first layer); absent / false: a model saved
        # before that layer, which the serving graph normalises for
        "include_preprocessing": bool(model_info.get("include_preprocessing", False)),
        "model": model_info.get("model"),
        "variant": model_info.get("variant"),
        "windows": prep["windows"],
        "data_prep": {"records_image_size": prep["records_image_size"],
                      "flags": prep["flags"], "preprocessing": prep["preprocessing"],
                      # data_prep.settings.PrepSettings: what predict prepares a study
                      # with (None: unknown, data_prep's defaults at the input size)
                      "settings": prep.get("settings")},
        "decision": d,
        "inputs": "windowed slices as in the records: uint8 pixel values (0..255, float32 "
                  "for serving_default / predict_study / gradcam), grey repeated on 3 "
                  "channels (or 3 windows), BEFORE the backbone's normalisation, which "
                  "the graph applies",
        "signatures": {
            "serving_default": {"inputs": {"images": "float32 (B, S, S, 3) 0..255"},
                                "outputs": {"probabilities": "(B, C) softmax",
                                            "boxes": "(B, K, 4) y0, x0, y1, x1 in input "
                                                     "pixels (K = 0 for a classifier)",
                                            "box_scores": "(B, K) in (0, 1]"}},
            "predict_images": {"inputs": {"image_bytes": "string (B,) PNG/JPEG bytes"},
                               "outputs": "as serving_default"},
            "predict_study": {"inputs": {"images": "float32 (N, S, S, 3): one study"},
                              "outputs": {"probabilities": "(C,) patient",
                                          "score": "() positive class's patient score",
                                          "decision": "() int32 class index",
                                          "decision_name": "() string",
                                          "threshold": "() float32, -1 = argmax",
                                          "rule": "() mean | any",
                                          "class_names": "(C,) string",
                                          "slice_probabilities": "(N, C)",
                                          "boxes": "(N, K, 4)", "box_scores": "(N, K)"}},
            "gradcam": {"inputs": {"images": "float32 (B, S, S, 3) 0..255",
                                   "class_index": "int32 (B,)"},
                        "outputs": {"heatmaps": "(B, S, S) in [0, 1]"}},
        },
        "covid_keras_version": __version__,
        "git_sha": provenance.git_sha(),
        "trained_git_sha": (run_info or {}).get("git_sha"),
        "checkpoint": os.path.basename(checkpoint),
        "dataset_manifest_sha256": prep["dataset_manifest_sha256"],
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warnings": list(warnings),
    }
    if takes_lung_mask(model_info):
        # "lung": the navigator chooses among anchors on a lung mask. predict_study and
        # gradcam take it (lung_masks); serving_default and predict_images set it to ones
        # (no restriction). An unrestricted model's info has no such key (as before).
        info["navigator_anchors"] = model_info["navigator_anchors"]
        masks = ("uint8 (N, S, S): each slice's lung mask, 255 = lung (the records' "
                 "mask/encoded at the input size)")
        sigs = info["signatures"]
        sigs["predict_study"]["inputs"]["lung_masks"] = masks
        sigs["gradcam"]["inputs"]["lung_masks"] = masks.replace("(N,", "(B,")
        for name in ("serving_default", "predict_images"):
            sigs[name]["navigator"] = "every anchor (a mask of ones: no lung restriction)"
    return info


def warmup_records(model_name: str, size: int, channels: int,
                   lung: bool = False) -> list[bytes]:
    """Serialized ``PredictionLog`` protos: one Predict request per signature (2 blank
    slices each; ``lung``: a lung model's ``predict_study`` and ``gradcam`` also get blank
    ``lung_masks``), TF Serving's ``assets.extra/tf_serving_warmup_requests`` format."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    from covid_keras.serving import serving_signatures as sig
    from data_prep.study import encode_png

    images = np.zeros((2, size, size, 3), np.float32)
    png = encode_png(np.zeros((size, size, channels), np.uint8))
    requests = {
        sig.SERVING_DEFAULT: {sig.IMAGES: images},
        sig.PREDICT_IMAGES: {sig.IMAGE_BYTES: np.array([png, png], dtype=object)},
        sig.PREDICT_STUDY: {sig.IMAGES: images},
        sig.GRADCAM: {sig.IMAGES: images, sig.CLASS_INDEX: np.zeros([2], np.int32)},
    }
    if lung:
        for name in (sig.PREDICT_STUDY, sig.GRADCAM):
            requests[name][sig.LUNG_MASKS] = np.zeros((2, size, size), np.uint8)
    out = []
    for name, inputs in requests.items():
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model_name
        req.model_spec.signature_name = name
        for key, value in inputs.items():
            req.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        entry = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=req))
        out.append(entry.SerializeToString())
    return out


# ------------------------------------------------------------------ writing
def write_saved_model(model, info: dict, decision: dict | None, path: str) -> None:
    """The SavedModel of ``model`` with the signatures of :mod:`serving_signatures`."""
    import keras

    from covid_keras.serving.serving_signatures import Signatures

    sigs = Signatures(model, info, decision)
    archive = keras.export.ExportArchive()
    archive.track(model)
    specs = sigs.input_signatures()
    for name, fn in sigs.functions().items():
        archive.add_endpoint(name, fn, input_signature=specs[name])
    archive.write_out(path, verbose=False)


def export_model(model, info: dict, decision: dict | None, export_base: str,
                 model_name: str, version: int | None = None) -> str:
    """Writes ``<export_base>/<model_name>/<version>/`` atomically; returns its path."""
    import tensorflow as tf

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name or ""):
        raise ValueError(f"--model_name must be letters, digits, '_', '.', '-'. Received: "
                         f"{model_name!r}")
    model_dir = os.path.join(export_base, model_name)
    os.makedirs(model_dir, exist_ok=True)
    if version is None:
        version = next_version(model_dir)
    if int(version) < 1:
        raise ValueError(f"--version must be a positive integer. Received: {version}")
    final = os.path.join(model_dir, str(int(version)))
    if os.path.exists(final):
        raise ValueError(f"version {version} of {model_name} already exists in "
                         f"{export_base} (pick another --version, or omit it for the next)")
    stage = os.path.join(model_dir, f".partial-{int(version)}-{os.getpid()}")
    if os.path.exists(stage):
        shutil.rmtree(stage)
    try:
        write_saved_model(model, info, decision, stage)
        extra = os.path.join(stage, ASSETS_EXTRA)
        os.makedirs(extra, exist_ok=True)
        files.write_json(os.path.join(extra, INFO_FILE), {**info, "model_name": model_name,
                                                          "version": int(version)})
        files.atomic_write_text(os.path.join(extra, CLASS_NAMES_FILE),
                                "".join(c + "\n" for c in info["class_names"]))
        with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as w:
            for rec in warmup_records(model_name, info["input_size"],
                                      len(info["windows"]),
                                      takes_lung_mask(info)):
                w.write(rec)
        if os.path.exists(final):
            raise ValueError(f"version {version} of {model_name} appeared while exporting")
        os.rename(stage, final)
    finally:
        if os.path.exists(stage):
            shutil.rmtree(stage, ignore_errors=True)
    return final


def check_run(run_dir: str, checkpoint: str | None = None) -> str:
    """The run folder's checkpoint file, or a one-line error (no TensorFlow import)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--run_dir {run_dir} is not a folder")
    return RunDir(run_dir).checkpoint(checkpoint)


def load_run(run_dir: str, checkpoint: str | None = None):
    """(model, export info, decision) of a run folder."""
    path = check_run(run_dir, checkpoint)
    run = RunDir(run_dir)
    model = run.load_model(path)
    minfo = model.covid_keras_info
    if minfo is None:
        raise ValueError(f"{os.path.basename(path)} carries no class names (saved before "
                         "covid_keras.model.saving.save_model): re-save it with save_model")
    run_info = run.run_info()
    prep, warnings = data_prep_settings(run_info, int(minfo["input_size"]))
    decision, more = decision_of(run_dir, minfo["class_names"])
    warnings += more
    info = export_info(minfo, prep, decision, run_info, path, warnings)
    if run.is_cross_validation():
        info["ensemble"] = ensemble_card(run)
    return model, info, decision


def ensemble_card(run: RunDir) -> dict:
    """An ensemble's entry of the export info and the model card (``train --folds``): how
    many members, their spread, and where its evidence comes from."""
    import json

    from covid_keras.core import files

    m = json.loads(files.read_text(run.metrics_path)) if run.has("metrics.json") else {}
    spread = m.get("fold_val_patient_auc") or {}
    return {"members": int(m.get("folds") or len(run.folds()["patients"])),
            "fold_val_patient_auc": {k: spread.get(k) for k in ("mean", "sd", "values")},
            "probabilities": "the mean of the members' class probabilities",
            "decision": "chosen on the out-of-fold predictions of every training patient",
            "boxes": "from the member most sure of the answered class",
            "heat_maps": "the mean of the members' Grad-CAM maps"}
