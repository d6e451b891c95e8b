"""covid_keras.export: SavedModels for TF Serving, tested without the server binary.

Round trip: each export (DRENet paper and code variants, a classifier baseline) is loaded
in a fresh process with tf.saved_model.load; every signature's outputs equal the in-memory
Keras model's. The in-graph slice decoding equals data_prep's slice-image reading. TF
Serving's request forms (PredictRequest protos, REST row and columnar JSON, b64 bytes, the
warm-up file) map onto the signatures.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import CLASSES3, fake_manifest, make_run, quiet_env

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def _images(n=4, seed=0):
    """Windowed slices as in the records: grey uint8 values repeated on 3 channels."""
    grey = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 1))
    return np.repeat(grey, 3, axis=-1).astype(np.float32)


def _model_input(model, images):
    """The pixel values as the model takes them (its spec: normalised only for a model
    without its own normalisation layer, as every model saved before it)."""
    import tensorflow as tf

    from covid_keras.io import data
    from covid_keras.model import saving

    cfg = data.PipelineConfig.for_model(saving.model_spec(model))
    return data.model_input(tf.constant(images), cfg)


def _keras_outputs(model, images):
    import tensorflow as tf

    out = model(_model_input(model, images), training=False)
    probs = tf.nn.softmax(out["logits"]).numpy()
    return probs, (out["boxes"].numpy() if "boxes" in out else None), (
        out["box_scores"].numpy() if "box_scores" in out else None)


# ------------------------------------------------------------------ slice decoding
def _png(img, depth16=False):
    if depth16:
        img = img.astype(np.uint16) * 257 + np.uint16(3)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _formats(rng, h=SIZE, w=SIZE):
    grey = rng.integers(0, 256, (h, w)).astype(np.uint8)
    rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (h, w, 1)).astype(np.uint8)], -1)
    smooth = cv2.GaussianBlur(rgb, (7, 7), 2)
    ok, jpg = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 90])
    ok2, jpg_grey = cv2.imencode(".jpg", cv2.GaussianBlur(grey, (7, 7), 2))
    assert ok and ok2
    return {"grey.png": _png(grey), "rgb.png": _png(rgb), "rgba.png": _png(rgba),
            "grey16.png": _png(grey, depth16=True), "rgb.jpg": jpg.tobytes(),
            "grey.jpg": jpg_grey.tobytes()}


def test_in_graph_grey_equals_data_prep_read_grey(tmp_path):
    import tensorflow as tf

    from covid_keras.serving import serving_signatures as sig
    from data_prep import slice_images

    for name, data in _formats(np.random.default_rng(1), 37, 53).items():
        path = tmp_path / name
        path.write_bytes(data)
        want, _ = slice_images.read_grey(str(path), "study")
        got = sig.to_grey_u8(sig.decode_u8(tf.constant(data))).numpy()[..., 0]
        assert got.shape == want.shape, name
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() == 0, (name, diff.max(), diff.mean())


@pytest.mark.parametrize("shape", [(50, 30), (100, 70), (64, 64), (130, 128)])
def test_pad_and_resize_follow_data_prep(shape):
    """Centred on black, then area (shrink) or linear (enlarge) as prepare_slice; equal
    to OpenCV (data_prep's resizer) within one grey level."""
    import tensorflow as tf

    from covid_keras.serving import serving_signatures as sig

    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.uint8), (5, 5), 1.5)
    h, w = shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
    interp = cv2.INTER_AREA if side > SIZE else cv2.INTER_LINEAR
    want = square if side == SIZE else cv2.resize(square, (SIZE, SIZE),
                                                  interpolation=interp)
    got = sig.pad_square_resize_u8(tf.constant(img[..., None]), SIZE).numpy()[..., 0]
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.1, (shape, diff.max(), diff.mean())


