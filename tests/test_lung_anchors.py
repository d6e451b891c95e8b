"""Issue 30 item 4: ``--navigator_anchors=lung``, the navigator's anchors restricted to the
lung mask (tiny backbone, 64 px, CPU).

The layer and model tests are pure Keras (``model`` mark: they run under TensorFlow and
JAX); the input pipeline, the saved file in a fresh process, the export's signatures and
the trainer are TensorFlow's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
tf_only = pytest.mark.skipif(BACKEND != "tensorflow",
                             reason="TensorFlow's input pipeline / SavedModel: TF pass only")


def brute_overlap(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(S, S) mask, (A, 4) boxes -> (A,) the mask's mean over each box's part inside the
    image, on pixels split 7 x 7 (exact for boxes on the 1/7 pixel grid: a 64 px model's
    anchors, whose edges are multiples of 8 / 448 of the side, 8 / 7 px)."""
    s = mask.shape[0]
    fine = np.kron(mask, np.ones((7, 7)))
    out = []
    for y0, x0, y1, x1 in boxes * 7:
        ya, yb = int(round(max(y0, 0))), int(round(min(y1, 7 * s)))
        xa, xb = int(round(max(x0, 0))), int(round(min(x1, 7 * s)))
        out.append(fine[ya:yb, xa:xb].mean())
    return np.asarray(out)


def box_overlap(mask: np.ndarray, box) -> float:
    """The mask's mean over the part of ``box`` (y0, x0, y1, x1) inside the image, exact for
    any box (pixel areas)."""
    s = mask.shape[0]
    p = np.arange(s, dtype=np.float64)
    ry = np.clip(np.minimum(box[2], p + 1) - np.maximum(box[0], p), 0, 1)
    rx = np.clip(np.minimum(box[3], p + 1) - np.maximum(box[1], p), 0, 1)
    return float(ry @ mask @ rx / (ry.sum() * rx.sum()))


# ------------------------------------------------------------------ layers
@pytest.mark.model
@pytest.mark.parametrize("size", [64, 100])
def test_overlap_layer_is_the_mask_mean_over_each_anchor(size, tmp_path):
    from covid_keras.model.layers import AnchorLungOverlap, anchor_boxes
    from covid_keras.model.layers.anchors import PAPER_LEVELS
    from tests.layer_helper import run_layer_test

    rng = np.random.default_rng(size)
    mask = (rng.uniform(size=(2, size, size, 1)) > 0.6).astype(np.float32)
    mask[1] = 0.0
    mask[1, size // 2:, : size // 3] = 1.0
    out = run_layer_test(tmp_path, AnchorLungOverlap, {"input_size": size,
                                                       "levels": PAPER_LEVELS},
                         mask, (2, 245), 0)
    boxes = anchor_boxes(size, PAPER_LEVELS)
    for b in range(2):
        want = [box_overlap(mask[b, ..., 0].astype(np.float64), box) for box in boxes]
        np.testing.assert_allclose(out[b], want, atol=1e-5)
    if size == 64:  # the 1/7 grid: a second, independent computation
        np.testing.assert_allclose(out[1], brute_overlap(mask[1, ..., 0], boxes), atol=1e-5)
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


def _decoy_scores(boxes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Anchor scores that prefer the anchors off the mask (a bright decoy): the lower an
    anchor's lung share, the higher its score."""
    share = np.asarray([box_overlap(mask, b) for b in boxes])
    return (1.0 - share + 0.01 * np.arange(len(boxes)) / len(boxes)).astype(np.float32)


@pytest.mark.model
def test_topk_chooses_only_anchors_on_the_lung_and_falls_back_to_all(tmp_path):
    from covid_keras.model.layers import AnchorLungOverlap, TopKNMS, anchor_boxes
    from covid_keras.model.layers.anchors import PAPER_LEVELS
    from tests.layer_helper import run_layer_test

    boxes = anchor_boxes(SIZE, PAPER_LEVELS)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[20:56, 8:30] = 1.0  # one "lung"
    scores = _decoy_scores(boxes, mask)[None].repeat(3, 0)
    masks = np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)])[..., None]
    masks[2, 40:44, 40:44] = 1.0  # a lung smaller than any 3 anchors' worth
    overlap = np.asarray(AnchorLungOverlap(SIZE, PAPER_LEVELS)(masks))
    plain = TopKNMS(SIZE, PAPER_LEVELS, [(0, 2, 3)], 0.1)
    lung = run_layer_test(tmp_path, TopKNMS, {"input_size": SIZE, "levels": PAPER_LEVELS,
                                              "groups": [(0, 2, 3)], "iou_threshold": 0.1,
                                              "min_overlap": 0.25},
                          [scores, overlap], {"indices": (3, 3), "scores": (3, 3),
                                              "boxes": (3, 3, 4)}, 0)
    free = {k: np.asarray(v) for k, v in plain(scores).items()}
    # unrestricted: the decoy (anchors with no lung at all) wins
    assert all(overlap[0, i] == 0.0 for i in free["indices"][0])
    # restricted: every chosen anchor is at least a quarter lung, scores are the anchors'
    assert all(overlap[0, i] >= 0.25 for i in lung["indices"][0]), overlap[0, lung["indices"][0]]
    np.testing.assert_array_equal(lung["scores"][0], scores[0, lung["indices"][0]])
    # no anchor on the lung (all black, failed mask): all anchors, the unrestricted answer
    for key in ("indices", "scores", "boxes"):
        np.testing.assert_array_equal(lung[key][1], free[key][1])
    # fewer qualifying anchors than K: those first, then the best others
    ok = np.flatnonzero(overlap[2] >= 0.25)
    assert 0 < len(ok) < 3
    assert set(lung["indices"][2][:len(ok)]) == set(ok)
    assert np.all(np.isfinite(lung["scores"]))


