"""Training callbacks: patient-level validation, TensorBoard extras, best checkpoint.

``PatientValidation`` predicts the whole validation split once per epoch (every record
once), computes slice- and patient-level AUC / sensitivity / specificity
(:mod:`covid_keras.metrics`) and puts them in the epoch logs as ``val_slice_auc``,
``val_patient_auc``... so that TensorBoard, CSVLogger, EarlyStopping and
:class:`BestCheckpoint` see them (it must come first in the callback list). It also writes
PR curves and the first validation slices with their top-K boxes to TensorBoard.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from covid_keras import data, metrics


class Evaluator:
    """One split's evaluation data: images batched in order, labels and keys in memory."""

    def __init__(self, data_dir: str, split: str, batch_size: int, cfg: data.PipelineConfig,
                 num_display: int = 4):
        self.split = split
        ds = data.make_dataset(data_dir, split, batch_size, training=False, cfg=cfg,
                               with_meta=True)
        labels, patients, studies, slices = [], [], [], []
        for _, meta in ds:
            labels.append(meta["label"].numpy())
            patients.extend(k.decode() for k in meta["patient_key"].numpy())
            studies.extend(k.decode() for k in meta["study_key"].numpy())
            slices.append(meta["slice_index"].numpy())
        self.labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
        self.patient_keys = patients
        self.study_keys = studies
        self.slice_index = np.concatenate(slices) if slices else np.zeros((0,), np.int32)
        # Padded with blank images to whole batches, so that every replica of a
        # distribution strategy gets a full share (an empty per-replica batch fails in
        # TensorFlow); the padding's predictions are dropped. Known cardinality: Keras
        # predicts exactly these batches.
        n = len(self.labels)
        pad = (-n) % batch_size
        blank = tf.data.Dataset.from_tensors(
            tf.zeros([cfg.input_size, cfg.input_size, 3], tf.float32)).repeat(pad)
        self.images = (ds.map(lambda x, meta: x).unbatch().concatenate(blank)
                       .batch(batch_size).apply(
                           tf.data.experimental.assert_cardinality((n + pad) // batch_size)))
        raw_cfg = cfg
        raw = tf.data.TFRecordDataset(data.shard_files(data_dir, split), "GZIP").take(
            num_display).map(data._parse).map(
            lambda r: data.decode_image(r[data.schema.IMAGE], raw_cfg.input_size))
        self.display_u8 = np.stack([x.numpy() for x in raw]) if num_display else None

    def __len__(self) -> int:
        return int(len(self.labels))

    def predict(self, model: keras.Model) -> dict:
        out = model.predict(self.images, verbose=0)
        if not isinstance(out, dict):
            out = {"logits": out}
        n = len(self)
        out = {k: np.asarray(v)[:n] for k, v in out.items()}
        if out["logits"].shape[0] != n:
            raise RuntimeError(f"Predicted {out['logits'].shape[0]} slices for {n} records")
        return out


def _pr_curve_summary(name: str, labels: np.ndarray, scores: np.ndarray, step: int) -> None:
    from tensorboard.plugins.pr_curve import summary as pr_summary

    pb = pr_summary.pb(name, labels=labels.astype(bool), predictions=scores.astype(np.float32),
                       num_thresholds=101)
    tf.summary.experimental.write_raw_pb(pb.SerializeToString(), step=step)


def draw_boxes(images_u8: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) + (N, K, 4) pixel boxes -> float (N, S, S, 3) with boxes drawn."""
    size = images_u8.shape[1]
    norm = np.clip(boxes / float(size), 0.0, 1.0).astype(np.float32)
    colours = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.4, 1.0], [1.0, 1.0, 0.2],
                        [1.0, 0.2, 1.0], [0.2, 1.0, 1.0]], np.float32)
    img = tf.image.convert_image_dtype(images_u8, tf.float32)
    return tf.image.draw_bounding_boxes(img, norm, colours[: max(1, boxes.shape[1])]).numpy()


class PatientValidation(keras.callbacks.Callback):
    """Per-epoch validation at slice and patient level (see the module docstring)."""

    def __init__(self, evaluator: Evaluator, classes: list[str], log_dir: str | None,
                 prefix: str = "val_", hparams: dict | None = None, write: bool = True):
        super().__init__()
        self.evaluator = evaluator
        self.classes = list(classes)
        self.prefix = prefix
        self.hparams = hparams
        self.write = write and log_dir is not None
        self.writer = (tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
                       if self.write else None)
        self.last: dict = {}

    def on_train_begin(self, logs=None):
        if self.writer is not None and self.hparams:
            from tensorboard.plugins.hparams import api as hp

            with self.writer.as_default():
                hp.hparams({k: v for k, v in self.hparams.items()
                            if isinstance(v, (bool, int, float, str))})

    def evaluate(self, model: keras.Model | None = None) -> tuple[dict, dict]:
        """Metrics and outputs of ``model`` (default: the model being trained)."""
        out = self.evaluator.predict(model if model is not None else self.model)
        probs = metrics.softmax(np.asarray(out["logits"], np.float64))
        result = metrics.classification_metrics(probs, self.evaluator.labels,
                                                self.evaluator.patient_keys, self.classes)
        return result, {"probs": probs, **out}

    def on_epoch_end(self, epoch, logs=None):
        result, out = self.evaluate()
        self.last = result
        if logs is not None:
            for k, v in result.items():
                if k not in ("slices", "patients"):
                    logs[self.prefix + k] = float(v)
        if self.writer is None:
            return
        pos = metrics.positive_index(self.classes)
        with self.writer.as_default():
            _pr_curve_summary("slice_pr_curve", self.evaluator.labels == pos,
                              out["probs"][:, pos], epoch)
            p_probs, p_labels, _ = metrics.aggregate_by_patient(
                out["probs"], self.evaluator.labels, self.evaluator.patient_keys)
            _pr_curve_summary("patient_pr_curve", p_labels == pos, p_probs[:, pos], epoch)
            shown = self.evaluator.display_u8
            if shown is not None and len(shown):
                boxes = out.get("boxes")
                if boxes is not None:
                    drawn = draw_boxes(shown, np.asarray(boxes[: len(shown)]))
                else:
                    drawn = shown.astype(np.float32) / 255.0
                tf.summary.image("slices_with_top_k_boxes", drawn, step=epoch,
                                 max_outputs=len(shown))
        self.writer.flush()


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model (``.keras``, atomically) when ``monitor`` improves. The best value
    is kept beside it (``<path>.json``), so a resumed run does not forget it."""

    def __init__(self, path: str, monitor: str = "val_patient_auc", mode: str = "max",
                 write: bool = True):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min'. Received: {mode!r}")
        self.path, self.monitor, self.mode, self.write = path, monitor, mode, write
        self.state_path = path + ".json"
        self.best = None
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.best = json.load(f).get("best")

    def _better(self, value: float) -> bool:
        if value != value:  # NaN never improves
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"BestCheckpoint monitors {self.monitor!r}, not in the logs "
                           f"{sorted(logs or {})}: put PatientValidation first")
        if not self._better(float(value)):
            return
        self.best = float(value)
        if not self.write:
            return
        tmp = self.path + ".tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, self.path)
        with open(self.state_path + ".tmp", "w") as f:
            json.dump({"best": self.best, "epoch": int(epoch), "monitor": self.monitor}, f)
        os.replace(self.state_path + ".tmp", self.state_path)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore with an atomic commit, so that a run killed at any moment
    resumes. Keras writes ``latest.weights.h5`` in place and then the epoch metadata: a kill
    mid-write leaves weights that cannot be read, and a kill between the two files pairs
    new weights with an old epoch. Here the weights alternate between two files and the
    metadata, which names the file, is renamed into place last: it is the commit."""

    _slot = 0

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        self._slot = 1 - self._slot
        name = f"slot{self._slot}.weights.h5"
        self.model.save_weights(os.path.join(self.backup_dir, name), overwrite=True)
        tmp = self._training_metadata_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                       "weights": name}, f)
        os.replace(tmp, self._training_metadata_path)

    def _load_model(self):
        if not os.path.exists(self._training_metadata_path):
            return
        with open(self._training_metadata_path) as f:
            meta = json.load(f)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, meta["weights"]))
        self._slot = int(meta["weights"][len("slot")])
        self.model._initial_epoch = meta["epoch"]