def test_record_png_decodes_as_the_input_pipeline():
    import tensorflow as tf

    from covid_keras.io import data
    from covid_keras.serving import serving_signatures as sig
    from data_prep.study import encode_png

    img = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 1)).astype(np.uint8)
    png = encode_png(img)  # what data_prep writes into image/encoded
    got = sig.decode_slice_u8(tf.constant(png), SIZE, 1).numpy()
    np.testing.assert_array_equal(got, data.decode_image(png, SIZE).numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a PNG or JPEG"):
        sig.decode_slice_u8(tf.constant(b"GIF89a not an image"), SIZE, 1)


# ------------------------------------------------------------------ patient decisions
class _FixedProbs:
    """A stand-in model: its logits are log(probs) of fixed slice probabilities."""

    def __init__(self, probs):
        self.probs = np.asarray(probs, np.float32)

    def __call__(self, x, training=False):
        import tensorflow as tf

        return {"logits": tf.math.log(tf.constant(self.probs))}


def _study(classes, decision, probs, graph=False):
    """predict_study's outputs for one study whose slices have ``probs``."""
    import tensorflow as tf

    from covid_keras.serving.serving_signatures import Signatures

    sigs = Signatures(_FixedProbs(probs), {"input_size": 8, "backbone": "tiny",
                                           "class_names": classes}, decision)
    fn = sigs.predict_study
    if graph:
        fn = tf.function(fn, input_signature=[sigs.image_spec()])
    out = fn(tf.zeros([len(probs), 8, 8, 3], tf.float32))
    return {k: np.asarray(v.numpy()) for k, v in out.items()}


def _evaluated(classes, decision, probs):
    """evaluation's patient decision (patients.csv) for one patient with ``probs``."""
    from covid_keras.evaluation import evaluation

    n = len(probs)
    preds = evaluation.Predictions(list(classes), np.zeros(n, int), np.asarray(probs),
                                   ["p"] * n, ["s"] * n, np.arange(n), ["a"] * n)
    r = evaluation.evaluate_predictions(preds, dict(decision, classes=classes),
                                        n_bootstrap=0)
    return classes[int(r["_patient_pred"][0])]


SEED004_CASES = [  # (slice probabilities of normal, covid, bacterial; decision at 0.5)
    ([[0.6, 0.3, 0.1], [0.3, 0.05, 0.65], [0.9, 0.05, 0.05]], "bacterial"),
    ([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05]], "normal"),
    ([[0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1]], "covid"),
    ([[0.3, 0.2, 0.5]], "bacterial"),
]


def test_predict_study_decides_as_evaluation_and_decide_patient():
    """Seed 004's 'any' rule (normal only if every slice is): the serving signature (eager
    and traced), evaluation's patient decision and decide_patient agree, on hand-made
    studies and on random ones (2 to 5 classes, both rules, with and without a normal
    class, old decision files without the field)."""
    from covid_keras.evaluation import evaluation

    old = {"rule": "any", "threshold": 0.5, "positive_class": "covid"}  # no normal_class
    for probs, want in SEED004_CASES:
        for graph in (False, True):
            out = _study(CLASSES3, old, probs, graph)
            assert out["decision_name"].item().decode() == want
            assert CLASSES3[int(out["decision"])] == want
            assert float(out["score"]) == pytest.approx(max(p[1] for p in probs), abs=1e-6)
            np.testing.assert_allclose(out["probabilities"],
                                       probs[int(np.argmax([p[1] for p in probs]))],
                                       atol=1e-6)
        assert _evaluated(CLASSES3, old, probs) == want
        assert evaluation.decide_patient(np.asarray(probs), dict(old, classes=CLASSES3))[
            "decision"] == want
    # normal_class null: the old rule; the first study was called normal then
    out = _study(CLASSES3, dict(old, normal_class=None), SEED004_CASES[0][0])
    assert out["decision_name"].item().decode() == "normal"

    rng = np.random.default_rng(11)
    class_sets = [["normal", "covid"], CLASSES3, ["covid", "bacterial", "viral"],
                  ["normal", "covid", "viral", "bacterial", "tuberculosis"]]
    checked = {"any_normal": 0, "changed": 0}
    for trial in range(120):
        classes = class_sets[trial % len(class_sets)]
        n = int(rng.integers(1, 7))
        probs = rng.dirichlet(np.full(len(classes), 0.7), size=n)
        probs = probs.astype(np.float32).astype(np.float64)
        probs /= probs.sum(1, keepdims=True)
        d = {"rule": ("any", "mean")[trial % 3 == 2],
             "threshold": float(rng.uniform(0.2, 0.8)), "positive_class": "covid"}
        if trial % 5 == 4:
            d["normal_class"] = None
        want = evaluation.decide_patient(probs, dict(d, classes=classes))
        out = _study(classes, d, probs)
        assert out["decision_name"].item().decode() == want["decision"], (classes, d, probs)
        assert _evaluated(classes, d, probs) == want["decision"]
        assert float(out["score"]) == pytest.approx(want["score"], abs=1e-5)
        np.testing.assert_allclose(out["probabilities"], want["probs"], atol=1e-5)
        if d["rule"] == "any" and want["normal_class"] and len(classes) > 2:
            checked["any_normal"] += 1
            oldway = evaluation.decide_patient(probs, dict(d, classes=classes,
                                                           normal_class=None))
            checked["changed"] += oldway["decision"] != want["decision"]
    assert checked["any_normal"] >= 20 and checked["changed"] >= 3, checked


