"""The tf.data input pipeline over data_prep's TFRecords (through :mod:`covid_keras.core.schema`).

    ds = make_dataset("tfrecords/demo", "train", batch_size=8, training=True,
                      input_size=448, backbone="resnet50")

Training: the shard list is shuffled every epoch, shards are read with a parallel
interleave, records shuffled, parsed, decoded, augmented (horizontal flip and a
multiplicative brightness jitter, as the authors; small rotations optional), normalised as
the backbone expects for a model without its own normalisation layer (``cfg.normalize``;
a model built with ``include_preprocessing`` gets the raw pixel values), batched
(the last partial batch dropped), prefetched; optionally class-balanced.
Evaluation: the shards in order, no shuffle, no augmentation, every record exactly once
(the last batch kept), with the record keys alongside for patient-level aggregation.

A DRENet built with ``navigator_anchors="lung"`` (``cfg.lung_mask``, set from the model's
spec by :meth:`PipelineConfig.for_model`) takes ``{"image": ..., "lung_mask": ...}``: the
record's ``mask/encoded`` resized to the input size as the image is, float32 (S, S, 1),
1 = lung, and in training flipped, zoomed and rotated with exactly the image's draws
(:func:`augment`'s ``mask``); brightness and gamma leave it alone.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import tensorflow as tf

from covid_keras.core import schema
from covid_keras.core.imaging import BRIGHTNESS_RANGE, check_augmentation
from covid_keras.model.backbones import PREPROCESSING
from covid_keras.model.drenet import IMAGE_INPUT, LUNG_MASK_INPUT
from covid_keras.model.layers.intensity import normalize_pixels


def shard_files(data_dir: str, split: str) -> list[str]:
    """The split's shards, in name order (any file system TensorFlow knows: local, gs://,
    ram://...). Raises a clear error when there are none."""
    pattern = os.path.join(data_dir, f"{split}-*-of-*.tfrecord.gz")
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        present = sorted({os.path.basename(f).split("-")[0] for f in tf.io.gfile.glob(
            os.path.join(data_dir, "*-*-of-*.tfrecord.gz"))})
        if present:
            raise FileNotFoundError(f"{data_dir} has no split {split!r} (its splits: "
                                    f"{', '.join(present)})")
        raise FileNotFoundError(f"No {split}-*-of-*.tfrecord.gz shards in {data_dir} "
                                "(build them with python -m data_prep.build_tfrecords)")
    return files


def manifest_path(data_dir: str) -> str:
    """The data folder's manifest (:data:`covid_keras.core.schema.MANIFEST`)."""
    return os.path.join(data_dir, schema.MANIFEST)


def read_manifest(data_dir: str) -> dict:
    path = manifest_path(data_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} is missing: --data_dir must be a data_prep output")
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def split_counts(manifest: dict, split: str) -> dict[str, int]:
    """label -> slices in ``split``, from the dataset manifest."""
    out: dict[str, int] = {}
    for label, sites in manifest["counts"].get(split, {}).items():
        out[label] = sum(cell["slices"] for cell in sites.values())
    return out


def class_weights(manifest: dict, split: str = "train") -> dict[int, float]:
    """Inverse-frequency weights (mean 1 over slices) for Keras ``class_weight``."""
    counts = split_counts(manifest, split)
    classes = manifest["classes"]
    total = sum(counts.values())
    present = [c for c in classes if counts.get(c, 0) > 0]
    return {i: (total / (len(present) * counts[c]) if counts.get(c, 0) else 0.0)
            for i, c in enumerate(classes)}


def normalize(image_u8, backbone: str):
    """uint8 RGB-ordered (B, H, W, 3) or (H, W, 3) -> float32 as the backbone was trained:
    the input of a model without its own normalisation layer (every model saved before
    ``include_preprocessing``). The formula is the layer's
    (:func:`covid_keras.model.layers.intensity.normalize_pixels`), computed with TensorFlow's
    NumPy API so that it runs in a tf.data graph under any Keras backend."""
    import tensorflow.experimental.numpy as tnp

    mode = PREPROCESSING.get(backbone)
    if mode is None:
        raise ValueError(f"No preprocessing for backbone {backbone!r}. Known: "
                         f"{sorted(PREPROCESSING)}")
    return normalize_pixels(tf.cast(image_u8, tf.float32), mode, xp=tnp)