@pytest.mark.model
def test_greedy_nms_with_every_anchor_allowed_is_the_unrestricted_selection():
    from keras import ops

    from covid_keras.model.layers import anchor_boxes, greedy_nms_topk, iou_matrix
    from covid_keras.model.layers.anchors import PAPER_LEVELS

    rng = np.random.default_rng(3)
    scores = rng.normal(size=(4, 245)).astype(np.float32)
    iou = ops.convert_to_tensor(iou_matrix(anchor_boxes(448, PAPER_LEVELS)))
    for thr in (0.1, 0.9):  # 0.9: NMS leaves plenty; 0.1: the fill-up path
        want = np.asarray(greedy_nms_topk(scores, iou, 6, thr))
        got = np.asarray(greedy_nms_topk(scores, iou, 6, thr, np.ones((4, 245), bool)))
        none = np.asarray(greedy_nms_topk(scores, iou, 6, thr, np.zeros((4, 245), bool)))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(none, want)


# ------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def models():
    """A lung DRENet and the unrestricted one with the same weights."""
    from covid_keras import build_drenet

    keras.utils.set_random_seed(5)
    lung = build_drenet(3, input_size=SIZE, backbone="tiny", navigator_anchors="lung")
    plain = build_drenet(3, input_size=SIZE, backbone="tiny")
    plain.set_weights(lung.get_weights())
    return lung, plain


def _slices(n=2):
    """Dark slices with two grey "lungs" and a bright square (a decoy) in a corner."""
    rng = np.random.default_rng(0)
    x = np.zeros((n, SIZE, SIZE, 3), np.float32)
    x[:, 16:52, 6:28] = rng.uniform(60, 120, size=(n, 36, 22, 1))
    x[:, 16:52, 36:58] = rng.uniform(60, 120, size=(n, 36, 22, 1))
    x[:, 0:10, 50:64] = 255.0
    return x


@pytest.mark.model
def test_all_is_the_default_and_a_mask_of_ones_changes_nothing(models):
    from covid_keras import build_drenet
    from covid_keras.model.drenet import OUTPUT_KEYS

    lung, plain = models
    assert "navigator_anchors" not in plain.build_config  # its config as before the option
    assert not isinstance(plain.input, dict)  # the image alone, as before
    assert set(lung.input) == {"image", "lung_mask"}
    explicit = build_drenet(3, input_size=SIZE, backbone="tiny", navigator_anchors="all")
    explicit.set_weights(plain.get_weights())
    x = _slices()
    a, b = plain(x), explicit(x)
    c = lung({"image": x, "lung_mask": np.ones((2, SIZE, SIZE, 1), np.float32)})
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(c[key]), err_msg=key)
    with pytest.raises(ValueError, match="navigator_anchors"):
        build_drenet(3, input_size=SIZE, backbone="tiny", navigator_anchors="lungs")


