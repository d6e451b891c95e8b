"""The backbone's normalisation as a layer saved with the model (issue 28 item 3):
``BackboneNormalization`` equals keras.applications' preprocessing and the input pipeline's
:func:`covid_keras.io.data.normalize`; a model built with ``include_preprocessing`` fed the
raw pixel values answers what the same weights without the layer (every model saved before
it) answer on normalised input, for every backbone; the spec records it; and a model
without the layer still gets normalised input from the pipeline and the export graph."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

from covid_keras.model.backbones import BACKBONES, PREPROCESSING
from covid_keras.model.baselines import build_classifier
from covid_keras.model.drenet import build_drenet
from covid_keras.model.layers import BackboneNormalization
from covid_keras.model.saving import INFO_ENTRY, load_model, model_spec, save_model

pytestmark = pytest.mark.model
TF_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="the tf.data pipeline and the export graph are TensorFlow")
SIZE = 32
CLASSES = ["normal", "covid"]


def _pixels(n: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def _pair(build, backbone: str, **kw):
    """(old, new): the same weights without and with the normalisation layer."""
    keras.utils.set_random_seed(0)
    old = build(backbone, include_preprocessing=False, **kw)
    new = build(backbone, include_preprocessing=True, **kw)
    new.set_weights(old.get_weights())
    return old, new


def _classifier(backbone, **kw):
    return build_classifier(backbone, 2, SIZE, None, **kw)


def _drenet(backbone, **kw):
    return build_drenet(2, input_size=64, backbone=backbone, **kw)


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(a).max()))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_layer_is_keras_applications_preprocessing(backbone):
    from keras.applications import imagenet_utils

    x = _pixels()
    mode = PREPROCESSING[backbone]
    want = imagenet_utils.preprocess_input(x.copy(), data_format="channels_last", mode=mode)
    got = keras.ops.convert_to_numpy(BackboneNormalization(mode)(x))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@TF_ONLY
@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_pipelines_normalize_is_the_layers_formula(backbone):
    import tensorflow as tf

    from covid_keras.io import data

    x = _pixels()
    layer = keras.ops.convert_to_numpy(BackboneNormalization(PREPROCESSING[backbone])(x))
    np.testing.assert_array_equal(data.normalize(tf.constant(x.astype(np.uint8)),
                                                 backbone).numpy(), layer)
    # in a tf.data graph too (the pipeline's map functions)
    ds = tf.data.Dataset.from_tensor_slices(x.astype(np.uint8)).map(
        lambda im: data.normalize(im, backbone)).batch(8)
    np.testing.assert_array_equal(next(iter(ds)).numpy(), layer)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_answers_the_same_on_raw_pixels(backbone):
    from keras.applications import imagenet_utils

    old, new = _pair(_classifier, backbone)
    x = _pixels()
    normalised = imagenet_utils.preprocess_input(x.copy(), data_format="channels_last",
                                                 mode=PREPROCESSING[backbone])
    _close(new.predict(x, verbose=0)["logits"], old.predict(normalised, verbose=0)["logits"])
    assert [lay.name for lay in new.layers if isinstance(lay, BackboneNormalization)] == [
        "backbone_normalization"]
    assert not any(isinstance(lay, BackboneNormalization) for lay in old.layers)


@pytest.mark.parametrize("backbone", ["tiny", "resnet50"])
def test_drenet_answers_the_same_on_raw_pixels(backbone):
    from keras.applications import imagenet_utils

    old, new = _pair(_drenet, backbone)
    x = _pixels(2, 64)
    normalised = imagenet_utils.preprocess_input(x.copy(), data_format="channels_last",
                                                 mode=PREPROCESSING[backbone])
    got, want = new(x, training=False), old(normalised, training=False)
    for key in ("logits", "raw_logits", "region_logits", "boxes", "box_scores"):
        _close(got[key], want[key])


def test_the_spec_records_it_and_old_files_load_as_before(tmp_path):
    old, new = _pair(_classifier, "tiny")
    d_old, d_new = _pair(_drenet, "tiny")
    assert model_spec(new)["include_preprocessing"] and model_spec(d_new)["include_preprocessing"]
    assert not model_spec(old)["include_preprocessing"]
    assert not model_spec(d_old)["include_preprocessing"]
    x = _pixels()
    for name, model in (("new", new), ("old", old)):
        path = str(tmp_path / f"{name}.keras")
        save_model(model, path, CLASSES)
        loaded = load_model(path, compile=False)
        assert loaded.covid_keras_info["include_preprocessing"] == (name == "new")
        assert model_spec(path)["include_preprocessing"] == (name == "new")
        _close(loaded.predict(x, verbose=0)["logits"], model.predict(x, verbose=0)["logits"])
    # a file saved before the layer existed: no key in its covid_keras.json or its DRENet
    # build_config; it loads without the layer and answers as before
    path = str(tmp_path / "drenet_old.keras")
    save_model(d_old, path, CLASSES)
    _strip_key(path)
    loaded = load_model(path, compile=False)
    assert "include_preprocessing" not in loaded.covid_keras_info
    assert not model_spec(path)["include_preprocessing"]
    assert not any(isinstance(lay, BackboneNormalization) for lay in loaded.layers)
    x64 = _pixels(2, 64)
    _close(loaded(x64, training=False)["logits"], d_old(x64, training=False)["logits"])


def _strip_key(path: str) -> None:
    """Rewrites a .keras file as one saved before include_preprocessing existed."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    info = json.loads(entries[INFO_ENTRY])
    info.pop("include_preprocessing")
    entries[INFO_ENTRY] = json.dumps(info).encode()
    config = json.loads(entries["config.json"])
    config["config"]["build_config"].pop("include_preprocessing")
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)