# ------------------------------------------------------------------ exports
@pytest.fixture(scope="module")
def exported(tmp_path_factory, commands):
    """{kind: (run_dir, version_dir)}: DRENet paper (decision 'any'), DRENet code (no
    decision.json; with the per-image input normalisation layer), classifier (decision
    'mean'), exported through the CLI for the first."""
    from covid_keras.serving import exporter

    root = tmp_path_factory.mktemp("export")
    data_dir = fake_manifest(root / "tfrecords")
    runs = {
        "drenet": make_run(root / "drenet", "drenet", {"rule": "any", "threshold": 0.335,
                                                       "positive_class": "covid"}, data_dir),
        "drenet_code": make_run(root / "code", "drenet_code", None, None, seed=1,
                                input_norm="per_image", include_preprocessing=False),
        "classifier": make_run(root / "clf", "classifier", {"rule": "mean",
                                                            "threshold": 0.5,
                                                            "positive_class": "covid"},
                               data_dir, seed=2),
    }
    base = root / "exports"
    proc = commands.run("covid_keras.export", f"--run_dir={runs['drenet']}",
                        f"--export_base={base}", "--model_name=drenet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported drenet version 1" in proc.stdout
    out = {"drenet": (runs["drenet"], base / "drenet" / "1")}
    for kind in ("drenet_code", "classifier"):
        model, info, decision = exporter.load_run(str(runs[kind]))
        out[kind] = (runs[kind], Path(exporter.export_model(model, info, decision, str(base),
                                                            kind)))
    return out


FRESH = r'''
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
args = json.loads(sys.argv[1])
inputs = np.load(args["inputs"], allow_pickle=True)
result = {}
for kind, path in args["exports"].items():
    loaded = tf.saved_model.load(path)
    sigs = loaded.signatures
    result[kind + "/signatures"] = np.array(sorted(sigs))
    calls = {
        "serving_default": {"images": inputs["images"]},
        "predict_images": {"image_bytes": inputs["image_bytes"]},
        "predict_study": {"images": inputs["images"]},
        "gradcam": {"images": inputs["images"], "class_index": inputs["class_index"]},
    }
    for name, kw in calls.items():
        out = sigs[name](**{k: tf.constant(v) for k, v in kw.items()})
        for key, value in out.items():
            result[f"{kind}/{name}/{key}"] = value.numpy()
    n = 0
    for raw in tf.data.TFRecordDataset(path + "/assets.extra/tf_serving_warmup_requests"):
        req = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
        fn = sigs[req.model_spec.signature_name]
        out = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in req.inputs.items()})
        assert all(np.isfinite(v.numpy()).all() for v in out.values()
                   if v.dtype.is_floating), req.model_spec.signature_name
        n += 1
    result[kind + "/warmup"] = np.array(n)
np.savez(args["out"], **result)
'''


@pytest.mark.slow
def test_round_trip_in_a_fresh_process(exported, tmp_path):
    """Every signature of every export, loaded in a fresh process, equals the in-memory
    Keras model (<= 1e-4); predict_study equals evaluation.aggregate + decide."""
    from covid_keras.evaluation import evaluation, gradcam
    from covid_keras.model.saving import load_model

    images = _images()
    rng = np.random.default_rng(5)
    png = [_png(images[0, ..., 0].astype(np.uint8)),
           _png(np.repeat(images[1, ..., :1], 3, -1).astype(np.uint8)),  # grey as RGB
           _png(images[2, ..., 0].astype(np.uint8), depth16=False),
           _formats(rng)["rgba.png"]]
    rgba = cv2.imdecode(np.frombuffer(png[3], np.uint8), cv2.IMREAD_UNCHANGED)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    composited = np.rint(rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    grey_rgba = cv2.cvtColor(composited, cv2.COLOR_BGR2GRAY)
    png_images = images.copy()
    png_images[3] = np.repeat(grey_rgba[..., None], 3, -1).astype(np.float32)
    class_index = np.array([0, 1, 1, 0], np.int32)  # the classifier has 2 classes
    np.savez(tmp_path / "in.npz", images=images, image_bytes=np.array(png, dtype=object),
             class_index=class_index)
    args = {"inputs": str(tmp_path / "in.npz"), "out": str(tmp_path / "out.npz"),
            "exports": {k: str(v) for k, (_, v) in exported.items()}}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(args)], cwd=REPO,
                          env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz", allow_pickle=True)
    for kind, (run_dir, export_dir) in exported.items():
        model = load_model(str(run_dir / "best.keras"), compile=False)
        if kind == "drenet_code":  # the export computes the per-image normalisation too
            assert model.get_layer("input_norm").scale == 0.5
        info = model.covid_keras_info
        classes = info["class_names"]
        assert sorted(got[f"{kind}/signatures"]) == sorted(
            ["serving_default", "predict_images", "predict_study", "gradcam"])
        assert int(got[f"{kind}/warmup"]) == 4
        # drenet_code: a model saved before BackboneNormalization (normalised input)
        assert model.covid_keras_info["include_preprocessing"] == (kind != "drenet_code")
        probs, boxes, scores = _keras_outputs(model, images)
        np.testing.assert_allclose(got[f"{kind}/serving_default/probabilities"], probs,
                                   atol=1e-4)
        if boxes is None:
            assert got[f"{kind}/serving_default/boxes"].shape == (4, 0, 4)
        else:
            # clipped to the image: the navigator's anchors may extend past it
            np.testing.assert_allclose(got[f"{kind}/serving_default/boxes"],
                                       np.clip(boxes, 0, SIZE), atol=1e-4)
            np.testing.assert_allclose(got[f"{kind}/serving_default/box_scores"], scores,
                                       atol=1e-4)
        p_png, _, _ = _keras_outputs(model, png_images)
        np.testing.assert_allclose(got[f"{kind}/predict_images/probabilities"], p_png,
                                   atol=1e-4)
        # predict_study: the stored rule and threshold, as evaluation applies them
        decision = evaluation.read_decision(str(run_dir))
        study = {k.split("/")[-1]: got[k] for k in got.files
                 if k.startswith(f"{kind}/predict_study/")}
        np.testing.assert_allclose(study["slice_probabilities"], probs, atol=1e-4)
        assert [c.decode() for c in study["class_names"]] == classes
        if decision is None:
            want = probs.mean(0)
            assert int(study["decision"]) == int(np.argmax(want))
            assert float(study["threshold"]) == -1.0
        else:
            pos = classes.index(decision["positive_class"])
            pats = evaluation.aggregate(probs, np.zeros(4, int), ["p"] * 4, decision["rule"],
                                        pos)
            want = pats.probs[0]
            normal = evaluation.normal_class_of(decision, classes)  # old file: inferred
            assert normal == ("normal" if kind == "drenet" else None)
            assert int(study["decision"]) == int(evaluation.patient_decisions(
                probs, pats, decision["threshold"], pos, decision["rule"],
                None if normal is None else classes.index(normal))[0])
            assert classes[int(study["decision"])] == evaluation.decide_patient(
                probs, decision)["decision"]
            assert study["rule"].item().decode() == decision["rule"]
            assert abs(float(study["threshold"]) - decision["threshold"]) < 1e-6
        np.testing.assert_allclose(study["probabilities"], want, atol=1e-4)
        assert study["decision_name"].item().decode() == classes[int(study["decision"])]
        # gradcam: the project's Grad-CAM on the Keras model
        cam = gradcam.GradCAM(model)
        x = np.asarray(_model_input(model, images))
        want_cam = np.stack([cam(x[i:i + 1], int(c))[0] for i, c in enumerate(class_index)])
        np.testing.assert_allclose(got[f"{kind}/gradcam/heatmaps"], want_cam, atol=1e-4)


@pytest.mark.slow
def test_assets_extra_and_versions(exported, tmp_path):
    from covid_keras import __version__
    from covid_keras.serving import exporter

    run_dir, export_dir = exported["drenet"]
    extra = export_dir / "assets.extra"
    info = json.loads((extra / "covid_keras.json").read_text())
    assert info["class_names"] == CLASSES3
    assert (extra / "class_names.txt").read_text().split() == CLASSES3
    assert info["input_size"] == SIZE and info["backbone"] == "tiny"
    assert info["normalisation"] == "tf" and info["model"] == "drenet"
    assert info["windows"] == [{"name": "lung", "level_hu": -700.0, "width_hu": 1500.0}]
    assert info["data_prep"]["flags"]["min_slices"] == 5
    assert "input" not in info["data_prep"]["flags"]  # the training machine's paths stay
    assert "/secret" not in (extra / "covid_keras.json").read_text()
    assert info["decision"]["rule"] == "any" and info["decision"]["threshold"] == 0.335
    assert info["decision"]["method"] == "threshold"
    assert info["covid_keras_version"] == __version__
    assert info["trained_git_sha"] == "abc123" and info["git_sha"]
    assert info["model_name"] == "drenet" and info["version"] == 1
    code = json.loads((exported["drenet_code"][1] / "assets.extra" /
                       "covid_keras.json").read_text())
    assert code["decision"]["method"] == "argmax" and code["variant"] == "code"
    assert any("no decision.json" in w for w in code["warnings"])
    assert any("manifest.json is not readable" in w for w in code["warnings"])
    # the next version without --version; an explicit existing one is refused
    model, info, decision = exporter.load_run(str(run_dir))
    base = export_dir.parent.parent
    assert exporter.export_model(model, info, decision, str(base), "drenet").endswith(
        os.sep + "2")
    with pytest.raises(ValueError, match="already exists"):
        exporter.export_model(model, info, decision, str(base), "drenet", version=1)
    assert exporter.versions(str(base / "drenet")) == [1, 2]


def test_export_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves neither the version folder nor the staging folder."""
    from covid_keras.serving import exporter

    run = make_run(tmp_path / "run", "classifier", None)
    model, info, decision = exporter.load_run(str(run))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "warmup_records", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        exporter.export_model(model, info, decision, str(tmp_path / "base"), "clf")
    assert os.listdir(tmp_path / "base" / "clf") == []
    monkeypatch.undo()
    path = exporter.export_model(model, info, decision, str(tmp_path / "base"), "clf")
    assert sorted(os.listdir(tmp_path / "base" / "clf")) == ["1"]
    assert (Path(path) / "saved_model.pb").is_file()
    assert (Path(path) / "variables").is_dir()


def test_cli_errors_are_one_line(tmp_path, commands):
    proc = commands.run("covid_keras.export", f"--run_dir={tmp_path / 'nope'}",
                        f"--export_base={tmp_path}", timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("covid_keras.export: error: ")
    assert "is not a folder" in proc.stderr


# ------------------------------------------------------------------ request forms
@pytest.mark.slow
def test_predict_requests_and_rest_bodies_map_onto_the_signatures(exported):
    """PredictRequest protos (tensorflow-serving-api) and REST bodies in the row
    ("instances") and columnar ("inputs") forms, bytes as {"b64": ...}, reach the
    signatures and give what a direct call gives."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from covid_keras.serving import model_server

    _, export_dir = exported["drenet"]
    servable = model_server.Servable("drenet", 1, str(export_dir))
    images = _images(2)
    png = [_png(images[i, ..., 0].astype(np.uint8)) for i in range(2)]
    direct = {k: v.numpy() for k, v in servable.signatures["serving_default"](
        images=tf.constant(images)).items()}

    # gRPC: a PredictRequest's TensorProtos
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "drenet"
    req.model_spec.signature_name = "predict_images"
    req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.array(png, dtype=object)))
    req = predict_pb2.PredictRequest.FromString(req.SerializeToString())
    out = servable.run(req.model_spec.signature_name,
                       {k: tf.make_ndarray(v) for k, v in req.inputs.items()})
    np.testing.assert_allclose(out["probabilities"], direct["probabilities"], atol=1e-5)

    b64 = [{"b64": base64.b64encode(p).decode()} for p in png]
    bodies = [
        ({"instances": images.tolist()}, "serving_default"),
        ({"instances": [{"images": im} for im in images.tolist()]}, "serving_default"),
        ({"inputs": images.tolist()}, "serving_default"),
        ({"inputs": {"images": images.tolist()}}, "serving_default"),
        ({"signature_name": "predict_images", "instances": b64}, "predict_images"),
        ({"signature_name": "predict_images", "inputs": {"image_bytes": b64}},
         "predict_images"),
    ]
    for body, sig in bodies:
        body = json.loads(json.dumps(body))  # as it arrives over HTTP
        inputs, rows = model_server.parse_predict_body(body, sorted(servable.input_specs(sig)))
        resp = model_server.format_predict_response(servable.run(sig, inputs), rows)
        if rows:
            got = np.array([p["probabilities"] for p in resp["predictions"]])
            boxes = np.array([p["boxes"] for p in resp["predictions"]])
        else:
            got = np.array(resp["outputs"]["probabilities"])
            boxes = np.array(resp["outputs"]["boxes"])
        np.testing.assert_allclose(got, direct["probabilities"], atol=1e-5, err_msg=str(sig))
        np.testing.assert_allclose(boxes, direct["boxes"], atol=1e-4)
    # several inputs (gradcam): row objects or a columnar object
    for body in ({"signature_name": "gradcam", "instances": [
                    {"images": images[i].tolist(), "class_index": i} for i in range(2)]},
                 {"signature_name": "gradcam", "inputs": {
                     "images": images.tolist(), "class_index": [0, 1]}}):
        inputs, rows = model_server.parse_predict_body(body, ["class_index", "images"])
        resp = model_server.format_predict_response(servable.run("gradcam", inputs), rows)
        heat = np.array(resp["predictions"] if rows else resp["outputs"])
        assert heat.shape == (2, SIZE, SIZE)
    # predict_study: the columnar form (its outputs are per study, not per instance)
    inputs, rows = model_server.parse_predict_body({"inputs": {"images": images.tolist()}},
                                                   ["images"])
    resp = model_server.format_predict_response(servable.run("predict_study", inputs), rows)
    assert resp["outputs"]["class_names"] == CLASSES3
    assert resp["outputs"]["decision_name"] in CLASSES3
    with pytest.raises(model_server.ServingError, match="columnar"):
        model_server.format_predict_response(servable.run("predict_study", inputs), True)
    # malformed bodies
    for body, msg in (({"instances": [], }, "non-empty"), ({}, "exactly one"),
                      ({"instances": [1], "inputs": [1]}, "exactly one"),
                      ({"instances": [{"b64": "!!"}]}, "base64"),
                      ({"instances": [[1, 2], [3]]}, "ragged"),
                      ({"instances": [1], "extra": 1}, "unknown request keys")):
        with pytest.raises(model_server.ServingError, match=msg):
            model_server.parse_predict_body(body, ["images"])
    for inputs, msg in (({"images": np.zeros((1, 8, 8, 3))}, "expected shape"),
                        ({"imagez": np.zeros((1, SIZE, SIZE, 3))}, "missing"),
                        ({"images": np.array([b"x"], dtype=object)}, "expected float32")):
        with pytest.raises(model_server.ServingError, match=msg):
            servable.run("serving_default", inputs)
    with pytest.raises(model_server.ServingError, match="not a PNG or JPEG"):
        servable.run("predict_images", {"image_bytes": np.array([b"nope"], dtype=object)})
    # the check must run before the model: without a control dependency the graph ran an
    # op that failed on the empty batch first in about 7 calls in 100 ("Incompatible
    # shapes"), so one call would pass by luck
    for _ in range(50):
        with pytest.raises(model_server.ServingError, match="at least one slice"):
            servable.run("predict_study", {"images": np.zeros((0, SIZE, SIZE, 3),
                                                              np.float32)})


def test_export_keeps_the_decisions_normal_class_null_included(tmp_path):
    # decision_of carries normal_class into the export (covid_keras.json and predict_study):
    # an explicit null (the old any rule) must not be re-inferred as "normal".
    from covid_keras.serving import exporter

    run = tmp_path / "run"
    run.mkdir()
    base = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "classes": CLASSES3,
            "split": "val"}
    for stored, want in ((None, None), ("normal", "normal")):
        (run / "decision.json").write_text(json.dumps(dict(base, normal_class=stored)))
        decision, _ = exporter.decision_of(str(run), list(CLASSES3))
        assert "normal_class" in decision and decision["normal_class"] == want
    (run / "decision.json").write_text(json.dumps(base))  # written before the field
    decision, _ = exporter.decision_of(str(run), list(CLASSES3))
    assert decision["normal_class"] == "normal"
    probs, answer = SEED004_CASES[0]
    old_rule = _study(CLASSES3, dict(base, normal_class=None), probs)
    assert CLASSES3[int(old_rule["decision"])] == "normal" != answer