def model_input(image_u8, cfg: PipelineConfig):
    """The model's input from uint8 RGB images: normalised as the backbone expects
    (``cfg.normalize``: a model without its own normalisation layer), else the pixel values
    as float32 (0..255: the model normalises them itself)."""
    if cfg.normalize:
        return normalize(image_u8, cfg.backbone)
    return tf.cast(image_u8, tf.float32)


def decode_image(encoded, input_size: int, rgb: bool = True):
    """PNG bytes (1 or 3 channels) -> uint8 (input_size, input_size, 3), or with
    ``rgb=False`` the record's own channels (cheaper to augment: grey is 1 channel)."""
    img = tf.io.decode_png(encoded, channels=0)
    size = tf.shape(img)[:2]
    img = tf.cond(tf.reduce_all(size == input_size), lambda: img,
                  lambda: tf.cast(tf.image.resize(img, [input_size, input_size],
                                                  antialias=True), tf.uint8))
    return to_rgb(img) if rgb else img


def decode_mask(encoded, input_size: int):
    """The records' lung mask (PNG, 255 = lung) -> float32 (input_size, input_size, 1),
    1 = lung: resized as :func:`decode_image` resizes the image (antialiased)."""
    m = tf.cast(decode_image(encoded, input_size, rgb=False)[..., :1], tf.float32) / 255.0
    return tf.ensure_shape(m, [input_size, input_size, 1])




def lung_model_input(image, mask, input_size: int) -> dict:
    """``{"image": image, "lung_mask": mask}``: what a DRENet built with
    ``navigator_anchors="lung"`` takes (mask float32 (..., S, S, 1), 1 = lung)."""
    mask = tf.cast(mask, tf.float32)
    shape = [None] * (mask.shape.rank - 3) + [input_size, input_size, 1]
    return {IMAGE_INPUT: image, LUNG_MASK_INPUT: tf.ensure_shape(mask, shape)}


def to_rgb(img):
    """(S, S, 1 or 3+) -> (S, S, 3): grey repeated, else the first three channels."""
    img = tf.cond(tf.shape(img)[-1] == 1, lambda: tf.repeat(img, 3, axis=-1),
                  lambda: img[..., :3])
    return tf.ensure_shape(img, [None, None, 3])




