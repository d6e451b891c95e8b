"""Benchmark: the accuracy protocol on a machine without TensorFlow (KERAS_BACKEND=jax, GPU).

The same protocol as ``bench/accuracy.py`` (flagfiles x seeds, checkpoint chosen on val
by the smoothed patient AUC with the prediction loss breaking ties, held-out splits
reported once), but over a ``.npz`` written by ``bench/export_npz.py`` instead of
TFRecords, with the input pipeline done in NumPy: per epoch a seeded shuffle, the last
partial batch dropped, the trainer's augmentation (flip, brightness jitter and, where the
flagfile asks, zoom, gamma and rotation: the same distributions as the tf.data pipeline),
grey to RGB. The model takes the pixel values: the backbone's normalisation is its first
layer (``include_preprocessing``: :class:`covid_keras.model.layers.BackboneNormalization`; no
copy of it here), ``--input_norm`` another layer of it. The optimiser, schedule and loss
are the project's own (:mod:`covid_keras.model.drenet`, :mod:`covid_keras.model.baselines`,
:mod:`covid_keras.training.recipes`), built from the flagfile's flags;
``--input_size`` overrides the flagfile's (448 on the GPU).
A flagfile with ``--classifier_flagfile`` (e.g. DRENet from a ResNet-50 classifier) runs
that stage first in the same job, as the trainer does: the classifier flagfile with the same
seed, fold and input size (``<run>.stage.json``), then the run from its chosen weights' image
backbone (``<run>.stage.weights.h5``); the run's JSON repeats the stage's figures
(``classifier_stage``: the pair of the same seed). A finished stage is reused when it was
made from the same inputs (its flags, overrides, seed, fold, size and data file, recorded in
its JSON), trained again otherwise; ``--rerun`` trains it again too.
Differences from ``covid_keras.train``: no tf.data shuffle buffer (a full shuffle instead),
no TensorBoard, the best weights are kept in memory.

Runs go in parallel (``--jobs``, one process each, sharing the GPU); each writes its JSON
to ``--work_dir`` as it finishes, and a rerun reuses finished ones. Ends with the same
table and ``RESULT {json}`` line as ``bench/accuracy.py``.

    python bench/accuracy_jax.py --data=covid_ct_holdout.npz \\
        --flagfiles=configs/covid_ct_drenet.cfg,configs/covid_ct_resnet50.cfg \\
        --seeds=0,1,2 --input_size=448 --jobs=6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from accuracy import mean_sd, print_table, stability_of, summarise  # noqa: E402
from common import emit_result, parser  # noqa: E402

SMOOTHING_EPOCHS = 3  # covid_keras.training.callbacks.SMOOTHING_EPOCHS (that module imports TF)


def smoothed_choice(recent: list[float], loss: float) -> tuple[float, tuple[float, float]]:
    """The trainer's checkpoint rule on val (``BestCheckpoint``, smoothed_patient_auc):
    the mean patient AUC of ``recent`` (the last ``SMOOTHING_EPOCHS`` epochs, NaN ones left
    out) and the key that the best epoch minimises (ties: the lower ``loss``)."""
    finite = [a for a in recent if a == a]
    smoothed = sum(finite) / len(finite) if finite else float("nan")
    return smoothed, (-smoothed if finite else float("inf"), loss)


def read_flagfile(path: str) -> dict[str, str]:
    """The flagfile's flags (nested --flagfile= included as covid_keras.core.cli resolves them;
    later lines win): name -> value ("true"/"false" for --name / --noname)."""
    from covid_keras.core.cli import expand_flagfiles

    out: dict[str, str] = {}
    for arg in expand_flagfiles(["prog", f"--flagfile={path}"])[1:]:
        name, sep, value = arg[2:].partition("=")
        if not sep and name.startswith("no"):
            out[name[2:]] = "false"
        else:
            out[name] = value if sep else "true"
    return out


def pixels(x_u8: np.ndarray) -> np.ndarray:
    """The models' input: the pixel values as float32 (0..255). The models are built with
    ``include_preprocessing``: the backbone's normalisation is their first layer
    (covid_keras.model.layers.BackboneNormalization), as in the trainer's models."""
    return x_u8.astype(np.float32)


