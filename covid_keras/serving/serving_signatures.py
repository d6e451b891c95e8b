"""The SavedModel's serving functions (TensorFlow graph code), used by :mod:`covid_keras.export`.

Every signature takes *windowed slices as in the records*: the uint8 pixel values of the
slice data_prep prepared (lung crop, window, fill; ``image/encoded`` of a record), before
the backbone's normalisation, which happens inside the graph: in the model itself when it
was built with ``include_preprocessing`` (its ``BackboneNormalization`` layer; the export
info's ``include_preprocessing``), else, for a model saved before that layer, in front of
it (:func:`covid_keras.io.data.normalize`, the input pipeline's function, the same formula). A
client therefore never needs to know whether the backbone wants ``caffe``, ``torch`` or
``tf`` normalisation.

=================  ===========================================  ===========================
signature          inputs                                       outputs
=================  ===========================================  ===========================
serving_default    ``images`` float32 (B, S, S, 3), values      ``probabilities`` (B, C)
                   0..255 (uint8 range; a grey slice repeated   softmax; ``boxes``
                   on the 3 channels, or 3 windows)             (B, K, 4) (y0, x0, y1, x1)
                                                                input pixels; ``box_scores``
                                                                (B, K) in (0, 1]. A
                                                                classifier has K = 0.
predict_images     ``image_bytes`` string (B,): PNG or JPEG     the same as serving_default
                   bytes of windowed slices, any size, grey,
                   RGB, RGBA or 16-bit
predict_study      ``images`` float32 (N, S, S, 3): all the     ``probabilities`` (C,)
                   slices of ONE study (the batch is the        patient; ``score`` ();
                   study)                                       ``decision`` () int32;
                                                                ``decision_name`` ();
                                                                ``threshold`` () (-1:
                                                                argmax); ``rule`` ();
                                                                ``class_names`` (C,);
                                                                ``slice_probabilities``
                                                                (N, C); ``boxes`` (N, K, 4);
                                                                ``box_scores`` (N, K);
                                                                ``lung_fraction`` (N,)
                                                                (non-black share);
                                                                ``warning`` () (``no_lung``,
                                                                ``no_lung_slices`` or "")
gradcam            ``images`` float32 (B, S, S, 3) and          ``heatmaps`` (B, S, S) in
                   ``class_index`` int32 (B,)                   [0, 1]
=================  ===========================================  ===========================

A lung model (below) has one more input in ``predict_study`` and ``gradcam``:
``lung_masks`` uint8 (N, S, S), each slice's lung mask, 255 = lung (the records'
``mask/encoded`` at the input size, as data_prep wrote it).

Boxes are clipped to the image (0..S): the navigator's anchors may extend past it.

A DRENet trained with ``--navigator_anchors=lung`` (export info ``navigator_anchors``;
an unrestricted model's info has no such key and its signatures are exactly the table's)
takes a lung mask beside the image, and its navigator chooses only among anchors at least
a quarter on the mask. ``predict_study`` and ``gradcam`` (so that a map explains the
prediction ``predict_study`` made) of such a model take the masks as ``lung_masks`` (the
records' ``mask/encoded``, which training and evaluation use; ``covid_keras.predict`` sends
the ones data_prep computed for the study): they restrict the boxes as evaluation does.
``serving_default`` and ``predict_images`` keep their image-only inputs and give the model
a mask of ones, i.e. *no restriction* (every anchor may be chosen, the boxes an
unrestricted model with its weights would choose). The image's non-black pixels are not the
lung mask (data_prep's default ``fill_blank=rotate`` and ``--nocrop_to_lung`` leave almost
every pixel non-black) and are never used as one. A slice whose mask has no anchor a
quarter lung (an empty mask) falls back to all anchors.

``serving_default`` and ``predict_images`` do not check that a slice shows lung: an
all-black or non-CT image gets an answer like any other. ``predict_study`` does:
``lung_fraction`` is each slice's share of non-black pixels: the fraction of the S x S
input's pixels with any channel above 0, as sent (data_prep blackens everything outside
the lung mask, so a prepared slice without lung is black). It is not data_prep's lung
fraction (``slice/lung_fraction`` in the records, the ``lung_fraction`` of
``prediction.json``: the lung mask's area over the original slice's area): it is measured
on the cropped, resized input (after ``crop_to_lung`` usually larger), and any non-black
pixel counts, lung or not. ``warning`` is ``no_lung`` when no slice's share reaches
data_prep's ``min_lung_fraction`` (the records' preprocessing, default 0.05),
``no_lung_slices`` when some do not, else empty.

``predict_images`` decodes inside the graph exactly as data_prep reads a slice image
(:func:`data_prep.slice_images.read_grey`: 16-bit rescaled by 1/257, alpha composited over
black, colour to grey with OpenCV's BT.601 fixed-point weights), pads it to a square with
black (a prepared slice's background outside the lung) and resizes it to S with data_prep's
interpolation rule (area when shrinking, linear when enlarging, rounded to uint8). A model
trained on 3 windows keeps the image's 3 channels instead of greying it.

An encoded image's size is read from its header (PNG's IHDR, JPEG's frame header) before it
is decoded, and an image of more than :data:`MAX_IMAGE_PIXELS` pixels is refused (an image
bomb: a small PNG of 20000 x 20000 pixels would otherwise take gigabytes to decode);
:func:`image_header_size` is the same reading in Python, for a server to refuse it before
the bytes reach the model.

``predict_study`` aggregates with the decision stored with the run (decision.json:
``mean`` or ``any`` rule, the positive class's threshold, the normal class;
:func:`covid_keras.evaluation.evaluation.aggregate` /
:func:`covid_keras.evaluation.evaluation.patient_decisions` in graph form, the same
decision as evaluation's and :func:`covid_keras.evaluation.evaluation.decide_patient`):
positive when the score >= the threshold; otherwise, with ``any`` and a normal class (seed
004), normal only if every slice is decided normal, else the abnormal class decided on the
slices (several: the slice with the highest probability of its decided class); otherwise
the most probable other class of the patient's probabilities. Without a decision.json it
takes the mean and the most probable class (``threshold`` -1). The normal class is the
decision's ``normal_class``, or, when the decision has no such field (files written before
it existed), inferred from the class names
(:func:`covid_keras.evaluation.evaluation.normal_class_of`).
"""