@pytest.mark.model
def test_lung_model_boxes_avoid_the_decoy_the_unrestricted_navigator_picks(models):
    lung, plain = models
    x = _slices()
    free = np.asarray(plain(x)["boxes"])
    # the lung mask: the two lungs, minus wherever the unrestricted navigator looked first
    # (whatever it picked, bright square or not, is then off the lung: a decoy)
    mask = np.zeros((2, SIZE, SIZE), np.float32)
    mask[:, 16:52, 6:28] = mask[:, 16:52, 36:58] = 1.0
    for b in range(2):
        y0, x0, y1, x1 = free[b, 0]
        mask[b, max(int(np.floor(y0)) - 1, 0):int(np.ceil(y1)) + 1,
             max(int(np.floor(x0)) - 1, 0):int(np.ceil(x1)) + 1] = 0.0
        assert box_overlap(mask[b], free[b, 0]) < 0.25
    out = lung({"image": x, "lung_mask": mask[..., None]})
    boxes = np.asarray(out["boxes"])
    for b in range(2):
        shares = [box_overlap(mask[b], box) for box in boxes[b]]
        assert min(shares) >= 0.25, shares
        assert box_overlap(mask[b], free[b, 0]) < 0.25
        assert mask[b, 0:10, 50:64].max() == 0.0  # the bright square is off the lung
    assert not np.array_equal(boxes, free)
    assert np.all(np.isfinite(np.asarray(out["logits"])))


@pytest.mark.model
def test_an_all_black_slice_without_lung_still_gets_an_answer(models):
    lung, plain = models
    black = np.zeros((2, SIZE, SIZE, 3), np.float32)
    out = lung({"image": black, "lung_mask": np.zeros((2, SIZE, SIZE, 1), np.float32)})
    ref = plain(black)
    for key in ("boxes", "navigator_scores", "logits"):
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(ref[key]), err_msg=key)
    assert np.all(np.isfinite(np.asarray(out["logits"])))


