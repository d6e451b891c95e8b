"""Evidence a user can trust: boxes inside the image wherever they leave the model (the
serving signatures, evaluation's predictions, predict's and the report's pictures), the
lung outline drawn with them, and slices without lung flagged by ``predict_study``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

SIZE = 32
CLASSES = ["normal", "covid"]
# boxes as the navigator may give them: anchors past every edge (y0 = -2.29, the issue's)
RAW_BOXES = np.array([[[-2.29, 4.0, 20.0, 40.5], [10.0, -7.0, 35.0, 12.0]]], np.float32)


class _BoxModel:
    """Stands for DRENet in the signatures: fixed logits and out-of-image boxes."""

    def __call__(self, x, training=False):
        import tensorflow as tf

        n = tf.shape(x)[0]
        return {"logits": tf.zeros([n, 2]),
                "boxes": tf.tile(tf.constant(RAW_BOXES), [n, 1, 1]),
                "box_scores": tf.fill([n, 2], 0.5)}


def _signatures(**prep):
    from covid_keras.serving.serving_signatures import Signatures

    info = {"input_size": SIZE, "backbone": "tiny", "class_names": CLASSES}
    if prep:
        info["data_prep"] = {"preprocessing": prep}
    return Signatures(_BoxModel(), info, None)


def _lung_slice(lung: float) -> np.ndarray:
    """A prepared slice: black outside the lung, ``lung`` of its pixels grey."""
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    img.reshape(-1, 3)[: int(round(lung * SIZE * SIZE))] = 90.0
    return img


@pytest.mark.parametrize("graph", [False, True])
def test_signatures_clip_boxes_to_the_image(graph):
    import tensorflow as tf

    sigs = _signatures()
    x = tf.constant(np.stack([_lung_slice(0.5)] * 2))
    for name in ("serving_default", "predict_study"):
        fn = getattr(sigs, name)
        if graph:
            fn = tf.function(fn, input_signature=[sigs.image_spec()])
        boxes = fn(x)["boxes"].numpy()
        assert boxes.shape == (2, 2, 4)
        assert boxes.min() >= 0.0 and boxes.max() <= SIZE, (name, boxes)
        np.testing.assert_allclose(boxes[0], np.clip(RAW_BOXES[0], 0, SIZE))


@pytest.mark.parametrize("graph", [False, True])
def test_predict_study_flags_slices_and_studies_without_lung(graph):
    """An all-black study came back 'bacterial 0.999' with no warning."""
    import tensorflow as tf

    sigs = _signatures()
    fn = sigs.predict_study
    if graph:
        fn = tf.function(fn, input_signature=[sigs.image_spec()])

    def run(*lungs):
        out = fn(tf.constant(np.stack([_lung_slice(v) for v in lungs])))
        return out["warning"].numpy().decode(), out["lung_fraction"].numpy()

    warning, fraction = run(0.0, 0.0)  # all black
    assert warning == "no_lung" and fraction.tolist() == [0.0, 0.0]
    warning, fraction = run(0.5, 0.01)
    assert warning == "no_lung_slices"
    np.testing.assert_allclose(fraction, [0.5, 0.01], atol=1 / SIZE ** 2)
    assert run(0.5, 0.3)[0] == ""
    # the threshold is the records' data_prep min_lung_fraction
    strict = _signatures(min_lung_fraction=0.4).predict_study
    assert strict(tf.constant(np.stack([_lung_slice(0.3)])))["warning"].numpy() == b"no_lung"


def test_serving_default_says_it_does_not_check_for_lung():
    from covid_keras.serving import serving_signatures

    doc = " ".join(serving_signatures.__doc__.split())
    assert "``serving_default`` and ``predict_images`` do not check that a slice shows " \
           "lung" in doc


# ------------------------------------------------------------------ records
def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def disk(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - 36) ** 2 + (xx - 30) ** 2) < 18 ** 2).astype(np.uint8) * 255


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Two patients' slices with a disk-shaped lung mask (64 px)."""
    import tensorflow as tf

    from covid_keras.core import schema

    root = tmp_path_factory.mktemp("evidence") / "tfrecords"
    root.mkdir()
    mask = disk()
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(root / "test-00000-of-00001.tfrecord.gz"), "GZIP") as w:
        for c, name in enumerate(CLASSES):
            key = f"p{c}".ljust(16, "0")
            img = (rng.uniform(20, 120, (64, 64)) * (mask > 0)).astype(np.uint8)
            w.write(schema.serialize({
                schema.IMAGE: _png(img), schema.HEIGHT: 64, schema.WIDTH: 64,
                schema.CHANNELS: 1, schema.MASK: _png(mask), schema.LABEL_NAME: name,
                schema.LABEL_INDEX: c, schema.PATIENT_KEY: key, schema.STUDY_KEY: key,
                schema.SERIES_KEY: key, schema.SOP_KEY: key + "0", schema.SLICE_INDEX: 0,
                schema.SLICE_COUNT: 1, schema.POSITION_MM: 0.0, schema.LUNG_FRACTION: 0.3,
                schema.SITE: "A", schema.SPLIT: "test"}))
    (root / "manifest.json").write_text(json.dumps({"classes": CLASSES, "counts": {
        "test": {n: {"A": {"patients": 1, "slices": 1, "studies": 1}} for n in CLASSES}}}))
    return root