from __future__ import annotations

import struct

import tensorflow as tf

from covid_keras.evaluation import gradcam
from covid_keras.io import data

SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"
PREDICT_STUDY = "predict_study"
GRADCAM = "gradcam"
SIGNATURES = (SERVING_DEFAULT, PREDICT_IMAGES, PREDICT_STUDY, GRADCAM)
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
CLASS_INDEX = "class_index"
#: A lung model's (``navigator_anchors="lung"``) extra input of predict_study and gradcam.
LUNG_MASKS = "lung_masks"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# OpenCV's cvtColor(BGR2GRAY) for uint8 (OpenCV 5, measured bit-exact on 200k colours):
# (R*9798 + G*19235 + B*3735 + 2**14) >> 15.
_GREY_WEIGHTS = (9798, 19235, 3735)
_GREY_SHIFT = 15
# An encoded slice image may have at most this many pixels (its header is read first): a
# CT slice is 512 x 512; a 16-bit RGBA image this large decodes to 128 MiB.
MAX_IMAGE_PIXELS = 4096 * 4096
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of PNG or JPEG bytes from their header alone (nothing is decoded);
    None for bytes that are neither; ValueError for a PNG / JPEG whose header is not
    readable."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("a PNG without a readable IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if not data.startswith(JPEG_MAGIC):
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return height, width
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise ValueError("a JPEG without a readable frame header")


def _pixel_check(height, width, max_pixels: int):
    pixels = tf.cast(height, tf.float64) * tf.cast(width, tf.float64)
    return tf.debugging.Assert(pixels <= float(max_pixels), [
        f"image_bytes: an image of more than {max_pixels} pixels (by its header) is refused"])


def _png_size(encoded):
    """(height, width) int64 from a PNG's IHDR (the bytes after the signature)."""
    raw = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 12, 12),
                                             b"\0" * 12]), 0, 12)
    b = tf.cast(tf.io.decode_raw(raw, tf.uint8), tf.int64)
    ok = tf.Assert(tf.equal(tf.strings.substr(raw, 0, 4), b"IHDR"),
                   ["image_bytes: a PNG without a readable IHDR header"])
    with tf.control_dependencies([ok]):
        width = b[4] * (1 << 24) + b[5] * (1 << 16) + b[6] * (1 << 8) + b[7]
        height = b[8] * (1 << 24) + b[9] * (1 << 16) + b[10] * (1 << 8) + b[11]
    return height, width


# ------------------------------------------------------------------ image decoding
def _rgb_to_grey_u8(rgb):
    """(H, W, 3) uint8 RGB -> (H, W, 1) uint8, bit-exact with cv2.cvtColor(BGR2GRAY)."""
    x = tf.cast(rgb, tf.int32)
    y = (x[..., 0] * _GREY_WEIGHTS[0] + x[..., 1] * _GREY_WEIGHTS[1]
         + x[..., 2] * _GREY_WEIGHTS[2] + (1 << (_GREY_SHIFT - 1))) // (1 << _GREY_SHIFT)
    return tf.cast(y, tf.uint8)[..., None]