@TF_ONLY
def test_pipeline_and_export_graph_feed_each_model_its_input(tiny_dataset):
    """evaluate's pipeline (PipelineConfig.for_model) and the serving graph give a model
    with the layer the raw pixels and one without (an old run's) normalised ones: the same
    answers from the same weights, and the old model's as before."""
    import tensorflow as tf

    from covid_keras.io import data
    from covid_keras.serving.serving_signatures import Signatures

    data_dir = str(tiny_dataset())
    old, new = _pair(_classifier, "tiny")
    outputs = {}
    for name, model in (("old", old), ("new", new)):
        cfg = data.PipelineConfig.for_model({**model_spec(model), "input_size": SIZE})
        assert cfg.normalize == (name == "old")
        ds = data.make_dataset(data_dir, "train", 4, training=False, cfg=cfg)
        outputs[name] = np.concatenate([model.predict_on_batch(x)["logits"] for x, _ in ds])
    _close(outputs["new"], outputs["old"])
    # before: the pipeline normalised for every model
    before = data.make_dataset(data_dir, "train", 4, training=False,
                               cfg=data.PipelineConfig(input_size=SIZE, backbone="tiny"))
    _close(np.concatenate([old.predict_on_batch(x)["logits"] for x, _ in before]),
           outputs["old"])
    # a spec without the key (an old run's) is a model that expects normalised input
    assert data.PipelineConfig.for_model({"input_size": SIZE, "backbone": "tiny"}).normalize

    x = _pixels(2)
    info = {"input_size": SIZE, "backbone": "tiny", "class_names": CLASSES}
    want = tf.nn.softmax(old(data.normalize(x, "tiny"), training=False)["logits"]).numpy()
    for model, extra in ((old, {}), (new, {"include_preprocessing": True})):
        sigs = Signatures(model, {**info, **extra}, None)
        _close(sigs.serving_default(tf.constant(x))["probabilities"], want)
        assert sigs.gradcam(tf.constant(x), tf.constant([1, 1], tf.int32))[
            "heatmaps"].shape == (2, SIZE, SIZE)