def augment(image_u8, seed, rotation_degrees: float = 0.0,
            brightness: str = "multiplicative", zoom: float = 0.0, gamma: float = 0.0,
            mask=None):
    """Stateless augmentation of one uint8 image: horizontal flip and brightness x
    U(0.874, 1.126), as the authors' code [, zoom, gamma, rotation]. Multiplicative, so the
    black (masked) background stays black; additive jitter or a contrast jitter around the
    mean would grey it, and the background would then tell train from val images.
    ``brightness="additive"``: the earlier recipe (brightness +- 0.1, then contrast x
    U(0.8, 1.2) around the mean), kept to measure the change (bench/README.md).

    ``zoom`` z > 0: a square of side x U(1 - z, 1) of the image's, at a random place,
    resized back to the full size (the image is zoomed in by up to 1 / (1 - z)).
    ``gamma`` g > 0: x ** exp(U(-ln(1 + g), ln(1 + g))): brightness and contrast change
    together while black stays black and white stays white. Both are off by default, and
    with them off the other draws are the same as without them.

    ``mask`` (S, S, 1) float32, optional (the lung mask, 0..1): moved with the image, by
    the same draws (flip, zoom, rotation; no brightness or gamma); the image is the same
    as without it, and the result is then ``(image_u8, mask)``."""
    check_augmentation(brightness, zoom, gamma)
    s = tf.random.experimental.stateless_split(seed, 4)
    x = tf.cast(image_u8, tf.float32) / 255.0
    x = tf.image.stateless_random_flip_left_right(x, s[0])
    if mask is not None:  # the same seed and rank: the same draw as the image's
        mask = tf.image.stateless_random_flip_left_right(mask, s[0])
    if zoom or gamma:  # own draws, so that the default recipe's draws do not move
        extra = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, 1), 2)
    if zoom:
        x = _zoom(x, extra[0], zoom)
        if mask is not None:
            mask = _zoom(mask, extra[0], zoom)
    if brightness == "additive":
        x = tf.image.stateless_random_brightness(x, 0.1, s[1])
        x = tf.image.stateless_random_contrast(x, 0.8, 1.2, s[2])
    else:
        x = x * tf.random.stateless_uniform([], s[1], *BRIGHTNESS_RANGE)
    if gamma:
        g = math.log1p(gamma)
        x = tf.clip_by_value(x, 0.0, 1.0) ** tf.exp(
            tf.random.stateless_uniform([], extra[1], -g, g))
    if rotation_degrees:
        angle = tf.random.stateless_uniform([], s[3], -1.0, 1.0) * (
            rotation_degrees * math.pi / 180.0)
        x = _rotate(x, angle)
        if mask is not None:
            mask = _rotate(mask, angle)
    out = tf.cast(tf.clip_by_value(x, 0.0, 1.0) * 255.0 + 0.5, tf.uint8)
    return out if mask is None else (out, mask)


def _zoom(image, seed, zoom: float):
    u = tf.random.stateless_uniform([3], seed)
    side = 1.0 - zoom * u[0]
    y0, x0 = (1.0 - side) * u[1], (1.0 - side) * u[2]
    box = tf.stack([y0, x0, y0 + side, x0 + side])[None]
    out = tf.image.crop_and_resize(image[None], box, [0], tf.shape(image)[:2])
    return out[0]


def _rotate(image, angle):
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # Output -> input mapping for ImageProjectiveTransformV3.
    transform = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy,
                 0.0, 0.0]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.stack(transform)[None],
        output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")
    return out[0]


@dataclass(frozen=True)
class PipelineConfig:
    input_size: int = 448
    backbone: str = "resnet50"
    # True: the images normalised as the backbone expects (a model without its own
    # normalisation layer, e.g. every model saved before it existed); False: the pixel
    # values 0..255 as float32, for a model built with include_preprocessing
    # (:meth:`for_model` sets it from the model's spec).
    normalize: bool = True
    rotation_degrees: float = 0.0
    brightness: str = "multiplicative"
    zoom: float = 0.0
    gamma: float = 0.0
    shuffle_buffer: int = 512
    deterministic: bool = False
    class_balanced: bool = False
    num_classes: int = 0  # for class balancing
    seed: int = 0
    # True: the model also takes the records' lung mask ({"image", "lung_mask"}: a DRENet
    # built with navigator_anchors="lung"; :meth:`for_model` sets it from the model's spec)
    lung_mask: bool = False

    @classmethod
    def for_model(cls, spec: dict, **kwargs) -> PipelineConfig:
        """The pipeline that feeds a model as it was trained: its input size, its backbone
        and whether it normalises its own input, from its spec
        (:func:`covid_keras.model.saving.model_spec`, or the ``covid_keras.json`` info; a spec
        without ``include_preprocessing`` is a model that expects normalised input)."""
        return cls(input_size=int(spec["input_size"]), backbone=spec["backbone"],
                   normalize=not spec.get("include_preprocessing", False),
                   lung_mask=spec.get("navigator_anchors", "all") == "lung", **kwargs)