def _composite(rgb, alpha):
    """Alpha over black as data_prep: rint(rgb * float32(alpha / 255))."""
    a = tf.cast(alpha, tf.float32) / 255.0
    return tf.cast(tf.math.rint(tf.cast(rgb, tf.float32) * a), tf.uint8)


def decode_u8(encoded, max_pixels: int = MAX_IMAGE_PIXELS):
    """PNG / JPEG bytes -> (H, W, C) uint8, C in 1..4, as OpenCV decodes for data_prep
    (16-bit PNG: rint(x / 257); JPEG with the accurate integer DCT). An image of more than
    ``max_pixels`` pixels by its header is refused before it is decoded."""
    head8 = tf.strings.substr(encoded, 0, 8)
    head3 = tf.strings.substr(encoded, 0, 3)
    is_png = tf.equal(head8, PNG_MAGIC)
    is_jpeg = tf.equal(head3, JPEG_MAGIC)
    check = tf.debugging.Assert(tf.logical_or(is_png, is_jpeg),
                                ["image_bytes: not a PNG or JPEG image"])

    def png():
        with tf.control_dependencies([_pixel_check(*_png_size(encoded), max_pixels)]):
            x = tf.io.decode_png(encoded, channels=0, dtype=tf.uint16)  # 8-bit: x * 257
        return tf.cast(tf.math.rint(tf.cast(x, tf.float32) / 257.0), tf.uint8)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)  # the frame header only
        with tf.control_dependencies([_pixel_check(shape[0], shape[1], max_pixels)]):
            return tf.io.decode_jpeg(encoded, channels=0, dct_method="INTEGER_ACCURATE")

    with tf.control_dependencies([check]):
        return tf.cond(is_png, png, jpeg)


def to_grey_u8(img):
    """(H, W, C) uint8 -> (H, W, 1): :func:`data_prep.slice_images.to_grey_u8` in graph
    form (grey as is; grey + alpha and RGBA composited over black; colour to BT.601)."""
    c = tf.shape(img)[-1]
    return tf.switch_case(c - 1, [
        lambda: img[..., :1],
        lambda: _composite(img[..., :1], img[..., 1:2]),
        lambda: _rgb_to_grey_u8(img[..., :3]),
        lambda: _rgb_to_grey_u8(_composite(img[..., :3], img[..., 3:4])),
    ])


