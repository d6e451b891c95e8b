"""``covid_keras.train --distill_from=DIR``: one student model trained on a finished run's
class probabilities (typically a ``--folds`` ensemble: one model's inference cost instead
of K members').

    python -m covid_keras.train --flagfile=configs/covid_ct_resnet50.cfg \\
        --distill_from=runs/resnet50_cv --data_dir=tfrecords/covid_ct_holdout \\
        --run_dir=runs/resnet50_distilled

The teacher is the model the teacher's run folder resolves (its best.keras, else
final.keras). Before training it predicts every slice of the train split once, through
the evaluation pipeline of its own spec (no augmentation), and those probabilities are
cached in the student's run folder (``distill_targets.npz``, :class:`RunDir`'s name) with
the teacher file's and the data manifest's SHA-256: a resumed or repeated run reuses the
cache only while both match, else predicts again. The val and held-out splits get no
targets. The input pipeline joins each training record to its row by its study and sop
keys (:func:`covid_keras.io.data.target_key`), and the loss mixes the labels and the
targets (:mod:`covid_keras.model.losses`: ``(1 - w) CE + w T^2 soft CE``).

Refused, in one line: with --folds; a teacher run that is not finished, has other classes
than the data, or was trained on another data folder (its recorded manifest SHA-256 -- a
folds run's in folds.json -- against --data_dir's; unverifiable is refused too) or on a
split this run holds out (its folds' splits, else train and its --val_split, beyond train
and this run's --val_split); the student's own run folder as the teacher; w outside
[0, 1]; T <= 0.
"""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np

from covid_keras.core import files
from covid_keras.io.run_dir import DISTILL_INFO, DISTILL_TARGETS, RunDir

log = logging.getLogger("covid_keras.train")

DEFAULT_WEIGHT = 0.5
DEFAULT_TEMPERATURE = 1.0


def enabled(cfg) -> bool:
    return bool(cfg.distill_from)


def check_flags(cfg) -> None:
    """The flags alone (no file read): one-line errors."""
    w, t = cfg.distill_weight, cfg.distill_temperature
    if not cfg.distill_from:
        if w != DEFAULT_WEIGHT or t != DEFAULT_TEMPERATURE:
            raise ValueError("--distill_weight and --distill_temperature need --distill_from")
        return
    if not (isinstance(w, (int, float)) and 0.0 <= w <= 1.0):
        raise ValueError(f"--distill_weight must be in [0, 1]. Received: {w}")
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0.0):
        raise ValueError(f"--distill_temperature must be > 0. Received: {t}")
    if cfg.folds or cfg.fold >= 0 or cfg.ensemble_only:
        raise ValueError("--distill_from trains one student model: it takes no --folds, "
                         "--fold or --ensemble_only (distil from the finished --folds run "
                         "instead)")
    if cfg.strategy == "multi_worker":
        raise ValueError("--distill_from is not supported with --strategy=multi_worker "
                         "(use --strategy=mirrored)")
    if cfg.run_dir and os.path.realpath(cfg.distill_from) == os.path.realpath(cfg.run_dir):
        raise ValueError(f"--distill_from={cfg.distill_from} is --run_dir itself: the "
                         "teacher must be another, finished run")


def teacher(cfg, manifest: dict, data_sha: str) -> dict:
    """The teacher of ``--distill_from``, checked: ``{"run", "model", "sha256",
    "classes"}`` (absolute paths). ``data_sha``: the SHA-256 of --data_dir's manifest."""
    from covid_keras.model import saving

    check_flags(cfg)
    where = f"--distill_from={cfg.distill_from}"
    run = RunDir(cfg.distill_from)
    if not files.isdir(run.path):
        raise ValueError(f"{where}: no such run folder")
    if not run.is_finished():
        raise ValueError(f"{where} is not a finished run (no final.keras, or a backup/ of a "
                         "run still training; a --folds run: no ensemble yet): finish it "
                         "first")
    model = run.checkpoint()
    classes = (saving.read_info(model) or {}).get("class_names") or (
        run.run_info() or {}).get("classes")
    if not classes:
        raise ValueError(f"{where}: the teacher's classes cannot be verified ({model} "
                         "names none, nor does its run_info.json): refused")
    if list(classes) != list(manifest["classes"]):
        raise ValueError(f"{where}: the teacher's classes {list(classes)} differ from the "
                         f"data's {list(manifest['classes'])} (--data_dir={cfg.data_dir})")
    cross_validated = run.is_cross_validation()  # its data and splits: folds.json
    source = run.folds() if cross_validated else run.run_info()
    trained_on = (source or {}).get("dataset_manifest_sha256")
    if not trained_on:
        recorded = "folds.json" if cross_validated else "run_info.json"
        raise ValueError(f"{where}: the teacher's data cannot be verified (its {recorded} "
                         "records no dataset_manifest_sha256): refused")
    if trained_on != data_sha:
        raise ValueError(f"{where} was trained on another data folder than "
                         f"--data_dir={cfg.data_dir} (their manifests' SHA-256 differ): "
                         "distil on the teacher's own data folder")
    # the same records, but the teacher may have trained (or chosen its checkpoint) on a
    # split this run holds out: its folds' splits, else train and its --val_split
    seen = (source or {}).get("splits") if cross_validated else [
        "train", run.flags().get("val_split") or "val"]
    held = sorted(set(seen or ()) - {"train", cfg.val_split})
    if held:
        raise ValueError(f"{where} trained on the split {held[0]!r} of {cfg.data_dir} ("
                         f"{'its folds' if cross_validated else 'its --val_split'}"
                         f"), which this run holds out (--val_split={cfg.val_split}): the "
                         "teacher's knowledge of those patients would leak into the student; "
                         f"distil from a teacher of train and {cfg.val_split} only")
    return {"run": files.absolute(run.path), "model": files.absolute(model),
            "sha256": files.sha256(model), "classes": list(classes)}