def to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    import cv2

    out = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
                    for im in images])
    return out.reshape(out.shape[:3] + (images.shape[-1],))


def _warp(x: np.ndarray, out_to_in: np.ndarray, replicate: bool) -> np.ndarray:
    """Bilinear resampling of one (H, W, C) image through an output -> input affine map;
    outside the image: the edge (``replicate``) or black."""
    import cv2

    h, w = x.shape[:2]
    out = cv2.warpAffine(x, out_to_in, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT,
                         borderValue=0.0)
    return out.reshape(x.shape)


def zoom_image(x: np.ndarray, side: float, y0: float, x0: float) -> np.ndarray:
    """The square [y0, y0 + side] x [x0, x0 + side] (fractions of the image) resized back
    to the full size, bilinear, sampled as ``tf.image.crop_and_resize`` samples a box."""
    h, w = x.shape[:2]
    # crop_and_resize to the same size: output pixel i reads input y0 * (h - 1) + i * side
    m = np.array([[side, 0.0, x0 * (w - 1)], [0.0, side, y0 * (h - 1)]], np.float32)
    return _warp(x, m, replicate=True)


def rotate_image(x: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by ``angle`` radians about the centre, bilinear, black outside: as
    ``covid_keras.io.data._rotate`` (ImageProjectiveTransformV3, constant 0 fill)."""
    h, w = x.shape[:2]
    c, s = np.cos(angle), np.sin(angle)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]], np.float32)
    return _warp(x, m, replicate=False)


def augment(batch_u8: np.ndarray, rng: np.random.Generator,
            brightness: str = "multiplicative", zoom: float = 0.0, gamma: float = 0.0,
            rotation_degrees: float = 0.0) -> np.ndarray:
    """The trainer's augmentation (``covid_keras.io.data.augment``) in NumPy, in its order:
    horizontal flip (p 0.5); ``zoom`` z: a square of side x U(1 - z, 1) at a random place,
    resized back; brightness x U(BRIGHTNESS_RANGE) (``brightness="additive"``: +- 0.1 then
    contrast x U(0.8, 1.2) around each image's channel means); ``gamma`` g:
    x ** exp(U(-ln(1 + g), ln(1 + g))); rotation by U(-r, r) degrees, black outside. The
    same distributions as the tf.data pipeline, not the same draws."""
    from covid_keras.core.imaging import BRIGHTNESS_RANGE, check_augmentation

    check_augmentation(brightness, zoom, gamma)
    x = batch_u8.astype(np.float32) / 255.0
    flip = rng.random(len(x)) < 0.5
    x[flip] = x[flip, :, ::-1]
    if zoom:
        u = rng.random((len(x), 3))
        sides = 1.0 - zoom * u[:, 0]
        x = np.stack([zoom_image(im, side, (1.0 - side) * uy, (1.0 - side) * ux)
                      for im, side, uy, ux in zip(x, sides, u[:, 1], u[:, 2])])
    shape = (len(x), 1, 1, 1)
    if brightness == "additive":
        x += rng.uniform(-0.1, 0.1, size=shape).astype(np.float32)
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * rng.uniform(0.8, 1.2, size=shape).astype(np.float32) + mean
    else:
        x *= rng.uniform(*BRIGHTNESS_RANGE, size=shape).astype(np.float32)
    if gamma:
        g = np.log1p(gamma)
        x = np.clip(x, 0.0, 1.0) ** np.exp(rng.uniform(-g, g, size=shape)).astype(np.float32)
    if rotation_degrees:
        angles = rng.uniform(-1.0, 1.0, len(x)) * np.deg2rad(rotation_degrees)
        x = np.stack([rotate_image(im, a) for im, a in zip(x, angles)])
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def compiled_forward(model):
    """``x -> model(x, training=True)`` compiled with ``jax.jit`` (``stateless_call``, the
    new non-trainable variables assigned back): the population pass's forward
    (``covid_keras.training.bn_stats``); DRENet, 128 px, on 2 CPU cores: 12 batches in 41 s against
    50-72 s eager (the first batch runs eagerly in both). Traced at its first call per
    batch shape: with the batch norms' momenta as they are then (0 inside the pass)."""
    import jax

    @jax.jit
    def step(trainable, non_trainable, xb):
        return model.stateless_call(trainable, non_trainable, xb, training=True)[1]

    def forward(xb) -> None:
        new = step([v.value for v in model.trainable_variables],
                   [v.value for v in model.non_trainable_variables], xb)
        for v, val in zip(model.non_trainable_variables, new):
            v.assign(val)
    return forward


def fold_pool(d, folds: int, seed: int, fold: int) -> dict:
    """``--folds``: train = the training patients (train + val) outside fold ``fold``, val =
    fold ``fold``'s. The folds are ``train --folds``'s with this seed on the records the
    file came from (covid_keras.training.folds: by patient, stratified by label and site,
    ordered by content), from the file's ``patient_label``, ``patient_site`` and
    ``patient_order``; a file exported before them gets folds stratified by label alone,
    other than train's (said on stderr). Returns {split: (images, labels, patient
    numbers)}."""
    from covid_keras.training import folds as folds_mod

    imgs = np.concatenate([d["train_images"], d["val_images"]])
    labels = np.concatenate([d["train_labels"], d["val_labels"]])
    keys = np.concatenate([d["train_patients"], d["val_patients"]])
    if "patient_order" in d:
        table = {str(k): (str(d["patient_label"][k]), str(d["patient_site"][k]))
                 for k in np.unique(keys)}
        order = {k: str(d["patient_order"][int(k)]) for k in table}
    else:
        print("accuracy_jax: the .npz has no patient_order (exported before it): folds "
              "stratified by label alone, not train --folds's; export it again",
              file=sys.stderr)
        table = {str(k): (str(int(lab)), "default") for k, lab in zip(keys, labels)}
        order = None
    assignment = folds_mod.assign_folds(table, folds, seed, order)
    inside = np.asarray([assignment[str(k)] == fold for k in keys])
    return {"train": (imgs[~inside], labels[~inside], keys[~inside]),
            "val": (imgs[inside], labels[inside], keys[inside])}


def classifier_stage(data_path: str, flagfile: str, seed: int, input_size: int | None,
                     overrides: dict[str, str], out_path: Path, track_held_out: bool,
                     bn_stats: str, fold: tuple[int, int] | None) -> tuple[dict, Path]:
    """``--classifier_flagfile``'s stage, as ``train`` runs it: the classifier flagfile
    with the same seed, fold, input size and overrides (less the stage flags), its result
    beside the run's (``<run>.stage.json``) and its chosen weights' image backbone as a
    ``.weights.h5`` that the run's backbone starts from; a finished stage is reused."""
    stage_json, weights = stage_paths(out_path)
    own = {k: v for k, v in overrides.items()
           if k not in ("classifier_flagfile", "classifier_dir", "classifier_data_dir")}
    data = os.stat(data_path)
    inputs = {"flags": read_flagfile(flagfile), "overrides": own, "seed": seed,
              "input_size": input_size, "bn_stats": bn_stats,
              "fold": list(fold) if fold else None,
              "data": {"path": os.path.abspath(data_path), "bytes": data.st_size,
                       "mtime_ns": data.st_mtime_ns}}
    if stage_json.exists() and weights.exists():
        done = json.loads(stage_json.read_text())
        if done.get("stage_inputs") == json.loads(json.dumps(inputs)):
            return done, weights
        print(f"[{Path(flagfile).stem} seed {seed}] the stage in {stage_json} was made from "
              "other inputs: trained again", flush=True)
    res = run_one(data_path, flagfile, seed, input_size, own, stage_json, track_held_out,
                  bn_stats, fold, save_backbone=weights, record={"stage_inputs": inputs})
    return res, weights


def stage_paths(out_path: Path) -> tuple[Path, Path]:
    """A run's classifier stage: its JSON and its backbone weights file."""
    return out_path.with_suffix(".stage.json"), out_path.with_suffix(".stage.weights.h5")


def run_one(data_path: str, flagfile: str, seed: int, input_size: int | None,
            overrides: dict[str, str], out_path: Path, track_held_out: bool = False,
            bn_stats: str = "moving", fold: tuple[int, int] | None = None,
            save_backbone: Path | None = None, record: dict | None = None) -> dict:
    """One run of ``flagfile`` (its JSON written to ``out_path``, with ``record``'s entries);
    ``save_backbone``: also write the chosen weights' image backbone there (a classifier
    stage's output)."""
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    from covid_keras.core.cli import quiet_stderr
    from covid_keras.evaluation import metrics
    from covid_keras.model import keras_private
    from covid_keras.model.backbones import BN_MOMENTUM, set_bn_momentum
    from covid_keras.model.baselines import apply_trainable, build_classifier
    from covid_keras.model.drenet import build_drenet
    from covid_keras.model.saving import model_spec
    from covid_keras.training import bn_stats as bn_population
    from covid_keras.training import recipes

    f = read_flagfile(flagfile)
    f.update(overrides)
    if f.get("classifier_data_dir"):
        raise ValueError("--classifier_data_dir is not supported here: one .npz holds one "
                         "data set")
    stage, start = None, None
    if f.get("classifier_flagfile"):  # the stage first (it seeds and runs its own model)
        stage, start = classifier_stage(data_path, f["classifier_flagfile"], seed,
                                        input_size, overrides, out_path, track_held_out,
                                        bn_stats, fold)
    size = input_size or int(f.get("input_size", 448))
    backbone = f.get("backbone", "resnet50")
    epochs, batch = int(f.get("epochs", 120)), int(f.get("batch_size", 4))
    # seeds TensorFlow too where it is installed, importing it: its C++ start-up notices
    # (oneDNN, whatever TF_CPP_MIN_LOG_LEVEL says) stay out of the run's log
    with quiet_stderr():
        keras.utils.set_random_seed(seed)
    d = np.load(data_path)
    classes = [str(c) for c in d["classes"]]
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in d]
    held_out = [s for s in splits if s not in ("train", "val")]
    x = {s: resize(d[f"{s}_images"], size) for s in splits}
    y = {s: d[f"{s}_labels"] for s in splits}
    pat = {s: d[f"{s}_patients"] for s in splits}
    if fold is not None:  # --folds: fold k's train / val from the training patients
        for s, (imgs, labels, keys) in fold_pool(d, fold[1], seed, fold[0]).items():
            x[s], y[s], pat[s] = resize(imgs, size), labels, keys
    n = len(classes)
    hidden = f.get("head_hidden_units")
    input_norm = f.get("input_norm", "none")
    aug = {"brightness": f.get("brightness_jitter", "multiplicative"),
           "zoom": float(f.get("zoom_jitter", 0.0)),
           "gamma": float(f.get("gamma_jitter", 0.0)),
           "rotation_degrees": float(f.get("rotation_degrees", 0.0))}
    if f.get("model", "drenet") == "drenet":
        model = build_drenet(n, input_size=size, backbone=backbone,
                             weights=str(start) if start else None,
                             variant=f.get("variant", "paper"),
                             trainable=f.get("trainable", "all"),
                             head_hidden_units=int(hidden) if hidden not in (None, "") else None,
                             bn_momentum=float(f.get("bn_momentum", BN_MOMENTUM)),
                             input_norm=input_norm, include_preprocessing=True)
        compile_kw = {}
    else:
        model = build_classifier(backbone, n, size, str(start) if start else None,
                                 trainable=f.get("trainable", "all"),
                                 input_norm=input_norm, include_preprocessing=True)
        compile_kw = {"loss": {"logits": keras.losses.SparseCategoricalCrossentropy(
            from_logits=True)}}
    apply_trainable(model, f.get("trainable", "all"))
    set_bn_momentum(model, float(f.get("bn_momentum", BN_MOMENTUM)))  # --bn_momentum
    steps = max(1, len(y["train"]) // batch)
    decay = [int(e) for e in f.get("lr_decay_epochs", "").split(",") if e.strip()]
    lr = recipes.schedule(float(f.get("learning_rate", 8e-4)), steps, decay,
                          float(f.get("lr_decay_factor", 0.1)))
    opt = recipes.make_optimizer(f.get("optimizer", "sgd"), lr, float(f.get("momentum", 0.9)),
                                 float(f.get("weight_decay", 1e-4)),
                                 f.get("weight_decay_type", "coupled"),
                                 float(f.get("ema_momentum", 0.0)))
    # "auto": XLA under JAX (this script's backend) and on a TensorFlow GPU; not under
    # TensorFlow on a CPU (the test suite's in-process run), where compiling costs more
    # than it saves
    model.compile(optimizer=opt, jit_compile="auto", **compile_kw)
    ema = opt.use_ema  # --ema_momentum: validate and keep the weights' moving average
    rng = np.random.default_rng([seed, 12345])
    x_eval = {s: pixels(to_rgb(x[s])) for s in splits if s != "train"}
    # --bn_stats: the population statistics come from the training images as evaluated
    # (no augmentation), in training-size batches in a fixed shuffled order (batches that
    # mix patients and classes, as in training; the records come patient by patient)
    if bn_stats != "moving":
        pop_order = np.random.default_rng([seed, 777]).permutation(len(y["train"]))
        x_pop = pixels(to_rgb(x["train"][pop_order]))
        pop_batches = [x_pop[i:i + batch] for i in range(0, len(x_pop), batch)]
        pop_forward = compiled_forward(model)

    def population_stats() -> list:
        """Sets the population statistics; returns the moving ones to put back."""
        saved = [np.array(v.value) for v in model.non_trainable_variables]
        bn_population.set_population_statistics(model, pop_batches, forward=pop_forward)
        return saved

    def restore(saved: list) -> None:
        for v, val in zip(model.non_trainable_variables, saved):
            v.assign(val)

    def score(logits, split: str) -> tuple[dict, float]:
        """Metrics and cross-entropy of one output's logits on ``split``."""
        probs = softmax(np.asarray(logits, np.float64))
        m = metrics.classification_metrics(probs, y[split], pat[split], classes)
        return m, float(-np.mean(np.log(probs[np.arange(len(probs)), y[split]] + 1e-12)))

    def evaluate(split: str) -> tuple[dict, float]:
        """The prediction's metrics and loss on ``split``; for DRENet, ``m["raw"]`` holds
        the global branch's (``raw_logits``) metrics and ``"loss"`` too (diagnostics)."""
        out = model.predict(x_eval[split], batch_size=32, verbose=0)
        m, loss = score(out["logits"] if isinstance(out, dict) else out, split)
        if isinstance(out, dict) and "raw_logits" in out:
            raw_m, raw_loss = score(out["raw_logits"], split)
            m["raw"] = dict(raw_m, loss=raw_loss)
        return m, loss

    def paired(suffix: str) -> dict:
        """The diagnostic figures of the model as it stands, keys ending in ``suffix``: val
        patient / slice AUC and loss, and each held-out split's patient AUC if tracked."""
        m, loss = evaluate("val")
        out = {f"val_patient_auc{suffix}": m["patient_auc"],
               f"val_slice_auc{suffix}": m["slice_auc"], f"val_prediction_loss{suffix}": loss}
        if track_held_out:
            for split in held_out:
                out[f"{split}_patient_auc{suffix}"] = evaluate(split)[0]["patient_auc"]
        return out

    history, recent = [], []
    best_key, best_epoch, best_weights = None, None, None
    t0 = time.time()
    for epoch in range(epochs):
        order = rng.permutation(len(y["train"]))
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            xb = pixels(to_rgb(augment(x["train"][idx], rng, **aug)))
            logs = model.train_on_batch(xb, y["train"][idx], return_dict=True)
        extra = {}
        if ema:  # diagnostics: the weights being trained, before the average goes in
            extra = paired("_noavg")  # (paired with the average, same run)
            # the average in for validation (and the best weights), the raw weights back
            keras_private.swap_ema_weights(model)  # before the next step
        if bn_stats == "both":  # diagnostics: the same weights with population statistics
            saved = population_stats()
            extra.update(paired("_pop"))
            restore(saved)
        saved = population_stats() if bn_stats == "population" else None
        m, loss = evaluate("val")
        recent = (recent + [m["patient_auc"]])[-SMOOTHING_EPOCHS:]
        smoothed, key = smoothed_choice(recent, loss)
        if best_key is None or key < best_key:
            best_key, best_epoch, best_weights = key, epoch + 1, model.get_weights()
        row = {"epoch": epoch + 1, "val_patient_auc": m["patient_auc"],
               "val_slice_auc": m["slice_auc"], "val_prediction_loss": loss,
               "val_patient_auc_smoothed": smoothed,
               "train_loss": float(logs.get("loss", float("nan"))),
               "seconds": time.time() - t0}
        if "raw" in m:  # DRENet: the global branch alone, beside the prediction (*_raw)
            row["val_patient_auc_raw"] = m["raw"]["patient_auc"]
            row["val_prediction_loss_raw"] = m["raw"]["loss"]
        if track_held_out:  # diagnostics only: never used to choose anything
            for split in held_out:
                hm = evaluate(split)[0]
                row[f"{split}_patient_auc"] = hm["patient_auc"]
                if "raw" in hm:
                    row[f"{split}_patient_auc_raw"] = hm["raw"]["patient_auc"]
        row.update(extra)
        if saved is not None:  # training goes on from the moving statistics
            restore(saved)
        if ema:
            keras_private.swap_ema_weights(model)
        history.append(row)
        partial = out_path.with_suffix(".partial.json")
        partial.write_text(json.dumps({"seed": seed, "best_epoch": best_epoch,
                                       "bn_stats": bn_stats, "history": history},
                                      default=float))
        print(f"[{Path(flagfile).stem} seed {seed}] epoch {epoch + 1}: val patient AUC "
              f"{m['patient_auc']:.3f} (smoothed {smoothed:.3f}), loss {loss:.3f}, "
              f"{time.time() - t0:.0f} s", flush=True)
    model.set_weights(best_weights)
    if save_backbone is not None:  # a classifier stage's output, as the trainer's stage
        from covid_keras.training.transfer import write_image_backbone

        write_image_backbone(model, str(save_backbone))
    val_m, _ = evaluate("val")
    res = {"seed": seed, "best_epoch": best_epoch, "input_size": size, "bn_stats": bn_stats,
           "model": model_spec(keras.saving.serialize_keras_object(model)), "augment": aug,
           "val": {k: val_m[k] for k in ("patient_auc", "slice_auc")},
           "stability": stability_of([h["val_patient_auc"] for h in history]),
           "history": history, "train_seconds": time.time() - t0,
           "backend": keras.backend.backend()}
    for split in held_out:
        m, _ = evaluate(split)
        res[split] = {k: m[k] for k in ("patient_auc", "slice_auc")}
    if stage is not None:  # the classifier it started from (same seed): a paired figure
        res["classifier_stage"] = {k: stage[k] for k in ["seed", "best_epoch", "val",
                                                         *held_out] if k in stage}
    if fold is not None:  # the ensemble is assembled from every fold's probabilities
        res["fold"], res["classes"] = list(fold), classes
        res["train_patients"] = sorted({str(k) for k in pat["train"]})
        for split in ["val", *held_out]:
            out = model.predict(x_eval[split], batch_size=32, verbose=0)
            res[f"{split}_probs"] = softmax(np.asarray(
                out["logits"] if isinstance(out, dict) else out, np.float64)).tolist()
            res[f"{split}_labels"] = np.asarray(y[split]).tolist()
            res[f"{split}_patients"] = [str(k) for k in pat[split]]
    res.update(record or {})
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float))
    os.replace(tmp, out_path)
    return res