def pad_square_resize_u8(img, size: int):
    """(H, W, C) uint8 -> (size, size, C): centred on a black square, then resized as
    data_prep.preprocess.prepare_slice resizes (area when shrinking, linear when
    enlarging), rounded."""
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    side = tf.maximum(h, w)
    img = tf.image.pad_to_bounding_box(img, (side - h) // 2, (side - w) // 2, side, side)

    def resize(method):
        def fn():
            out = tf.image.resize(tf.cast(img, tf.float32), [size, size], method=method)
            return tf.cast(tf.clip_by_value(tf.math.rint(out), 0.0, 255.0), tf.uint8)
        return fn

    return tf.case([(tf.equal(side, size), lambda: img),
                    (tf.greater(side, size), resize("area"))],
                   default=resize("bilinear"), exclusive=False)


def decode_slice_u8(encoded, size: int, channels: int):
    """One encoded windowed slice -> uint8 (size, size, 3) as the model's input records
    hold it: decoded, grey (``channels`` 1) or its first 3 channels (``channels`` 3),
    padded square, resized, repeated to 3 channels."""
    img = decode_u8(encoded)
    if channels == 1:
        img = to_grey_u8(img)
    else:
        check = tf.debugging.Assert(tf.shape(img)[-1] >= 3, [
            "image_bytes: a 3-window model needs 3-channel slice images"])
        with tf.control_dependencies([check]):
            img = tf.identity(img[..., :3])
    img = pad_square_resize_u8(img, size)
    img = tf.ensure_shape(img, [size, size, channels])
    return tf.ensure_shape(data.to_rgb(img), [size, size, 3])


def non_black(images):
    """(B, S, S, 3) 0..255 -> (B, S, S, 1) float32: 1 where any channel is above 0 (a
    prepared slice is black outside data_prep's lung mask)."""
    return tf.cast(tf.reduce_any(images > 0.0, axis=-1, keepdims=True), tf.float32)


# ------------------------------------------------------------------ the functions
class Signatures:
    """The serving functions of one Keras model (DRENet or a classifier).

    ``info``: the export's description (``class_names``, ``input_size``, ``backbone``,
    ``windows``); ``decision``: ``{"rule", "threshold", "positive_class"}`` (and
    ``normal_class``, else inferred from the class names) or ``None`` (argmax)."""

    def __init__(self, model, info: dict, decision: dict | None):
        self.model = model
        self.size = int(info["input_size"])
        # the model's input as the trainer fed it (a model saved before
        # BackboneNormalization expects normalised input): data.model_input
        self.pipeline = data.PipelineConfig.for_model(info)
        self.class_names = list(info["class_names"])
        self.channels = len(info.get("windows") or [None])
        if self.channels not in (1, 3):
            raise ValueError(f"1 or 3 windows. Received: {info.get('windows')}")
        self.decision = decision
        self.normal = None  # the normal class's index (the "any" rule), or None
        if decision is not None:
            from covid_keras.evaluation.evaluation import normal_class_of

            normal = normal_class_of(decision, self.class_names)
            if normal is not None:
                if normal not in self.class_names:
                    raise ValueError(f"normal_class {normal!r} is not one of "
                                     f"{self.class_names}")
                self.normal = self.class_names.index(normal)
        self.cam_model = None
        from data_prep.settings import PrepSettings

        self.min_lung_fraction = float(PrepSettings.from_export_info(info).min_lung_fraction)

    # specs
    def image_spec(self, name: str = IMAGES):
        return tf.TensorSpec([None, self.size, self.size, 3], tf.float32, name=name)

    def mask_spec(self):
        return tf.TensorSpec([None, self.size, self.size], tf.uint8, name=LUNG_MASKS)

    def input_signatures(self) -> dict:
        """A lung model's predict_study and gradcam take ``lung_masks`` too (last)."""
        masks = [self.mask_spec()] if self.pipeline.lung_mask else []
        return {
            SERVING_DEFAULT: [self.image_spec()],
            PREDICT_IMAGES: [tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)],
            PREDICT_STUDY: [self.image_spec()] + masks,
            GRADCAM: [self.image_spec(), tf.TensorSpec([None], tf.int32, name=CLASS_INDEX)]
            + masks,
        }

    def functions(self) -> dict:
        return {SERVING_DEFAULT: self.serving_default, PREDICT_IMAGES: self.predict_images,
                PREDICT_STUDY: self.predict_study, GRADCAM: self.gradcam}

    # the model
    def _model_input(self, images, lung_masks=None):
        """The model's input from 0..255 images; for a lung model (``navigator_anchors=
        "lung"``) with its mask: ``lung_masks`` (uint8 (B, S, S), 255 = lung, as
        :func:`covid_keras.io.data.decode_mask` reads the records' masks), else ones (no
        restriction; see the module docstring)."""
        x = data.model_input(images, self.pipeline)
        if not self.pipeline.lung_mask:
            return x
        if lung_masks is None:
            mask = tf.ones(tf.concat([tf.shape(images)[:3], [1]], 0), tf.float32)
        else:
            check = tf.debugging.assert_equal(
                tf.shape(lung_masks)[0], tf.shape(images)[0],
                message=f"{LUNG_MASKS}: one mask per image")
            with tf.control_dependencies([check]):
                mask = tf.cast(lung_masks, tf.float32)[..., None] / 255.0
        return data.lung_model_input(x, mask, self.size)

    def _outputs(self, images, lung_masks=None):
        out = self.model(self._model_input(images, lung_masks), training=False)
        if not isinstance(out, dict):
            out = {"logits": out}
        probs = tf.nn.softmax(tf.cast(out["logits"], tf.float32), axis=-1)
        batch = tf.shape(probs)[0]
        if "boxes" in out:  # clipped: an anchor may extend past the image
            boxes = tf.clip_by_value(tf.cast(out["boxes"], tf.float32), 0.0, float(self.size))
            scores = tf.cast(out["box_scores"], tf.float32)
        else:
            boxes = tf.zeros([batch, 0, 4], tf.float32)
            scores = tf.zeros([batch, 0], tf.float32)
        return {"probabilities": probs, "boxes": boxes, "box_scores": scores}

    def serving_default(self, images):
        """``images`` -> ``probabilities``, ``boxes``, ``box_scores`` (the module's table).
        Image-only: a model trained with ``--navigator_anchors=lung`` gets a mask of ones,
        i.e. no restriction (its boxes are those of the unrestricted navigator with its
        weights); ``predict_study`` restricts them to its ``lung_masks``."""
        return self._outputs(images)

    def predict_images(self, image_bytes):
        """As :meth:`serving_default` (a lung model unrestricted too), from PNG / JPEG
        bytes decoded in the graph."""
        images = tf.map_fn(lambda b: decode_slice_u8(b, self.size, self.channels),
                           image_bytes, fn_output_signature=tf.TensorSpec(
                               [self.size, self.size, 3], tf.uint8))
        return self._outputs(tf.cast(images, tf.float32))

    def predict_study(self, images, lung_masks=None):
        """One study's slices -> the patient's answer (the module's table). A lung model's
        navigator chooses among the anchors on each slice's ``lung_masks`` (its
        signature's second input)."""
        check = tf.debugging.assert_positive(
            tf.shape(images)[0], message="predict_study: a study needs at least one slice")
        # the model must wait for the check: without the dependency the graph may run an
        # op that fails on the empty batch first, and the error then names that op
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        out = self._outputs(images, lung_masks)
        probs = out["probabilities"]
        names = tf.constant(self.class_names)
        if self.decision is None:
            patient = tf.reduce_mean(probs, axis=0)
            decision = tf.cast(tf.argmax(patient), tf.int32)
            score = tf.reduce_max(patient)
            threshold, rule = tf.constant(-1.0), tf.constant("mean")
        else:
            pos = self.class_names.index(self.decision["positive_class"])
            if self.decision["rule"] == "mean":
                patient = tf.reduce_mean(probs, axis=0)
            else:  # any: the probabilities of the slice with the highest positive score
                patient = probs[tf.argmax(probs[:, pos])]
            score = patient[pos]
            t = float(self.decision["threshold"])
            others = tf.tensor_scatter_nd_update(patient, [[pos]], [-1.0])
            other = tf.cast(tf.argmax(others), tf.int32)
            if self.decision["rule"] == "any" and self.normal is not None:
                other = self._any_other(probs, pos, t)
            decision = tf.where(score >= t, tf.constant(pos, tf.int32), other)
            threshold, rule = tf.constant(t, tf.float32), tf.constant(self.decision["rule"])
        lung = tf.reduce_mean(non_black(images)[..., 0], axis=[1, 2])
        no_lung = lung < self.min_lung_fraction
        warning = tf.where(tf.reduce_all(no_lung), "no_lung",
                           tf.where(tf.reduce_any(no_lung), "no_lung_slices", ""))
        return {"probabilities": patient, "score": score, "decision": decision,
                "decision_name": tf.gather(names, decision), "threshold": threshold,
                "rule": rule, "class_names": names, "slice_probabilities": probs,
                "boxes": out["boxes"], "box_scores": out["box_scores"],
                "lung_fraction": lung, "warning": warning}

    def _any_other(self, probs, pos: int, t: float):
        """Seed 004's ``any`` decision when no slice reaches the threshold
        (:func:`covid_keras.evaluation.evaluation.any_rule_other`): the normal class only if every
        slice is decided normal, else the decided class of the abnormal slice with the
        highest probability of its decided class (ties: the first)."""
        c = len(self.class_names)
        not_pos = 1.0 - tf.one_hot(pos, c, dtype=probs.dtype)
        others = probs * not_pos - (1.0 - not_pos)  # the positive column at -1
        slice_dec = tf.where(probs[:, pos] >= t, tf.constant(pos, tf.int32),
                             tf.cast(tf.argmax(others, axis=1), tf.int32))
        normal = tf.constant(self.normal, tf.int32)
        abnormal = tf.not_equal(slice_dec, normal)
        own = tf.gather(probs, slice_dec, axis=1, batch_dims=1)
        strength = tf.where(abnormal, own, tf.fill(tf.shape(own), -1.0))
        strongest = tf.gather(slice_dec, tf.argmax(strength, output_type=tf.int32))
        return tf.where(tf.reduce_any(abnormal), strongest, normal)

    def gradcam(self, images, class_index, lung_masks=None):
        """Heat maps of ``class_index``; a lung model with its ``lung_masks`` (the
        signature's third input), as predict_study predicted."""
        if self.cam_model is None:  # one per member of an ensemble: their maps' mean
            self.cam_model = gradcam.cam_models(self.model)
        x = self._model_input(images, lung_masks)
        maps = []
        for cam in self.cam_model:
            with tf.GradientTape() as tape:
                tape.watch(x[data.IMAGE_INPUT] if isinstance(x, dict) else x)
                conv, logits = cam(x, training=False)
                target = tf.gather(tf.cast(logits, tf.float32), class_index, axis=1,
                                   batch_dims=1)
            grads = tape.gradient(target, conv)
            maps.append(gradcam.combine(conv, grads, (self.size, self.size)))
        return {"heatmaps": maps[0] if len(maps) == 1 else tf.reduce_mean(tf.stack(maps), 0)}