def test_evaluation_predictions_clip_boxes(records):
    """slices.csv, the report and TensorBoard read these predictions."""
    from covid_keras.evaluation.evaluation import SplitPredictor
    from covid_keras.io import data

    predictor = SplitPredictor(str(records), "test", 2, data.PipelineConfig(input_size=64,
                                                                             backbone="tiny"))
    raw = np.array([[[-2.29, 3.0, 70.0, 40.0]], [[5.0, -1.0, 20.0, 64.5]]])
    preds = predictor.predictions(None, CLASSES, outputs={
        "logits": np.zeros((2, 2)), "boxes": raw, "box_scores": np.ones((2, 1))})
    np.testing.assert_array_equal(preds.outputs["boxes"], np.clip(raw, 0, 64))


def _cyan_pixels(rgb: np.ndarray, colour=(64, 224, 255), tol: int = 40) -> int:
    return int((np.abs(rgb[..., :3].astype(int) - np.array(colour)).max(-1) < tol).sum())


def test_report_draws_the_lung_outline_with_the_boxes(records, tmp_path):
    import keras
    from PIL import Image

    from covid_keras.evaluation import evaluation as ev
    from covid_keras.evaluation import report
    from covid_keras.io import data
    from covid_keras.model import saving
    from covid_keras.model.drenet import build_drenet

    keras.utils.set_random_seed(0)
    model = build_drenet(2, input_size=64, backbone="tiny")
    predictor = ev.SplitPredictor(str(records), "test", 2, data.PipelineConfig.for_model(
        saving.model_spec(model)))
    masks = report.lung_masks(predictor, [0, 1])
    np.testing.assert_array_equal(masks[1], disk() > 0)
    preds = predictor.predictions(model, CLASSES)
    assert preds.outputs["boxes"].min() >= 0 and preds.outputs["boxes"].max() <= 64
    result = ev.evaluate_predictions(preds, {"rule": "mean", "threshold": 0.5,
                                             "positive_class": "covid"}, n_bootstrap=0)

    class NoRecords:  # the same images, no masks to read
        cfg = predictor.cfg
        images_u8 = predictor.images_u8

    counts = {}
    for name, source in (("with", predictor), ("without", NoRecords())):
        out = report.write_explanations(str(tmp_path / name), model, source, preds, result,
                                        top=1)
        png = np.asarray(Image.open(tmp_path / name / out[0]["file"]).convert("RGB"))
        counts[name] = _cyan_pixels(png[: png.shape[0] // 2])  # the top row: slices
    assert counts["without"] == 0 and counts["with"] > 50, counts


def test_predict_evidence_png_draws_the_lung_outline_and_clips_boxes():
    import cv2

    from covid_keras.serving.predictor import LUNG_OUTLINE_RGB, evidence_png

    image = np.repeat(((disk() > 0) * 100).astype(np.uint8)[..., None], 3, axis=-1)
    boxes = np.array([[-2.29, -5.0, 30.0, 80.0]])
    plain = cv2.imdecode(np.frombuffer(evidence_png(image, boxes, np.ones(1), None), np.uint8),
                         cv2.IMREAD_COLOR)[..., ::-1]
    lined = cv2.imdecode(np.frombuffer(evidence_png(image, boxes, np.ones(1), None, disk()),
                                       np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert plain.shape == lined.shape == (256, 256, 3)
    assert _cyan_pixels(plain, LUNG_OUTLINE_RGB, 8) == 0
    assert _cyan_pixels(lined, LUNG_OUTLINE_RGB, 8) > 100  # the disk's rim, 4x


def test_predict_no_lung_warning_names_the_slices():
    from covid_keras.serving.predictor import _no_lung_warnings, warning_lines

    assert _no_lung_warnings([False, False], 0.05) == []
    some = _no_lung_warnings([False, True, True], 0.05)
    assert [w["reason"] for w in some] == ["no_lung"]
    assert "2 of 3 slices show no lung (slices 1, 2)" in some[0]["detail"]
    every = _no_lung_warnings([True, True], 0.05)
    assert "no slice shows lung" in every[0]["detail"] and "0.05" in every[0]["detail"]
    assert warning_lines(every)[0].startswith("warning: no_lung: no slice shows lung")