def run_name(flagfile: str, seed: int, fold: int | None) -> str:
    return f"{Path(flagfile).stem}-seed{seed}" + ("" if fold is None else f"-fold{fold}") \
        + ".json"


def ensemble_run(parts: list[dict]) -> dict:
    """One seed's K fold runs as one run of the table: val = the out-of-fold predictions of
    every training patient, each held-out split = the mean of the folds' probabilities
    (``members``: each fold model's own figures on it); the chosen epoch and the last-5
    stability are the folds' means."""
    from covid_keras.evaluation import metrics

    def scored(probs, labels, patients):
        m = metrics.classification_metrics(np.asarray(probs), np.asarray(labels), patients,
                                           parts[0]["classes"])
        return {k: m[k] for k in ("patient_auc", "slice_auc")}

    out = {"seed": parts[0]["seed"], "folds": len(parts),
           "best_epoch": float(np.mean([p["best_epoch"] for p in parts])),
           "val": scored([r for p in parts for r in p["val_probs"]],
                         [r for p in parts for r in p["val_labels"]],
                         [r for p in parts for r in p["val_patients"]]),
           "stability": {"max_dev": float(np.mean([p["stability"]["max_dev"]
                                                   for p in parts]))},
           "fold_val_patient_auc": mean_sd([p["val"]["patient_auc"] for p in parts])}
    for split in [k[:-len("_probs")] for k in parts[0] if k.endswith("_probs")]:
        if split == "val":
            continue
        mean = np.mean([np.asarray(p[f"{split}_probs"]) for p in parts], axis=0)
        out[split] = scored(mean, parts[0][f"{split}_labels"], parts[0][f"{split}_patients"])
        # each fold model alone on the split (as bench/accuracy.py's members)
        alone = [scored(p[f"{split}_probs"], p[f"{split}_labels"], p[f"{split}_patients"])
                 for p in parts]
        out.setdefault("members", {})[split] = {
            k: [a[k] for a in alone] for k in ("patient_auc", "slice_auc")}
    return out


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help=".npz from bench/export_npz.py")
    p.add_argument("--flagfiles", required=True, help="Comma-separated training flagfiles.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--input_size", type=int, default=None,
                   help="Model input side (default: the flagfile's).")
    p.add_argument("--jobs", type=int, default=1, help="Runs at once (processes).")
    p.add_argument("--work_dir", default="runs/accuracy_jax")
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--track_held_out", action="store_true",
                   help="Also record the held-out AUC of every epoch in the history "
                        "(diagnostics; the checkpoint is still chosen on val alone), and "
                        "write each run's history as it goes (<run>.partial.json)")
    p.add_argument("--bn_stats", choices=("moving", "population", "both"), default="moving",
                   help="Batch-norm statistics for validation and the kept checkpoint: "
                        "moving (the trainer's moving averages), population (recomputed "
                        "before each validation over the training images, unaugmented, "
                        "in training-size batches in a fixed shuffled order, as the "
                        "trainer's --bn_stats=population: covid_keras.training.bn_stats), or both "
                        "(choose on moving; also record each epoch's figures with "
                        "population statistics, *_pop in the history: a paired diagnostic)")
    p.add_argument("--folds", type=int, default=0, help="Each run a K-fold ensemble, as "
                   "train --folds=K: K fold runs (jobs of their own), val = out of fold, the "
                   "held-out split scored by the mean of the folds' probabilities.")
    p.add_argument("--output_json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: flagfile:seed[:k]
    p.add_argument("extra", nargs="*", help="Flag overrides after --, e.g. -- --epochs=2")
    args = p.parse_args(argv)
    from covid_keras.core.cli import expand_flagfiles

    overrides = {}
    for e in expand_flagfiles(["accuracy_jax", *args.extra])[1:]:  # -- --flagfile=F too
        name, _, value = e.lstrip("-").partition("=")
        overrides[name] = value
    work = Path(args.work_dir)
    if args.folds == 1 or args.folds < 0:
        p.error(f"--folds must be 0 or at least 2. Received: {args.folds}")
    if args.one:
        flagfile, seed, *k = args.one.split(":")
        fold = (int(k[0]), args.folds) if k else None
        run_one(args.data, flagfile, int(seed), args.input_size, overrides,
                work / run_name(flagfile, int(seed), fold and fold[0]),
                args.track_held_out, args.bn_stats, fold)
        return 0
    if not os.path.isfile(args.data):
        p.error(f"--data={args.data}: no such file")
    flagfiles = [f for f in args.flagfiles.split(",") if f]
    for f in flagfiles:
        if not os.path.isfile(f):
            p.error(f"no such flagfile: {f}")
        if read_flagfile(f).get("navigator_anchors", "all") != "all":
            # the .npz (bench/export_npz.py) carries no lung masks: it would train the
            # unrestricted model under the lung flagfile's name
            p.error(f"{f}: --navigator_anchors=lung needs the records' lung masks, which "
                    "the .npz has not: measure it with bench/accuracy.py")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work.mkdir(parents=True, exist_ok=True)
    parts = range(args.folds) if args.folds else [None]
    todo = [(f, s, k) for f in flagfiles for s in seeds for k in parts
            if args.rerun or not (work / run_name(f, s, k)).exists()]
    if args.rerun:  # their classifier stages too
        for f, s, k in todo:
            for path in stage_paths(work / run_name(f, s, k)):
                path.unlink(missing_ok=True)
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            f, s, k = todo.pop(0)
            one = f"{f}:{s}" if k is None else f"{f}:{s}:{k}"
            cmd = [sys.executable, __file__, f"--data={args.data}", f"--flagfiles={f}",
                   f"--work_dir={work}", f"--one={one}", f"--folds={args.folds}"]
            if args.input_size:
                cmd.append(f"--input_size={args.input_size}")
            if args.track_held_out:
                cmd.append("--track_held_out")
            cmd.append(f"--bn_stats={args.bn_stats}")
            cmd += ["--", *args.extra] if args.extra else []
            with open(work / run_name(f, s, k).replace(".json", ".log"), "w") as log:
                # the child writes to its own copy of the file descriptor
                running.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT), one))
            print(f"[{time.strftime('%H:%M:%S')}] started {f} seed {s}"
                  + ("" if k is None else f" fold {k}"), flush=True)
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"[{time.strftime('%H:%M:%S')}] {name} exit {proc.returncode}",
                      flush=True)
                if proc.returncode:
                    failed.append(name)
    res = {"data_dir": args.data, "seeds": seeds, "models": {}, "extra_flags": args.extra,
           "input_size": args.input_size, "failed": failed, "folds": args.folds}
    held = set()
    for f in flagfiles:
        runs = []
        for s in seeds:
            if args.folds:
                paths = [work / run_name(f, s, k) for k in range(args.folds)]
                if all(p.exists() for p in paths):
                    runs.append(ensemble_run([json.loads(p.read_text()) for p in paths]))
                continue
            path = work / run_name(f, s, None)
            if path.exists():
                runs.append(json.loads(path.read_text()))
        if not runs:
            continue
        splits = [k for k in ("test",) if k in runs[0]]
        held.update(splits)
        res["models"][Path(f).stem] = {"flagfile": f, "runs": runs,
                                       "summary": summarise(runs, splits)}
    res["held_out"] = sorted(held)
    if res["models"]:
        emit_result(res, print_table, args.output_json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