@dataclass(frozen=True)
class TeacherTargets:
    """A teacher's class probabilities for a split's slices (``covid_keras.train
    --distill_from``): ``keys`` (N,) str, each slice's :func:`target_key`; ``probs``
    float32 (N, C), row i the slice ``keys[i]``'s."""
    keys: tuple
    probs: object  # numpy (N, C)

    def __post_init__(self):
        if len(self.keys) != len(self.probs) or len(set(self.keys)) != len(self.keys):
            raise ValueError("teacher targets need one row per key, each key once")


#: The record fields whose join names one slice (:func:`target_key`): the study and the
#: slice's own key (data_prep keeps sop keys unique within a series, one series a study).
TARGET_KEY_FIELDS = (schema.STUDY_KEY, schema.SOP_KEY)


def target_key(study_key, sop_key):
    """A slice's key for teacher targets: ``<study key>/<sop key>`` (both salted hashes).
    Python strings or bytes give a str; tensors a string tensor (in the tf.data graph)."""
    if isinstance(study_key, (str, bytes)):
        def text(v):
            return v.decode() if isinstance(v, bytes) else v

        return f"{text(study_key)}/{text(sop_key)}"
    return tf.strings.join([study_key, sop_key], separator="/")


def split_target_keys(data_dir: str, split: str) -> list[str]:
    """:func:`target_key` of every record of the split, in file order (only the key fields
    are parsed)."""
    spec = {k: v for k, v in schema.parse_spec().items() if k in TARGET_KEY_FIELDS}
    ds = tf.data.TFRecordDataset(shard_files(data_dir, split), "GZIP").map(graph_fn(
        lambda r: target_key(*(tf.io.parse_single_example(r, spec)[k]
                               for k in TARGET_KEY_FIELDS))))
    return [k.decode() for batch in ds.batch(4096) for k in batch.numpy().tolist()]


def _fingerprints(keys):
    """int64 fingerprints (tensor) of a string tensor of keys."""
    return tf.strings.to_hash_bucket_fast(keys, 2 ** 63 - 1)


def _with_targets(targets: TeacherTargets):
    """A function record -> the float32 (1 + C,) y of a distilled run (the label, then the
    teacher's probabilities: covid_keras.model.losses.DISTILL_Y), looked up by the
    fingerprint of :func:`target_key` in constants (no lookup table: a resource would not
    travel with a distributed dataset); a record without a target stops the pipeline with
    an error that says so."""
    import numpy as np

    prints = _fingerprints(tf.constant(list(targets.keys), tf.string)).numpy()
    if len(set(prints.tolist())) != len(prints):  # never seen: 63-bit fingerprints
        raise ValueError("two teacher target keys share a fingerprint: cannot join them")
    order = np.argsort(prints, kind="stable")
    sorted_prints = tf.constant(prints[order], tf.int64)
    probs = tf.constant(np.asarray(targets.probs, np.float32)[order])
    n = len(order)

    def y(r):
        key = _fingerprints(target_key(r[schema.STUDY_KEY], r[schema.SOP_KEY]))
        row = tf.minimum(tf.searchsorted(sorted_prints, key[None])[0], n - 1)
        check = tf.debugging.assert_equal(
            tf.gather(sorted_prints, row), key,
            message="a training slice has no teacher target (--distill_from): the targets "
                    "were made for other records")
        with tf.control_dependencies([check]):
            p = tf.gather(probs, row)
        return tf.concat([tf.cast(r[schema.LABEL_INDEX], tf.float32)[None], p], axis=0)

    return y


def graph_fn(fn):
    """``fn`` for tf.data as it is written (no AutoGraph conversion). The pipeline's
    functions branch only on Python values (``tf.cond`` where a tensor decides), so the
    conversion changes nothing but its cost: building a training and an evaluation pipeline
    took 1.10 s converted against 0.27 s, in every process that builds them
    (bench/pipeline_startup.py; bench/README.md, "Test suite")."""
    return tf.autograph.experimental.do_not_convert(fn)


def _parse(serialized):
    return tf.io.parse_single_example(serialized, schema.parse_spec())