def run_info_entry(cfg, found: dict) -> dict:
    """What run_info.json records of the distillation (``DISTILL_INFO``)."""
    return {"teacher_run": found["run"], "teacher": found["model"],
            "teacher_sha256": found["sha256"], "weight": float(cfg.distill_weight),
            "temperature": float(cfg.distill_temperature),
            "targets": DISTILL_TARGETS}


def changed_teacher(info: dict | None, found: dict | None) -> list[str]:
    """``--distill_from: ...`` when the run in ``info`` (its run_info.json) distilled from
    another teacher file than ``found`` (the flags themselves: the ordinary flag check)."""
    stored = ((info or {}).get(DISTILL_INFO) or {}).get("teacher_sha256")
    if found is None or stored is None or stored == found["sha256"]:
        return []
    return [f"--distill_from: the teacher file changed ({found['model']}: sha256 "
            f"{stored[:12]}... -> {found['sha256'][:12]}...)"]


def _read_cache(path: str) -> dict | None:
    if not files.exists(path):
        return None
    try:
        with np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): the teacher predicts again", path, exc)
        return None


def targets(cfg, run: RunDir, found: dict, data_sha: str, batch_size: int):
    """The teacher's probabilities of every train-split slice
    (:class:`covid_keras.io.data.TeacherTargets`): the cache in ``run`` when it was made by
    the same teacher file on the same data, else predicted now and cached (atomically).
    A train slice without a target is an error."""
    from covid_keras.io import data

    path = run.distill_targets_path
    cached = _read_cache(path)
    if cached is not None and str(cached.get("teacher_sha256")) == found["sha256"] and \
            str(cached.get("dataset_manifest_sha256")) == data_sha and \
            [str(c) for c in cached.get("classes", [])] == found["classes"]:
        log.info("--distill_from: the teacher's targets of %d train slices reused (%s)",
                 len(cached["keys"]), path)
        keys, probs = [str(k) for k in cached["keys"]], cached["probs"]
        # a fresh prediction covers the split by construction; a file read back is checked
        missing = len(set(data.split_target_keys(cfg.data_dir, "train")) - set(keys))
        if missing:
            raise ValueError(f"{missing} train slices of {cfg.data_dir} have no teacher "
                             f"target in {path}: remove it to predict them again")
    else:
        if cached is not None:
            log.info("--distill_from: %s holds another teacher's or data's targets: the "
                     "teacher predicts again", path)
        keys, probs = predict_train_split(cfg.data_dir, found, batch_size)
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys, dtype=str), probs=probs.astype(np.float32),
                 classes=np.asarray(found["classes"], dtype=str),
                 teacher_sha256=np.asarray(found["sha256"]),
                 dataset_manifest_sha256=np.asarray(data_sha))
        files.atomic_write_bytes(path, buf.getvalue())
        log.info("--distill_from: the teacher predicted %d train slices: %s", len(keys),
                 path)
    return data.TeacherTargets(tuple(keys), np.asarray(probs, np.float32))


def predict_train_split(data_dir: str, found: dict, batch_size: int):
    """(keys, probabilities float32 (N, C)) of the teacher on every train slice, through
    the evaluation pipeline of its own spec."""
    from covid_keras.evaluation.evaluation import SplitPredictor
    from covid_keras.io import data
    from covid_keras.model import saving

    model = saving.load_model(found["model"], compile=False)
    pipeline = data.PipelineConfig.for_model(saving.model_spec(model))
    split = SplitPredictor(data_dir, "train", batch_size, pipeline)
    probs = split.predictions(model, found["classes"]).probs.astype(np.float32)
    keys = [data.target_key(s, k) for s, k in zip(split.study_keys, split.sop_keys)]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{len(keys) - len(set(keys))} train slices of {data_dir} share a "
                         "study and sop key with another: the teacher's targets cannot be "
                         "joined to them")
    return keys, probs


def with_class_weights(ds, class_weight: dict):
    """--class_weights in a distilled run: (x, y) -> (x, y, weight of y's label) (Keras's
    own class_weight would read y (B, 1 + C) as one-hot)."""
    import tensorflow as tf

    from covid_keras.io import data

    table = tf.constant([float(class_weight[i]) for i in range(len(class_weight))],
                        tf.float32)
    return ds.map(data.graph_fn(lambda x, y: (x, y, tf.gather(
        table, tf.cast(tf.round(y[:, 0]), tf.int32)))))