@pytest.mark.model
def test_lung_model_trains_one_step(models):
    from covid_keras import build_drenet

    keras.utils.set_random_seed(6)
    model = build_drenet(3, input_size=SIZE, backbone="tiny", navigator_anchors="lung")
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x = {"image": _slices(4), "lung_mask": np.ones((4, SIZE, SIZE, 1), np.float32)}
    history = model.fit(x, np.array([0, 1, 2, 0]), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.model
def test_saved_lung_model_keeps_the_option_in_a_fresh_process(models, tmp_path):
    from covid_keras.model import saving

    lung, _ = models
    path = tmp_path / "lung.keras"
    saving.save_model(lung, str(path), ["normal", "covid", "bacterial"])
    x = _slices()
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[:, 30:60, 30:60] = 1.0
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "m.npy", mask)
    want = np.asarray(lung({"image": x, "lung_mask": mask})["boxes"])
    code = ("import json, sys, numpy as np\n"
            "from covid_keras.model import saving\n"
            "from covid_keras.io.run_dir import RunDir\n"
            "p, d = sys.argv[1], sys.argv[2]\n"
            "m = saving.load_model(p, compile=False)\n"
            "out = m({'image': np.load(d + '/x.npy'), 'lung_mask': np.load(d + '/m.npy')})\n"
            "np.save(d + '/boxes.npy', np.asarray(out['boxes']))\n"
            "print(json.dumps({'spec': saving.model_spec(p), 'info': saving.read_info(p),\n"
            "                  'build': m.build_config, 'inputs': sorted(m.input)}))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND=BACKEND)
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["spec"]["navigator_anchors"] == "lung"
    assert got["info"]["navigator_anchors"] == "lung"
    assert got["build"]["navigator_anchors"] == "lung"
    assert got["inputs"] == ["image", "lung_mask"]
    np.testing.assert_allclose(np.load(tmp_path / "boxes.npy"), want, atol=1e-4)


# ------------------------------------------------------------------ the input pipeline
def _write_records(folder: Path, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """``train`` and ``val`` shards of ``n`` records each: 64 px slices whose non-black
    pixels are exactly the lung mask, an asymmetric shape (flips and crops show)."""
    import cv2
    import tensorflow as tf

    from covid_keras.core import schema

    images, masks = [], []
    for i in range(n):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8 + i:56, 4:20] = 255  # a tall bar on the left
        mask[40:56, 20:44 + i] = 255  # and a foot towards the right: an L
        img = np.where(mask > 0, 160 + i, 0).astype(np.uint8)
        images.append(img)
        masks.append(mask)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        path = folder / f"{split}-00000-of-00001.tfrecord.gz"
        with tf.io.TFRecordWriter(str(path), "GZIP") as w:
            for i, (img, mask) in enumerate(zip(images, masks)):
                w.write(schema.serialize({
                    schema.IMAGE: cv2.imencode(".png", img)[1].tobytes(),
                    schema.HEIGHT: SIZE, schema.WIDTH: SIZE, schema.CHANNELS: 1,
                    schema.MASK: cv2.imencode(".png", mask)[1].tobytes(),
                    schema.LABEL_NAME: "covid", schema.LABEL_INDEX: i % 2,
                    schema.PATIENT_KEY: f"p{i}", schema.STUDY_KEY: f"s{i}",
                    schema.SERIES_KEY: f"r{i}", schema.SOP_KEY: f"i{i}",
                    schema.SLICE_INDEX: i, schema.SLICE_COUNT: n, schema.POSITION_MM: 0.0,
                    schema.LUNG_FRACTION: float(mask.mean() / 255), schema.SITE: "a",
                    schema.SPLIT: split}))
    return np.stack(images), np.stack(masks)


@tf_only
def test_the_mask_moves_with_the_image_through_augmentation(tmp_path):
    from covid_keras.io import data

    images, masks = _write_records(tmp_path)
    cfg = data.PipelineConfig(input_size=SIZE, backbone="tiny", normalize=False,
                              zoom=0.3, rotation_degrees=15.0, shuffle_buffer=8,
                              deterministic=True, lung_mask=True)
    ds = data.make_dataset(str(tmp_path), "train", 2, training=True, cfg=cfg, repeat=True)
    moved = 0
    for x, _ in ds.take(12):
        assert set(x) == {"image", "lung_mask"}
        img = x["image"].numpy()[..., 0]
        mask = x["lung_mask"].numpy()[..., 0]
        assert x["lung_mask"].shape[1:] == (SIZE, SIZE, 1)
        for a, m in zip(img, mask):
            # aligned: the image's bright pixels are the mask's (bar resampled edges)
            disagree = np.mean((a > 0.5 * a.max()) != (m > 0.5))
            assert disagree < 0.03, disagree
            # and the mask did move: it matches no record's unaugmented mask
            moved += min(np.mean((m > 0.5) != (r > 127)) for r in masks) > 0.03
    assert moved > 6
    # evaluation: the record's mask as it is; without lung_mask, the image alone
    ev = data.make_dataset(str(tmp_path), "val", 6, training=False, cfg=cfg)
    x, _ = next(iter(ev))
    np.testing.assert_array_equal(x["lung_mask"].numpy()[..., 0] > 0.5, masks > 127)
    plain = data.make_dataset(str(tmp_path), "val", 6, training=False,
                              cfg=data.PipelineConfig(input_size=SIZE, backbone="tiny",
                                                      normalize=False))
    x2, _ = next(iter(plain))
    np.testing.assert_array_equal(x2.numpy(), x["image"].numpy())


@tf_only
def test_augmenting_with_a_mask_leaves_the_image_as_without(tmp_path):
    import tensorflow as tf

    from covid_keras.io import data

    images, masks = _write_records(tmp_path, n=1)
    img = tf.constant(images[0][..., None])
    mask = tf.constant(masks[0][..., None] / 255.0, tf.float32)
    for i in range(6):
        seed = tf.constant([3, i], tf.int64)
        alone = data.augment(img, seed, 10.0, "multiplicative", 0.2, 0.3)
        both, m = data.augment(img, seed, 10.0, "multiplicative", 0.2, 0.3, mask=mask)
        np.testing.assert_array_equal(alone.numpy(), both.numpy())
        assert np.mean((both.numpy()[..., 0] > 20) != (m.numpy()[..., 0] > 0.5)) < 0.03


@tf_only
def test_evaluation_reads_a_lung_model_with_the_records_masks(models, tmp_path):
    from covid_keras.evaluation.evaluation import SplitPredictor
    from covid_keras.io import data
    from covid_keras.model import saving

    lung, _ = models
    images, masks = _write_records(tmp_path / "data", n=5)
    spec = saving.model_spec(lung)
    assert spec["navigator_anchors"] == "lung"
    cfg = data.PipelineConfig.for_model(spec)
    assert cfg.lung_mask
    pred = SplitPredictor(str(tmp_path / "data"), "val", 2, cfg)  # 5 records: a padded batch
    out = pred.predict(lung)
    x = np.repeat(images[..., None], 3, -1).astype(np.float32)
    want = lung({"image": x, "lung_mask": (masks[..., None] / 255.0).astype(np.float32)})
    np.testing.assert_allclose(out["boxes"], np.asarray(want["boxes"]), atol=1e-4)
    for b in range(5):
        assert min(box_overlap(masks[b] / 255.0, box) for box in out["boxes"][b]) >= 0.25


# ------------------------------------------------------------------ the export
@pytest.fixture(scope="module")
def lung_export(models, tmp_path_factory):
    """(run folder, its export's version folder, load_run's model, info, decision): the lung
    model's run (its dataset prepared without crop_to_lung) exported once for the tests of
    the export's signatures and of the server (an export costs ~6 s on these 2 cores)."""
    from covid_keras.serving import exporter

    root = tmp_path_factory.mktemp("lung_export")
    run = _lung_run(models, root, {"crop_to_lung": False})
    model, info, decision = exporter.load_run(str(run))
    path = exporter.export_model(model, info, decision, str(root / "exports"), "lung")
    return run, path, model, info, decision


@tf_only
def test_signatures_of_a_lung_model(models, lung_export):
    import tensorflow as tf

    from covid_keras.serving import exporter
    from covid_keras.serving.serving_signatures import Signatures

    lung, plain = models
    _, path, model, info, decision = lung_export
    assert info["navigator_anchors"] == "lung"
    x = _slices()
    x[:, :, 32:] = 0.0  # the prepared slice: black outside the (left) lung
    sigs = Signatures(model, info, decision)
    # serving_default: a mask of ones, no restriction: the unrestricted model's boxes
    default = sigs.serving_default(tf.constant(x))
    np.testing.assert_allclose(default["boxes"].numpy(),
                               np.clip(np.asarray(plain(x)["boxes"]), 0, SIZE), atol=1e-5)
    # predict_study: its lung_masks input is the mask (a small one, inside the non-black
    # pixels: the image's non-black pixels are not what restricts it)
    masks = np.zeros((2, SIZE, SIZE), np.uint8)
    masks[:, 30:50, 8:26] = 255
    study = sigs.predict_study(tf.constant(x), tf.constant(masks))
    for b in range(2):
        shares = [box_overlap(masks[b] / 255.0, box) for box in study["boxes"].numpy()[b]]
        assert min(shares) >= 0.25, shares
    want = np.asarray(lung({"image": x, "lung_mask": masks[..., None] / 255.0})["boxes"])
    np.testing.assert_allclose(study["boxes"].numpy(), np.clip(want, 0, SIZE), atol=1e-5)
    cls = tf.constant([1, 1], tf.int32)
    heat = sigs.gradcam(tf.constant(x), cls, tf.constant(masks))["heatmaps"].numpy()
    assert heat.shape == (2, SIZE, SIZE)
    # the mask changes the map (the regions it explains are the mask's boxes)
    other = sigs.gradcam(tf.constant(x), cls, tf.constant(np.full_like(masks, 255))
                         )["heatmaps"].numpy()
    assert np.abs(heat - other).max() > 1e-3
    # the SavedModel itself: predict_study and gradcam take lung_masks, the others not
    loaded = tf.saved_model.load(path)
    inputs = {k: set(f.structured_input_signature[1]) for k, f in loaded.signatures.items()}
    assert inputs == {"serving_default": {"images"}, "predict_images": {"image_bytes"},
                      "predict_study": {"images", "lung_masks"},
                      "gradcam": {"images", "class_index", "lung_masks"}}
    got = loaded.signatures["predict_study"](images=tf.constant(x),
                                             lung_masks=tf.constant(masks))
    np.testing.assert_allclose(got["boxes"].numpy(), study["boxes"].numpy(), atol=1e-4)
    got = loaded.signatures["gradcam"](images=tf.constant(x), class_index=cls,
                                       lung_masks=tf.constant(masks))
    np.testing.assert_allclose(got["heatmaps"].numpy(), heat, atol=1e-4)
    got = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(got["boxes"].numpy(), default["boxes"].numpy(), atol=1e-4)
    exported = json.loads((Path(path) / exporter.ASSETS_EXTRA / exporter.INFO_FILE
                           ).read_text())
    assert exported["navigator_anchors"] == "lung"
    assert "lung_masks" in exported["signatures"]["predict_study"]["inputs"]
    # a caller without the masks fails in one line naming the input, no silent fallback
    from covid_keras.serving import predictor

    local = predictor.LocalModel(path)
    for call in (lambda: local.predict_study(x), lambda: local.gradcam(x, 1)):
        with pytest.raises(ValueError, match="lung_masks"):
            call()
    np.testing.assert_allclose(local.predict_study(x, masks)["boxes"],
                               study["boxes"].numpy(), atol=1e-4)


def _lung_run(models, root: Path, prep: dict | None = None) -> Path:
    """A run folder of the lung model whose dataset was prepared with data_prep's
    defaults, ``prep`` changed."""
    from covid_keras.model import saving
    from tests.helpers import fake_manifest

    lung, _ = models
    run = root / "run"
    run.mkdir(parents=True)
    saving.save_model(lung, str(run / "best.keras"), ["normal", "covid", "bacterial"])
    data_dir = fake_manifest(root / "data")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["preprocessing"].update(prep or {})
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    (run / "run_info.json").write_text(json.dumps(
        {"flags": {"data_dir": str(data_dir)}, "git_sha": "abc"}))
    return run


@tf_only
@pytest.mark.parametrize("prep", [{}, {"crop_to_lung": False}],
                         ids=["defaults_fill_rotate", "nocrop_to_lung"])
def test_predict_boxes_sit_on_the_studys_real_lung_mask(models, tmp_path, prep):
    """Finding 1: predict sends data_prep's lung masks; the image's non-black pixels (all
    but a few with fill_blank=rotate or without crop_to_lung) would not restrict it."""
    from covid_keras.serving import predictor
    from data_prep import phantom

    run = _lung_run(models, tmp_path, prep)
    model = predictor.LocalModel(str(run))
    assert model.info["navigator_anchors"] == "lung"
    study = phantom.write_study(tmp_path / "study", kind="covid", num_slices=12,
                                matrix=128, seed=3)
    salt = b"s" * 32
    answer = predictor.predict_study(str(study), model, str(tmp_path / "out"), salt, top=2)
    assert answer["model"]["navigator_anchors"] == "lung"
    _, result, _, settings = predictor.prepare_study(str(study), "s", model.info, salt)
    assert settings.fill_blank == "rotate" and settings.crop_to_lung == (not prep)
    masks = predictor.model_masks_u8(result.records, SIZE) / 255.0
    images = predictor.slices_u8(result.records, SIZE)
    # the non-black pixels are far more than the lung: the heuristic restricts nothing
    assert (images.max(-1) > 0).mean() > masks.mean() + 0.2
    assert len(answer["slices"]) == len(masks)
    shares = [box_overlap(m, b["box_yxyx"]) for s, m in zip(answer["slices"], masks)
              for b in s["boxes"]]
    assert min(shares) >= 0.25 - 1e-6, sorted(shares)[:5]
    assert list((tmp_path / "out").glob("evidence_*.png"))


# ------------------------------------------------------------------ the trainer
@tf_only
@pytest.mark.slow  # a real (tiny) training run and an evaluation: a minute or two
def test_train_flag_reaches_the_saved_model_and_evaluate(tiny_dataset, commands, tmp_path):
    from covid_keras.model import saving

    data_dir = tiny_dataset(kinds=("normal", "covid", "bacterial"), patients_per_kind=3,
                            num_slices=20, matrix=64, seed=0,
                            flags=("--classes=normal,covid,bacterial",
                                   "--split_fractions=0.6,0.2,0.2", "--shard_size_mb=0.05"))
    run = tmp_path / "run"
    proc = commands.run("covid_keras.train", "--flagfile=configs/smoke.cfg",
                        f"--data_dir={data_dir}", f"--run_dir={run}", "--epochs=1",
                        "--steps_per_epoch=2", "--navigator_anchors=lung",
                        "--zoom_jitter=0.2", "--rotation_degrees=10", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "--navigator_anchors=lung" in (run / "flags.cfg").read_text()
    for name in ("final.keras", "best.keras"):
        assert saving.saved_model_spec(str(run / name))["navigator_anchors"] == "lung"
        assert saving.read_info(str(run / name))["navigator_anchors"] == "lung"
    proc = commands.run("covid_keras.evaluate", f"--run_dir={run}", "--split=test",
                        "--bootstrap=10", "--max_explained_patients=1", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(run / "eval_test" / "slices.csv") as f:
        assert len(f.read().splitlines()) > 1
    metrics = json.loads((run / "eval_test" / "metrics.json").read_text())
    assert metrics["model"]["navigator_anchors"] == "lung"
    assert list((run / "eval_test" / "explanations").glob("*.png"))  # Grad-CAM with masks
    # predict on a study, from the run folder: predict_study's non-black mask
    study = next((Path(data_dir).parent / "studies" / "covid").iterdir())
    proc = commands.run("covid_keras.predict", f"--study={study}", f"--model={run}",
                        f"--salt_file={Path(data_dir).parent / 'salt.key'}",
                        f"--output_dir={tmp_path / 'pred'}", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    answer = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert answer["slices"] and all(len(s["boxes"]) == 3 for s in answer["slices"])
    assert list((tmp_path / "pred").glob("evidence_*.png"))
    bad = commands.run("covid_keras.train", "--flagfile=configs/smoke.cfg",
                       f"--data_dir={data_dir}", f"--run_dir={tmp_path / 'c'}",
                       "--model=classifier", "--navigator_anchors=lung")
    assert bad.returncode != 0 and "navigator_anchors" in bad.stderr


@pytest.mark.model
def test_an_ensemble_of_lung_models_takes_the_mask_too(models, tmp_path):
    from covid_keras import build_drenet
    from covid_keras.model import saving
    from covid_keras.model.ensemble import build_ensemble

    lung, plain = models
    keras.utils.set_random_seed(8)
    other = build_drenet(3, input_size=SIZE, backbone="tiny", navigator_anchors="lung")
    ens = build_ensemble([lung, other])
    assert set(ens.input) == {"image", "lung_mask"}
    x = {"image": _slices(), "lung_mask": np.zeros((2, SIZE, SIZE, 1), np.float32)}
    x["lung_mask"][:, 20:60, 30:60] = 1.0
    boxes = np.asarray(ens(x)["boxes"])
    for b in range(2):
        assert min(box_overlap(x["lung_mask"][b, ..., 0], box) for box in boxes[b]) >= 0.25
    path = str(tmp_path / "ens.keras")
    saving.save_model(ens, path, ["normal", "covid", "bacterial"])
    assert saving.model_spec(path)["navigator_anchors"] == "lung"
    np.testing.assert_allclose(np.asarray(saving.load_model(path)(x)["boxes"]), boxes,
                               atol=1e-4)
    with pytest.raises(ValueError, match="lung mask"):
        build_ensemble([lung, plain])


def test_accuracy_jax_refuses_a_lung_flagfile(bench_script, tmp_path, capsys):
    """bench/accuracy_jax.py trains from a .npz without lung masks: a lung flagfile would be
    measured as the unrestricted model, so it is refused (bench/accuracy.py measures it)."""
    (tmp_path / "d.npz").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        bench_script("accuracy_jax").main([f"--data={tmp_path / 'd.npz'}",
                                           "--flagfiles=configs/covid_ct_drenet_lung.cfg",
                                           f"--work_dir={tmp_path / 'w'}"])
    assert exc.value.code == 2
    assert "navigator_anchors=lung" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------ review of issue 30 item 4
@pytest.mark.model
def test_a_default_model_writes_no_lung_keys(models, tmp_path):
    """An older reader builds a default model from its file: no new key for it to reject
    (build_config, covid_keras.json, the export info); a lung model has them."""
    import zipfile

    from covid_keras.model import saving
    from covid_keras.serving import exporter

    lung, plain = models
    assert not {"navigator_anchors", "lung_overlap"} & set(plain.build_config)
    assert lung.build_config["navigator_anchors"] == "lung"
    assert lung.build_config["lung_overlap"] == 0.25
    prep = {"windows": [], "records_image_size": SIZE, "flags": {}, "preprocessing": None,
            "dataset_manifest_sha256": None}
    for model, lung_keys in ((plain, False), (lung, True)):
        path = tmp_path / f"{lung_keys}.keras"
        saving.save_model(model, str(path), ["normal", "covid", "bacterial"])
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
        assert ("navigator_anchors" in config["config"]["build_config"]) == lung_keys
        info = saving.read_info(str(path))
        assert ("navigator_anchors" in info) == lung_keys
        export = exporter.export_info(info, prep, None, None, str(path), [])
        assert ("navigator_anchors" in export) == lung_keys
        assert ("lung_masks" in export["signatures"]["predict_study"]["inputs"]) == lung_keys


@pytest.mark.model
def test_an_anchor_exactly_a_quarter_lung_is_allowed_on_every_backend():
    """A share a float32 sum puts an ulp under 0.25 still qualifies (TF and JAX agree)."""
    from covid_keras.model.layers import TopKNMS, anchor_boxes
    from covid_keras.model.layers.anchors import PAPER_LEVELS

    n = len(anchor_boxes(SIZE, PAPER_LEVELS))
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (1, n)).astype(np.float32)
    overlap = np.zeros((1, n), np.float32)
    quarter = int(np.argmin(scores[0]))  # the worst-scored anchor: chosen only if allowed
    overlap[0, quarter] = np.nextafter(np.float32(0.25), np.float32(0))
    top = TopKNMS(SIZE, PAPER_LEVELS, [(0, 2, 3)], 0.1, min_overlap=0.25)
    idx = np.asarray(top([scores, overlap])["indices"])[0]
    assert idx[0] == quarter, idx


@tf_only
def test_init_from_an_unrestricted_model_with_the_lung_flag_rebuilds_it(models, tmp_path):
    from covid_keras.model import saving
    from covid_keras.training import trainer

    lung, plain = models
    path = tmp_path / "plain.keras"
    saving.save_model(plain, str(path), ["normal", "covid", "bacterial"])
    cfg = trainer.TrainConfig(init_from=str(path), navigator_anchors="lung",
                              backbone="tiny", input_size=SIZE)
    cfg = trainer.apply_init_from_spec(cfg, ["normal", "covid", "bacterial"])
    assert cfg.navigator_anchors == "lung"
    model = trainer.build_model(cfg, 3)
    assert set(model.input) == {"image", "lung_mask"}
    assert model.build_config["navigator_anchors"] == "lung"
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = _slices()
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[:, 30:60, 30:60] = 1.0
    np.testing.assert_allclose(np.asarray(model({"image": x, "lung_mask": mask})["boxes"]),
                               np.asarray(lung({"image": x, "lung_mask": mask})["boxes"]),
                               atol=1e-4)
    # without the flag a lung model stays a lung model
    saving.save_model(lung, str(tmp_path / "lung.keras"), ["normal", "covid", "bacterial"])
    cfg = trainer.apply_init_from_spec(trainer.TrainConfig(
        init_from=str(tmp_path / "lung.keras"), backbone="tiny", input_size=SIZE),
        ["normal", "covid", "bacterial"])
    assert cfg.navigator_anchors == "lung"


@tf_only
def test_bench_intensity_feeds_a_lung_run_its_masks(models, bench_script, tmp_path):
    from tests.helpers import write_dataset

    lung, _ = models
    folder = write_dataset(tmp_path / "tfrecords", {"train": 1, "val": 1, "test": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keras.utils.set_random_seed(1)
    from covid_keras import build_drenet

    build_drenet(2, input_size=SIZE, backbone="tiny", navigator_anchors="lung").save(
        run_dir / "best.keras")
    (run_dir / "run_info.json").write_text(json.dumps({
        "flags": {"backbone": "tiny", "input_size": SIZE}, "classes": ["non_covid", "covid"]}))
    out = tmp_path / "res.json"
    assert bench_script("intensity").main([f"--data_dir={folder}", f"--runs={run_dir}",
                                           "--split=test", "--factors=0.8",
                                           f"--output_json={out}"]) == 0
    assert set(json.loads(out.read_text())["runs"][str(run_dir)]["changes"]) == {
        "x0.8", "x1", "matched"}


@tf_only
def test_predict_through_the_server_sends_the_lung_masks(lung_export, tmp_path):
    """--server (covid_keras.serve's REST, TF Serving's API): predict sends the study's
    masks to predict_study and gradcam, answering as locally; without them one line."""
    from covid_keras.serving import predictor
    from data_prep import phantom
    from tests.helpers import ServeProcess

    run, path = lung_export[:2]
    study = phantom.write_study(tmp_path / "study", kind="covid", num_slices=12,
                                matrix=128, seed=3)
    salt = b"s" * 32
    local = predictor.predict_study(str(study), predictor.LocalModel(str(run)),
                                    str(tmp_path / "l"), salt, top=1)
    with ServeProcess(Path(path).parent, tmp_path, model_name="lung") as server:
        # without --model the served signature alone says it takes the masks
        assert predictor.ServerModel(server.url, "lung", None, 60.0).info[
            "navigator_anchors"] == "lung"
        remote = predictor.ServerModel(server.url, "lung", predictor.read_export_info(path),
                                       60.0)
        served = predictor.predict_study(str(study), remote, str(tmp_path / "s"), salt, top=1)
        with pytest.raises(ValueError, match="lung_masks"):
            remote.predict_study(np.zeros((1, SIZE, SIZE, 3), np.float32))
    assert served["model"]["navigator_anchors"] == "lung"
    for a, b in zip(served["slices"], local["slices"]):
        np.testing.assert_allclose([x["box_yxyx"] for x in a["boxes"]],
                                   [x["box_yxyx"] for x in b["boxes"]], atol=1e-3)
