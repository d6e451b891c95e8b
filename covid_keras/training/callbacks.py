"""Training callbacks: patient-level validation, TensorBoard extras, best checkpoint.

``PatientValidation`` predicts the whole validation split once per epoch (every record
once), computes slice- and patient-level AUC / sensitivity / specificity
(:mod:`covid_keras.evaluation.metrics`), the validation losses (``val_loss``, the training loss's
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
import time

import keras
import numpy as np
import tensorflow as tf

from covid_keras.core import files
from covid_keras.evaluation import metrics
from covid_keras.evaluation.evaluation import SplitPredictor
from covid_keras.io import data
from covid_keras.model import keras_private, losses, saving
from covid_keras.model.keras_private import AtomicBackupAndRestore  # noqa: F401 (re-exported)
from covid_keras.training import bn_stats

LOGIT_OUTPUTS = ("logits", "raw_logits", "region_logits")
BEST_METRICS = ("patient_auc", "slice_auc", "patient_accuracy", "slice_accuracy",
                "prediction_loss")


class Evaluator(SplitPredictor):
    """A split's evaluation data for the training callbacks:
    :class:`covid_keras.evaluation.evaluation.SplitPredictor` (every record once, in order)
    whose ``predict`` adds the head's input (:func:`_probe`), with TensorBoard's display
    slices taken from different patients of each class (:func:`display_indices`)."""

    def __init__(self, data_dir: str, split: str, batch_size: int, cfg: data.PipelineConfig,
                 num_display: int = 4):
        super().__init__(data_dir, split, batch_size, cfg, num_display=0)
        self.display_index = display_indices(self.labels, self.patient_keys, num_display)
        shown = self.images_u8(self.display_index)
        self.display_u8 = (np.stack([shown[int(i)] for i in self.display_index])
                           if len(self.display_index) else None)

    def predict(self, model: keras.Model) -> dict:
        return super().predict(_probe(model))


def display_indices(labels: np.ndarray, patient_keys: list, count: int) -> np.ndarray:
    """Up to ``count`` slice indices for TensorBoard's box images: the classes in turn, each
    time a slice of a patient not shown yet (the middle slice of that patient's run)."""
    if count <= 0 or len(labels) == 0:
        return np.zeros((0,), np.int64)
    by_class: dict[int, list[list[int]]] = {}
    seen: dict = {}
    for i, (label, key) in enumerate(zip(labels, patient_keys)):
        if key not in seen:
            seen[key] = []
            by_class.setdefault(int(label), []).append(seen[key])
        seen[key].append(i)
    queues = {c: list(p) for c, p in sorted(by_class.items())}
    out: list[int] = []
    while len(out) < count and any(queues.values()):
        for c in sorted(queues):
            if queues[c] and len(out) < count:
                slices = queues[c].pop(0)
                out.append(slices[len(slices) // 2])
    return np.asarray(out, np.int64)


def caption(images: np.ndarray, texts: list[str]) -> np.ndarray:
    """float (N, S, S, 3) in [0, 1] with a caption (label, probability) drawn at the top."""
    import cv2

    out = np.ascontiguousarray(np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    size = out.shape[1]
    scale = max(0.3, size / 400.0)
    for img, text in zip(out, texts):
        cv2.rectangle(img, (0, 0), (size - 1, int(22 * scale)), (0, 0, 0), -1)
        cv2.putText(img, text, (2, int(16 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                    (255, 255, 80), 1, cv2.LINE_AA)
    return out.astype(np.float32) / 255.0


_WRITERS: dict = {}


def close_writers() -> None:
    """Closes this process's cached writers (a run folder started again)."""
    for w in _WRITERS.values():
        w.close()
    _WRITERS.clear()


def summary_writer(log_dir: str):
    """One tf.summary writer per folder in this process (several callbacks share it)."""
    if log_dir not in _WRITERS:
        _WRITERS[log_dir] = tf.summary.create_file_writer(log_dir)
    return _WRITERS[log_dir]


def _probe(model: keras.Model) -> keras.Model:
    """``model`` with the MLP head's input as an extra output (``head_input``), when it has
    a hidden layer (DRENet paper); else ``model`` itself. Cached on the model when it is
    another model: Keras's weight loading walks a model's attributes and recurses without
    end into one that holds the model itself."""
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
    if probe is not model:
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


def tb_step(epoch: int) -> int:
    """TensorBoard's step for Keras's 0-based ``epoch``: the epoch as the console,
    best.keras.json and metrics.json number it (1 = the first), so the chart's step 18 is
    the console's "epoch 18"."""
    return int(epoch) + 1


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
        self.writer = (summary_writer(os.path.join(log_dir, "validation"))
                       if self.write else None)
        self.last: dict = {}
        self._hparams_written = False

    def on_train_begin(self, logs=None):
        if self.writer is not None and self.hparams and not self._hparams_written:
            from tensorboard.plugins.hparams import api as hp

            values = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                      for k, v in self.hparams.items()}
            values = {k: v for k, v in values.items()
                      if isinstance(v, (bool, int, float, str))}
            with self.writer.as_default():
                hp.hparams_config(
                    hparams=[hp.HParam(k) for k in sorted(values)],
                    metrics=[hp.Metric(f"best/{k}", group="validation",
                                       display_name=f"best epoch {k}")
                             for k in BEST_METRICS])
                hp.hparams(values)
            self._hparams_written = True

    def write_best(self, best: dict | None, epoch: int | None) -> None:
        """The chosen checkpoint's validation metrics as ``best/<metric>`` scalars (the
        HParams dashboard's metrics), at its epoch (1-based, as best.keras.json's and
        the console's, the step of every per-epoch scalar: :func:`tb_step`)."""
        if self.writer is None or not best or epoch is None:
            return
        with self.writer.as_default():
            for k in BEST_METRICS:
                value = best.get(k)
                if value is not None and value == value:
                    tf.summary.scalar(f"best/{k}", float(value), step=int(epoch))
        self.writer.flush()

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
            _pr_curve_summary("val/slice_pr_curve", self.evaluator.labels == pos,
                              out["probs"][:, pos], tb_step(epoch))
            p_probs, p_labels, _ = metrics.aggregate_by_patient(
                out["probs"], self.evaluator.labels, self.evaluator.patient_keys)
            _pr_curve_summary("val/patient_pr_curve", p_labels == pos, p_probs[:, pos],
                              tb_step(epoch))
            shown = self.evaluator.display_u8
            if shown is not None and len(shown):
                idx = self.evaluator.display_index
                boxes = out.get("boxes")
                if boxes is not None:
                    drawn = draw_boxes(shown, np.asarray(boxes)[idx])
                else:
                    drawn = shown.astype(np.float32) / 255.0
                texts = []
                for i in idx:
                    label = self.classes[int(self.evaluator.labels[i])]
                    texts.append(f"{label}: p({label}) "
                                 f"{out['probs'][i, int(self.evaluator.labels[i])]:.2f}")
                tf.summary.image("val/slices_with_top_k_boxes", caption(drawn, texts),
                                 step=tb_step(epoch), max_outputs=len(shown))
        self.writer.flush()


CHECKPOINT_MONITORS = {
    # name: (log key, mode, tie-break log key, tie-break mode)
    "smoothed_patient_auc": ("val_patient_auc_smoothed", "max", "val_prediction_loss", "min"),
    "prediction_loss": ("val_prediction_loss", "min", "val_patient_auc", "max"),
    "patient_auc": ("val_patient_auc", "max", "val_prediction_loss", "min"),
}
SMOOTHING_EPOCHS = 3


class SwapEMA(keras.callbacks.Callback):
    """At each epoch's end, exchanges the model's weights with the moving average its
    optimiser keeps (``--ema_momentum``). Used in pairs around the callbacks that should
    see the average: ``[SwapEMA(), validation, best checkpoint, SwapEMA(), backup, ...]``.
    The first swaps the average in, the second swaps the raw weights back, so the backup
    holds the training state as it was and training goes on from the raw weights. After
    the last epoch ``fit`` itself leaves the average in the model (Keras's
    ``finalize_variable_values``): ``final.keras`` is the average too."""

    def on_epoch_end(self, epoch, logs=None):
        keras_private.swap_ema_weights(self.model)


class PopulationBatchNorm(keras.callbacks.Callback):
    """``--bn_stats=population``: at each epoch's end, before validation and the checkpoint
    (it comes before them in the callback list, after the first :class:`SwapEMA`), every
    batch norm's moving statistics become the population statistics of the current weights
    over ``dataset`` ((inputs, ...) batches: the training split, unaugmented, in a fixed
    order; :mod:`covid_keras.training.bn_stats`). Training is unchanged (it normalises with each
    batch's own statistics); what is validated, kept as best, saved as final and exported
    is normalised with them."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset
        self._forward = None

    def on_epoch_end(self, epoch, logs=None):
        if self._forward is None:  # compiled (DRENet, 128 px, 2 CPU cores: 12 batches in
            # 17 s against 45 s eager); traced inside the first pass, where every batch
            # norm's momentum is 0, and reused after
            model = self.model
            self._forward = tf.function(lambda x: model(x, training=True),
                                        reduce_retracing=True)
        bn_stats.set_population_statistics(self.model, (x for x, *_ in self.dataset),
                                           forward=self._forward)


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

    def __init__(self, path: str, monitor: str = "smoothed_patient_auc", write: bool = True,
                 class_names: list[str] | None = None):
        super().__init__()
        self.class_names = class_names
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
        if files.exists(self.state_path):
            state = json.loads(files.read_text(self.state_path))
            if state.get("monitor") == self.monitor:
                self.best = state.get("best")
                self.best_tie = state.get("tie_break")
                self.best_epoch = state.get("epoch")
                self.recent = [float("nan") if v is None else v
                               for v in state.get("recent_patient_auc", [])]

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
            saving.save_model(self.model, self.path, self.class_names)
        files.write_json(self.state_path, {  # every epoch: the smoothing window
            "best": self.best, "tie_break": self.best_tie, "tie_break_monitor": self.tie_key,
            "epoch": self.best_epoch, "monitor": self.monitor,
            "recent_patient_auc": self.recent})


def tensorboard_tag(key: str) -> tuple[str, str]:
    """A log key -> (run, tag): ``loss/...`` for every loss (training and validation under
    the same tag, so they are drawn in one chart), ``head/...`` for the head's health,
    ``val/...`` and ``train/...`` for the rest."""
    run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
    if name == "loss":
        return run, "loss/total"
    if name.endswith("_loss"):
        return run, "loss/" + name[: -len("_loss")]
    if name.startswith("head_") or name.endswith("_spread"):
        return run, "head/" + name.removeprefix("head_")
    return run, ("val/" if run == "validation" else "train/") + name


class GroupedTensorBoard(keras.callbacks.Callback):
    """Per-epoch scalars in grouped tags (:func:`tensorboard_tag`) and the learning rate
    (``optimizer/learning_rate``): ``tensorboard/train`` and ``tensorboard/validation``,
    at the console's 1-based epoch (:func:`tb_step`).
    Put it after :class:`BestCheckpoint`, which adds the smoothed AUC to the logs."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            run, tag = tensorboard_tag(key)
            with summary_writer(os.path.join(self.log_dir, run)).as_default():
                tf.summary.scalar(tag, value, step=tb_step(epoch))
        opt = getattr(self.model, "optimizer", None)
        if opt is not None:
            lr = float(keras.ops.convert_to_numpy(opt.learning_rate))
            with summary_writer(os.path.join(self.log_dir, "train")).as_default():
                tf.summary.scalar("optimizer/learning_rate", lr, step=tb_step(epoch))
        for run in ("train", "validation"):
            summary_writer(os.path.join(self.log_dir, run)).flush()


class EpochLine(keras.callbacks.Callback):
    """The console: one short line per epoch (loss, val loss, val patient AUC and its
    smoothed value, seconds, a mark when the checkpoint improved); with ``verbose=1`` a
    step bar showing the loss during the epoch. Everything else goes to TensorBoard and
    log.csv."""

    def __init__(self, epochs: int, steps: int, verbose: int = 2,
                 best: "BestCheckpoint | None" = None):
        super().__init__()
        self.epochs, self.steps, self.verbose, self.best = epochs, steps, verbose, best
        self.bar = None
        self.t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()
        if self.verbose == 1:
            self.bar = keras.utils.Progbar(self.steps, stateful_metrics=["loss"])

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.update(batch + 1, [("loss", float(logs["loss"]))])

    def on_epoch_end(self, epoch, logs=None):
        if self.verbose == 0:
            return
        logs = logs or {}

        def f(key, fmt=".4f"):
            v = logs.get(key)
            return "-" if v is None or v != v else format(float(v), fmt)

        line = (f"epoch {epoch + 1}/{self.epochs}: loss {f('loss')}, val loss "
                f"{f('val_loss')}, val patient AUC {f('val_patient_auc', '.3f')}")
        if "val_patient_auc_smoothed" in logs:
            line += f" (smoothed {f('val_patient_auc_smoothed', '.3f')})"
        line += f", {time.time() - self.t0:.0f} s"
        if self.best is not None and self.best.best_epoch == epoch + 1:
            line += "  * best.keras"
        print(line, flush=True)


class CSVLogger(keras.callbacks.CSVLogger):
    """Keras's CSVLogger, which also closes a ``tf.io.gfile`` file (gs://, ram://...):
    Keras's reads ``file.closed``, which GFile does not have."""

    def on_train_end(self, logs=None):
        if self.csv_file is not None and not getattr(self.csv_file, "closed", False):
            self.csv_file.close()
        self.csv_file = None
        self.writer = None