def make_dataset(data_dir: str, split: str, batch_size: int, training: bool,
                 cfg: PipelineConfig = PipelineConfig(), with_meta: bool = False,
                 repeat: bool = False, shard: tuple[int, int] | None = None,
                 order_seed: int | None = None,
                 targets: TeacherTargets | None = None) -> tf.data.Dataset:
    """(image float32 (B, S, S, 3), label int32 (B,)) batches; with ``with_meta`` the second
    element is a dict: label, patient_key, study_key, slice_index, sop_key.

    ``shard=(index, count)``: this input pipeline's share for multi-worker training, by
    file when there are at least ``count`` shard files, else by record; tf.data's own
    auto-sharding is then off. Without it the policy is DATA (evaluation, single worker):
    auto-sharding by FILE must find the file list by walking the graph, which fails on
    the zipped augmentation counter ("Did not find a shardable source").

    ``order_seed`` (evaluation only): the records in a fixed shuffled order (the same every
    pass: files shuffled, then a ``cfg.shuffle_buffer`` shuffle), so that batches mix
    studies and classes as training batches do (``--bn_stats=population``); without it
    they come in file order, each study's slices together.

    ``targets`` (training only; ``covid_keras.train --distill_from``): a teacher's
    probabilities joined to each record by :func:`target_key`; the label becomes float32
    (B, 1 + C): the label, then the teacher's probabilities."""
    if targets is not None and (not training or with_meta):
        raise ValueError("teacher targets are for training batches (no with_meta)")
    files = shard_files(data_dir, split)
    options = tf.data.Options()
    options.deterministic = cfg.deterministic or not training
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF if shard
        else tf.data.experimental.AutoShardPolicy.DATA)
    by_record = None
    if shard:
        index, count = shard
        if len(files) >= count:
            files = files[index::count]
        else:
            by_record = (count, index)
    if order_seed is not None and training:
        raise ValueError("order_seed is for evaluation passes (training shuffles anyway)")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if order_seed is not None:
        ds = ds.shuffle(len(files), seed=order_seed, reshuffle_each_iteration=False)
    if training:
        ds = ds.shuffle(len(files), seed=cfg.seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
    ds = ds.interleave(graph_fn(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP")),
                       cycle_length=min(len(files), 8) if training else 1,
                       num_parallel_calls=tf.data.AUTOTUNE if training else None,
                       **({"deterministic": cfg.deterministic} if training else {}))
    if training:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    elif order_seed is not None:
        ds = ds.shuffle(cfg.shuffle_buffer, seed=order_seed, reshuffle_each_iteration=False)
    if by_record:
        ds = ds.shard(*by_record)
    ds = ds.map(graph_fn(_parse), num_parallel_calls=tf.data.AUTOTUNE)
    if training and cfg.class_balanced:
        if cfg.num_classes < 2:
            raise ValueError("class_balanced sampling needs num_classes >= 2. Received: "
                             f"{cfg.num_classes}")
        per_class = [ds.filter(graph_fn(lambda r, c=c: tf.equal(r[schema.LABEL_INDEX], c)))
                     .repeat()
                     for c in range(cfg.num_classes)]
        ds = tf.data.Dataset.sample_from_datasets(per_class, seed=cfg.seed,
                                                  stop_on_empty_dataset=False)
    if training:
        counter = tf.data.Dataset.counter(start=0)
        ds = tf.data.Dataset.zip((ds, counter))
        base = tf.constant([cfg.seed, 0], tf.int64)
        joined = None if targets is None else _with_targets(targets)

        def prepare(r, i):
            # Augment the record's own channels (1 for grey), then repeat to RGB.
            img = decode_image(r[schema.IMAGE], cfg.input_size, rgb=False)
            seed = base + tf.stack([tf.constant(0, tf.int64), i])
            mask = decode_mask(r[schema.MASK], cfg.input_size) if cfg.lung_mask else None
            img = augment(img, seed, cfg.rotation_degrees, cfg.brightness, cfg.zoom,
                          cfg.gamma, mask=mask)
            if mask is not None:
                img, mask = img
            out = _output(r, to_rgb(img), cfg, with_meta, mask)
            return out if joined is None else (out[0], joined(r))
    else:
        def prepare(r):
            mask = decode_mask(r[schema.MASK], cfg.input_size) if cfg.lung_mask else None
            return _output(r, decode_image(r[schema.IMAGE], cfg.input_size), cfg, with_meta,
                           mask)
    ds = ds.map(graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _output(r, img_u8, cfg: PipelineConfig, with_meta: bool, mask=None):
    image = model_input(tf.ensure_shape(img_u8, [cfg.input_size, cfg.input_size, 3]), cfg)
    if cfg.lung_mask:
        image = lung_model_input(image, mask, cfg.input_size)
    label = tf.cast(r[schema.LABEL_INDEX], tf.int32)
    if not with_meta:
        return image, label
    return image, {"label": label, "patient_key": r[schema.PATIENT_KEY],
                   "study_key": r[schema.STUDY_KEY],
                   "slice_index": tf.cast(r[schema.SLICE_INDEX], tf.int32),
                   "sop_key": r[schema.SOP_KEY]}


def count_records(files: list[str]) -> int:
    """Records in the given shards (reads them once)."""
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


@dataclass(frozen=True)
class ViewConfig:
    """The augmentations that make the two views of a slice for self-supervised
    pretraining (:func:`make_pretrain_dataset`): :func:`augment`'s, stronger than the
    trainer's. CT suits geometry (crop / zoom, flip, rotation) and a gamma and brightness
    change that keeps black black; no colour jitter on the HU window."""
    zoom: float = 0.5
    rotation_degrees: float = 10.0
    gamma: float = 0.4


def pretrain_record_count(sources: list[tuple[str, str]]) -> int:
    """Records in the given (data_dir, split) sources."""
    return count_records([f for d, s in sources for f in shard_files(d, s)])


def make_pretrain_dataset(sources: list[tuple[str, str]], batch_size: int, epoch: int,
                          cfg: PipelineConfig = PipelineConfig(),
                          views: ViewConfig = ViewConfig()) -> tf.data.Dataset:
    """Unlabelled slices for self-supervised pretraining: every record of the (data_dir,
    split) ``sources``, repeated, in an order and with augmentations that depend only on
    ``cfg.seed`` and ``epoch`` (a resumed run sees what the killed one would have seen).
    Each element: (images (2N, S, S, 3), zeros (2N,)), the first N rows one view of N
    slices and the next N the other view of the same slices, normalised as the backbone
    expects (the raw pixel values with ``cfg.normalize`` False). Only the image is
    parsed: the labels are never read."""
    files = [f for d, s in sources for f in shard_files(d, s)]
    image_only = {schema.IMAGE: schema.parse_spec()[schema.IMAGE]}
    order_seed = cfg.seed * 1_000_003 + int(epoch)
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    ds = ds.shuffle(max(cfg.shuffle_buffer, 1), seed=order_seed,
                    reshuffle_each_iteration=True).repeat()
    ds = ds.map(graph_fn(lambda s: tf.io.parse_single_example(s, image_only)[schema.IMAGE]),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter(start=0)))
    base = tf.constant([cfg.seed, int(epoch) + 1], tf.int64)

    def two_views(encoded, i):
        img = decode_image(encoded, cfg.input_size, rgb=False)
        out = []
        for v in range(2):
            aug = augment(img, tf.stack([base[0], base[1] * (1 << 40) + 2 * i + v]),
                          views.rotation_degrees, cfg.brightness, views.zoom, views.gamma)
            out.append(model_input(tf.ensure_shape(to_rgb(aug), [cfg.input_size,
                                                                 cfg.input_size, 3]), cfg))
        return out[0], out[1]

    ds = ds.map(graph_fn(two_views), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(graph_fn(lambda a, b: (tf.concat([a, b], axis=0), tf.zeros([2 * batch_size]))))
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
