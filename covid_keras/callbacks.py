"""Training callbacks: patient-level validation, TensorBoard extras, best checkpoint.

``PatientValidation`` predicts the whole validation split once per epoch (every record
once), computes slice- and patient-level AUC / sensitivity / specificity
(:mod:`covid_keras.metrics`), the validation losses (``val_loss``, the training loss's
definition, beside ``loss`` in TensorBoard; DRENet's terms as ``val_raw_loss``...;
``val_prediction_loss``: the cross-entropy of the prediction, ``logits``) and the head's
health (``val_head_active_units``: the share of the MLP head's hidden ReLU units active on
at least one slice; ``val_<output>_spread``: the spread of each branch's logits across
slices), and puts them in the epoch logs so that TensorBoard, CSVLogger, EarlyStopping
and :class:`BestCheckpoint` see them (it must come first in the callback list). It also
writes PR curves and the first validation slices with their top-K boxes to TensorBoard.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import tensorflow as tf

from covid_keras import data, losses, metrics

LOGIT_OUTPUTS = ("logits", "raw_logits", "region_logits")


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
        out = _probe(model).predict(self.images, verbose=0)
        if not isinstance(out, dict):
            out = {"logits": out}
        n = len(self)
        out = {k: np.asarray(v)[:n] for k, v in out.items()}
        if out["logits"].shape[0] != n:
            raise RuntimeError(f"Predicted {out['logits'].shape[0]} slices for {n} records")
        return out


def _probe(model: keras.Model) -> keras.Model:
    """``model`` with the MLP head's input as an extra output (``head_input``), when it has
    a hidden layer (DRENet paper); else ``model`` itself. Cached on the model."""
    cached = getattr(model, "_covid_keras_probe", None)
    if cached is not None:
        return cached
    probe = model
    try:
        head = model.get_layer("head")
    except ValueError:
        head = None
    if head is not None and getattr(head, "hidden", None) is not None and isinstance(
            model.output, dict):
        outputs = dict(model.output)
        outputs["head_input"] = model.get_layer("concat").output
        probe = keras.Model(model.input, outputs, name=f"{model.name}_probe")
    object.__setattr__(model, "_covid_keras_probe", probe)
    return probe


def validation_losses(model: keras.Model, out: dict, labels: np.ndarray) -> dict:
    """``loss`` (the training loss's definition, without regularisers), the prediction's
    cross-entropy ``prediction_loss``, and DRENet's terms ``<term>_loss``."""
    labels = np.asarray(labels, np.int32)
    result = {"prediction_loss": float(np.mean(np.asarray(losses.sparse_ce(
        labels, out["logits"]))))}
    if "region_logits" in out and hasattr(model, "loss_weights_by_term"):
        terms = losses.drenet_loss_terms(labels, out, model.rank_margin)
        total = 0.0
        for name, values in terms.items():
            value = float(np.mean(np.asarray(values)))
            result[f"{name}_loss"] = value
            total += model.loss_weights_by_term[name] * value
        result["loss"] = total
    else:
        result["loss"] = result["prediction_loss"]
    return result


def head_health(model: keras.Model, out: dict) -> dict:
    """``head_active_units`` (share of hidden units active on at least one slice, when the
    head has a hidden layer) and ``<output>_spread`` (mean over classes of each logit's
    standard deviation across slices; region logits over slices and regions)."""
    result = {}
    for key in LOGIT_OUTPUTS:
        if key in out:
            v = np.asarray(out[key], np.float64)
            v = v.reshape(-1, v.shape[-1])
            result[f"{key}_spread"] = float(v.std(axis=0).mean()) if len(v) else float("nan")
    if "head_input" in out:
        hidden = np.asarray(model.get_layer("head").hidden_activations(
            np.asarray(out["head_input"], np.float32), training=False))
        result["head_active_units"] = float((hidden > 0).any(axis=0).mean())
    return result


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
        model = model if model is not None else self.model
        out = self.evaluator.predict(model)
        probs = metrics.softmax(np.asarray(out["logits"], np.float64))
        result = metrics.classification_metrics(probs, self.evaluator.labels,
                                                self.evaluator.patient_keys, self.classes)
        if len(self.evaluator):
            result.update(validation_losses(model, out, self.evaluator.labels))
            result.update(head_health(model, out))
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


CHECKPOINT_MONITORS = {
    # name: (log key, mode, tie-break log key, tie-break mode)
    "smoothed_patient_auc": ("val_patient_auc_smoothed", "max", "val_prediction_loss", "min"),
    "prediction_loss": ("val_prediction_loss", "min", "val_patient_auc", "max"),
    "patient_auc": ("val_patient_auc", "max", "val_prediction_loss", "min"),
}
SMOOTHING_EPOCHS = 3


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model (``.keras``, atomically) when the monitored validation value
    improves. The state (best value, its tie-break, the epoch, the monitor) is kept beside
    it (``<path>.json``), so a resumed run does not forget it and the chosen epoch is on
    record.

    ``monitor``: a key of :data:`CHECKPOINT_MONITORS`.

    * ``smoothed_patient_auc`` (default): the mean val patient AUC of this epoch and the
      two before it (``val_patient_auc_smoothed`` in the logs), ties broken by the lower
      prediction loss: one lucky epoch of a noisy few-dozen-patient AUC (measured: 0.2 <->
      0.85 from one epoch to the next) no longer wins alone, and the first of equal values
      no longer wins by default;
    * ``prediction_loss``: the validation cross-entropy of the prediction over every slice
      (ties: higher patient AUC). Measured on COVID-CT it chose epoch 2 of 12, a model
      worse than chance on the held-out split: small data makes later epochs overconfident,
      so the loss favours under-trained models;
    * ``patient_auc``: this epoch's patient AUC alone (ties: lower prediction loss).
    """

    def __init__(self, path: str, monitor: str = "smoothed_patient_auc", write: bool = True):
        super().__init__()
        if monitor not in CHECKPOINT_MONITORS:
            raise ValueError(f"monitor must be one of {sorted(CHECKPOINT_MONITORS)}. "
                             f"Received: {monitor!r}")
        self.path, self.write = path, write
        self.monitor, self.mode, self.tie_key, self.tie_mode = CHECKPOINT_MONITORS[monitor]
        self.state_path = path + ".json"
        self.best = None
        self.best_tie = None
        self.best_epoch = None
        self.recent: list[float] = []  # val patient AUC of the last epochs (smoothing)
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                state = json.load(f)
            if state.get("monitor") == self.monitor:
                self.best = state.get("best")
                self.best_tie = state.get("tie_break")
                self.best_epoch = state.get("epoch")
                self.recent = list(state.get("recent_patient_auc", []))

    def _key(self, value: float, tie: float | None) -> tuple[float, float]:
        """Smaller is better: (primary, tie-break); NaN or a missing value is worst."""
        def order(v, mode):
            if v is None or v != v:
                return float("inf")
            return v if mode == "min" else -v

        return order(value, self.mode), order(tie, self.tie_mode)

    def _better(self, value: float, tie: float | None = None) -> bool:
        if value != value:  # NaN never improves
            return False
        if self.best is None:
            return True
        return self._key(value, tie) < self._key(self.best, self.best_tie)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if "val_patient_auc" in logs:
            auc = float(logs["val_patient_auc"])
            self.recent = (self.recent + [auc])[-SMOOTHING_EPOCHS:]
            finite = [v for v in self.recent if v == v]
            logs["val_patient_auc_smoothed"] = (sum(finite) / len(finite) if finite
                                                else float("nan"))
        value = logs.get(self.monitor)
        if value is None:
            raise KeyError(f"BestCheckpoint monitors {self.monitor!r}, not in the logs "
                           f"{sorted(logs)}: put PatientValidation first")
        tie = logs.get(self.tie_key)
        tie = None if tie is None else float(tie)
        improved = self._better(float(value), tie)
        if improved:
            self.best, self.best_tie, self.best_epoch = float(value), tie, int(epoch) + 1
        if not self.write:
            return
        if improved:
            tmp = self.path + ".tmp.keras"
            self.model.save(tmp)
            os.replace(tmp, self.path)
        with open(self.state_path + ".tmp", "w") as f:  # every epoch: the smoothing window
            json.dump({"best": self.best, "tie_break": self.best_tie,
                       "tie_break_monitor": self.tie_key, "epoch": self.best_epoch,
                       "monitor": self.monitor, "recent_patient_auc": self.recent}, f)
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
