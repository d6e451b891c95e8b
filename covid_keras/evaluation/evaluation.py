"""Evaluation: predicting a split and evaluating a training run (:func:`evaluate_run`).

    predictor = SplitPredictor(data_dir, "test", batch_size=8, cfg=cfg)
    preds = predictor.predictions(model, classes)          # slice probabilities + keys
    decision = read_decision(run_dir)                       # chosen on val at training
    result = evaluate_predictions(preds, decision)          # metrics.json's content

Used by the training callback (the split's prediction), the end of training
(:func:`write_decision`: the rule and threshold chosen on the validation split, written to
``<run_dir>/decision.json``) and ``python -m covid_keras.evaluate``.

The jobs live in their own modules, and their names stay importable from here:
:mod:`covid_keras.evaluation.decision` (positive and normal class, aggregation, the rule,
decision.json),
:mod:`covid_keras.evaluation.metrics` (metrics, bootstrap, metrics.json's content),
:mod:`covid_keras.evaluation.report` (plots, report.html, CSVs, comparison tables) and
:mod:`covid_keras.io.run_dir` (the run folder). Imports go one way: evaluation -> report ->
metrics -> decision -> run_dir.

Definitions (also written into every metrics.json, ``definitions``):

* positive class: "covid" when the classes have it, else class 1; its probability is the
  slice's *score*.
* normal class: the class that means "no disease" (``normal``, ``healthy``,
  ``non_covid``, ... see :func:`infer_normal_class`), inferred from the class names when
  the decision is chosen and stored in decision.json (``normal_class``); ``null`` with two
  classes or when no single class name means normal. A decision.json without the field
  (written before it existed) gets it inferred from its classes when read.
* patient aggregation rules: ``mean`` (the DRENet paper: the patient's probabilities are
  the mean of its slices'; score = mean slice score) and ``any`` (seed 004: a patient is
  positive if any slice is, normal only if all are: score = its highest slice score;
  its probabilities are those of that slice).
* slice decision: positive when its score >= the threshold, else the most probable of the
  other classes.
* patient decision: positive when the patient's score >= the threshold. Otherwise, with
  ``mean``, the most probable other class of the patient's probabilities; with ``any``
  and a normal class (seed 004: "only when ALL of his images were recognized as normal
  will he be classified as normal", and a single abnormal slice is enough for the other
  diseases too): the normal class only if every slice is decided normal, else the
  abnormal class decided on his slices (several: the one of the slice with the highest
  probability of its decided class). With ``any`` and no normal class (two classes, or
  none of the names means normal): the most probable other class of the patient's
  probabilities (its highest-scoring slice's). :func:`patient_decisions` (evaluation),
  :func:`decide_patient` (one unlabelled patient) and the export's ``predict_study``
  (:mod:`covid_keras.serving.serving_signatures`) apply the same rule.
* the rule and threshold are chosen on the validation split only, by Youden's J
  (sensitivity + specificity - 1) or the highest specificity at sensitivity >= a target.
* metrics: AUC (of the score; with more than two classes per class one-vs-rest on each
  class's probability), accuracy, sensitivity (recall), specificity, PPV (precision), NPV,
  F1 = 2PR/(P+R). The DRENet paper prints (P+R)/2 as its F1: comparison tables show both.
* 95 % CIs: percentile bootstrap resampling *patients* (with all their slices), stratified
  by the patient's label, seeded: the same seed gives the same intervals.
* calibration: expected calibration error (ECE, equal-width bins) of the positive score.

A metric that cannot be computed is ``{"value": null, "ci95": null, "reason": ...}``; the
JSON is strict (no NaN).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from covid_keras.core import files
from covid_keras.evaluation.decision import (  # noqa: F401 - re-exported: the names' old home
    CRITERIA,
    DECISION_FILE,
    NORMAL_NAMES,
    RULES,
    Decision,
    Patients,
    aggregate,
    any_rule_other,
    candidate_thresholds,
    choose_decision,
    decide,
    decide_patient,
    group_slices,
    infer_normal_class,
    normal_class_of,
    patient_decisions,
    positive_index,
    read_decision,
    rule_text,
    write_decision,
)
from covid_keras.evaluation.decision import manifest_sha as _manifest_sha
from covid_keras.evaluation.metrics import (  # noqa: F401 - re-exported
    DEFAULT_BOOTSTRAP,
    DEFINITIONS,
    ECE_BINS,
    METRICS,
    MIN_PATIENTS_PER_CLASS,
    REASONS,
    auc_score,
    binary_metrics,
    bootstrap,
    confusion,
    ece_score,
    evaluate_predictions,
    level_metrics,
    per_site,
    public_result,
    reliability,
    roc_points,
    small_sample_warnings,
    softmax,
)
from covid_keras.evaluation.report import (  # noqa: F401 - re-exported
    HEADERS,
    PAPER_TABLE1,
    PAPER_TABLE2,
    comparison_markdown,
    comparison_rows,
    summary_line,
    write_comparison,
    write_patients_csv,
    write_slices_csv,
)
from covid_keras.io.run_dir import CHECKPOINTS, RunDir
from covid_keras.io.run_dir import METRICS as METRICS_FILE


# ------------------------------------------------------------------ split prediction
@dataclass
class Predictions:
    """One split's slice-level predictions, in record order."""

    classes: list
    labels: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, C) float64
    patient_keys: list
    study_keys: list
    slice_index: np.ndarray
    sites: list
    outputs: dict = field(default_factory=dict)  # the model's other outputs (boxes...)
    split: str = ""
    data_dir: str = ""

    def __len__(self) -> int:
        return int(len(self.labels))


class SplitPredictor:
    """A split's records in order, every record once: metadata in memory (labels, keys,
    sites), images streamed to the model in batches. Replaces ``callbacks.Evaluator``
    (same ``labels``, ``patient_keys``, ``study_keys``, ``slice_index``, ``display_u8``,
    ``predict``; callers wrap the model themselves, e.g. ``predict(_probe(model))``).

    The images are padded with blank ones to whole batches (every replica of a
    distribution strategy then gets a full share); the padding's outputs are dropped.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, cfg=None,
                 num_display: int = 0):
        import tensorflow as tf

        from covid_keras.core import schema
        from covid_keras.io import data

        self.data_dir, self.split, self.batch_size = data_dir, split, int(batch_size)
        self.cfg = cfg if cfg is not None else data.PipelineConfig()
        self.files = data.shard_files(data_dir, split)
        keys = (schema.LABEL_INDEX, schema.PATIENT_KEY, schema.STUDY_KEY, schema.SLICE_INDEX,
                schema.SITE, schema.SOP_KEY)
        spec = {k: v for k, v in schema.parse_spec().items() if k in keys}
        raw = tf.data.TFRecordDataset(self.files, "GZIP").map(
            data.graph_fn(lambda r: tf.io.parse_single_example(r, spec)))
        cols: dict = {k: [] for k in keys}
        for batch in raw.batch(1024):
            for k in keys:
                cols[k].extend(batch[k].numpy().tolist())
        self.labels = np.asarray(cols[schema.LABEL_INDEX], np.int64)
        self.patient_keys = [v.decode() for v in cols[schema.PATIENT_KEY]]
        self.study_keys = [v.decode() for v in cols[schema.STUDY_KEY]]
        self.slice_index = np.asarray(cols[schema.SLICE_INDEX], np.int64)
        self.sites = [v.decode() for v in cols[schema.SITE]]
        self.sop_keys = [v.decode() for v in cols[schema.SOP_KEY]]
        n = len(self.labels)
        pad = (-n) % self.batch_size
        size = self.cfg.input_size
        blank = tf.zeros([size, size, 3], tf.float32)
        if self.cfg.lung_mask:  # a lung model's input: the image and its lung mask
            blank = data.lung_model_input(blank, tf.zeros([size, size, 1]), size)
        blank = tf.data.Dataset.from_tensors(blank).repeat(pad)
        ds = data.make_dataset(data_dir, split, self.batch_size, training=False, cfg=self.cfg)
        self.images = (ds.map(data.graph_fn(lambda x, y: x)).unbatch().concatenate(blank)
                       .batch(self.batch_size).apply(
                           tf.data.experimental.assert_cardinality(
                               (n + pad) // self.batch_size)))
        # The first slices as uint8 (TensorBoard's slices with their boxes), or None.
        shown = self.images_u8(range(min(int(num_display), n)))
        self.display_u8 = np.stack([shown[i] for i in sorted(shown)]) if shown else None

    def __len__(self) -> int:
        return int(len(self.labels))

    def predict(self, model) -> dict:
        """The model's outputs (a dict; ``logits`` at least) for every record, in order."""
        out = model.predict(self.images, verbose=0)
        if not isinstance(out, dict):
            out = {"logits": out}
        n = len(self)
        out = {k: np.asarray(v)[:n] for k, v in out.items()}
        if out["logits"].shape[0] != n:
            raise RuntimeError(f"Predicted {out['logits'].shape[0]} slices for {n} records")
        return out

    def predictions(self, model, classes, outputs: dict | None = None) -> Predictions:
        out = outputs if outputs is not None else self.predict(model)
        probs = softmax(np.asarray(out["logits"], np.float64))
        other = {k: v for k, v in out.items() if k != "logits"}
        if "boxes" in other:  # clipped to the image: an anchor may extend past it
            other["boxes"] = np.clip(np.asarray(other["boxes"]), 0.0,
                                     float(self.cfg.input_size))
        return Predictions(list(classes), self.labels.copy(), probs, list(self.patient_keys),
                           list(self.study_keys), self.slice_index.copy(), list(self.sites),
                           other, self.split, self.data_dir)

    def model_masks(self, indices) -> dict:
        """index -> the record's lung mask as a lung model takes it
        (:func:`covid_keras.io.data.decode_mask`: float32 (S, S, 1), 1 = lung), for the
        records at ``indices`` (one pass over the shards)."""
        from covid_keras.core import schema
        from covid_keras.io import data

        return self._decoded(indices, schema.MASK,
                             lambda v: data.decode_mask(v, self.cfg.input_size))

    def images_u8(self, indices) -> dict:
        """index -> uint8 (S, S, 3) image at the model's input size (no normalisation),
        for the records at ``indices`` (one pass over the shards)."""
        from covid_keras.core import schema
        from covid_keras.io import data

        return self._decoded(indices, schema.IMAGE,
                             lambda v: data.decode_image(v, self.cfg.input_size))

    def _decoded(self, indices, key: str, decode) -> dict:
        """index -> ``decode(the record's feature key)`` as a NumPy array, for the records
        at ``indices`` (one pass over the shards, stopping at the last one wanted)."""
        import tensorflow as tf

        from covid_keras.core import schema

        wanted = set(int(i) for i in indices)
        out: dict = {}
        if not wanted:
            return out
        spec = {key: schema.parse_spec()[key]}
        for i, rec in enumerate(tf.data.TFRecordDataset(self.files, "GZIP")):
            if i in wanted:
                out[i] = decode(tf.io.parse_single_example(rec, spec)[key]).numpy()
                if len(out) == len(wanted):
                    break
        return out


# ------------------------------------------------------------------ files
def dumps(obj) -> str:
    """Strict JSON (NaN / inf become null; raises on anything else non-JSON)."""
    return files.dumps(obj)


def atomic_write(path: str, text: str) -> None:
    files.atomic_write_text(path, text)


# ------------------------------------------------------------------ run folders
def load_model(path: str):
    """A covid_keras ``.keras`` model for inference (not compiled):
    :func:`covid_keras.model.saving.load_model`."""
    from covid_keras.model import saving

    return saving.load_model(path, compile=False)


def model_summary(spec: dict) -> dict:
    """metrics.json's ``model``: backbone, input_size, num_classes, kind ("drenet" /
    "classifier") and include_preprocessing (the model normalises its own input) of a
    :func:`covid_keras.model.saving.model_spec` (the one spec)."""
    out = {"backbone": spec["backbone"], "input_size": spec["input_size"],
           "num_classes": spec["num_classes"], "kind": spec["model"],
           "include_preprocessing": bool(spec.get("include_preprocessing", False))}
    if spec.get("navigator_anchors", "all") != "all":  # a lung DRENet (takes the mask too)
        out["navigator_anchors"] = spec["navigator_anchors"]
    return out


def read_run(run_dir: str) -> dict:
    """The trainer's flags of a run: :meth:`covid_keras.io.run_dir.RunDir.flags`."""
    return RunDir(run_dir).flags()


def resolve_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """:meth:`covid_keras.io.run_dir.RunDir.checkpoint`."""
    return RunDir(run_dir).checkpoint(checkpoint)


def same_split(data_dir_a: str | None, split_a: str | None, data_dir_b: str | None,
               split_b: str | None, sha_a: str | None = None) -> bool:
    """Whether two (dataset, split) pairs are the same split: the same split name, and the
    same dataset (manifest SHA-256 when known, else the real path; unknown: assumed)."""
    if not split_a or split_a != split_b:
        return False
    sha_b = _manifest_sha(data_dir_b)
    if sha_a and sha_b:
        return sha_a == sha_b
    if data_dir_a and data_dir_b:
        return os.path.realpath(data_dir_a) == os.path.realpath(data_dir_b)
    return True


def trained_folds(folds_run: str | None, data_dir: str, split: str) -> bool:
    """Whether ``folds_run`` is a ``--folds`` run whose folds trained on ``split`` of
    ``data_dir`` (its folds.json's splits of the same data)."""
    folds = RunDir(folds_run).folds() if folds_run and files.isdir(folds_run) else None
    return bool(folds) and any(same_split(folds["data_dir"], s, data_dir, split,
                                          folds["dataset_manifest_sha256"])
                               for s in folds["splits"])


def evaluate_run(run_dir: str, data_dir: str | None = None, split: str = "test",
                 output_dir: str | None = None, checkpoint: str | None = None,
                 val_split: str | None = None, val_data_dir: str | None = None,
                 criterion: str = "youden", target_sensitivity: float = 0.9,
                 batch_size: int = 8, n_bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                 top_slices: int = 3, max_explained: int = -1, save_decision: bool = False,
                 report: bool = True, log=print) -> dict:
    """Evaluates a training run's checkpoint on ``split`` of ``data_dir`` and writes
    metrics.json, slices.csv, patients.csv, the plots, explanations and report.html to
    ``output_dir``. The decision is the run's decision.json; without one it is chosen now
    on the run's validation split (never on ``split``), and saved into the run folder with
    ``save_decision``. Returns metrics.json's content."""
    from covid_keras.io import data

    run = RunDir(run_dir)
    ckpt = run.checkpoint(checkpoint)  # first: is this a run at all?
    flags = run.flags()
    data_dir = data_dir or flags.get("data_dir")
    if not data_dir:
        raise ValueError(f"No --data_dir given and none in {run_dir}'s run_info.json")
    notes, warnings = [], []
    run_data_dir = flags.get("data_dir")
    run_val = flags.get("val_split") or "val"
    decision = read_decision(run_dir)
    v_dir = val_data_dir or run_data_dir or data_dir
    v_split = val_split or run_val
    if decision is None and same_split(v_dir, v_split, data_dir, split):
        raise ValueError(f"The run has no {DECISION_FILE} and its validation split "
                         f"({v_split} of {v_dir}) is the evaluated split: a threshold is "
                         "never chosen on the split it is evaluated on (pass --val_split)")
    data.shard_files(data_dir, split)  # a mistyped split fails before the model loads
    if decision is None:
        data.shard_files(v_dir, v_split)  # and so does the split the decision comes from
    output_dir = output_dir or run.eval_dir(split)
    os.makedirs(output_dir, exist_ok=True)  # only once the inputs are known to be there
    from covid_keras.model import saving

    model = load_model(ckpt)
    spec = model_summary(saving.model_spec(ckpt))
    classes = list(data.read_manifest(data_dir)["classes"])
    if len(classes) != spec["num_classes"]:
        raise ValueError(f"{ckpt} predicts {spec['num_classes']} classes, {data_dir} has "
                         f"{len(classes)} ({classes})")
    cfg = data.PipelineConfig.for_model(spec)  # normalised input only for an old model
    log(f"evaluate: {ckpt} ({spec['kind']}, {spec['backbone']}, {spec['input_size']} px) "
        f"on {split} of {data_dir}")
    predictor = SplitPredictor(data_dir, split, batch_size, cfg)
    preds = predictor.predictions(model, classes)
    if decision is not None:
        if decision.get("checkpoint") and os.path.basename(ckpt) != decision["checkpoint"]:
            warnings.append(f"decision.json was chosen for {decision['checkpoint']}; this "
                            f"evaluation uses {os.path.basename(ckpt)}")
        notes.append(f"Decision read from {os.path.join(run_dir, DECISION_FILE)}.")
    else:
        log(f"evaluate: {run_dir} has no {DECISION_FILE}: choosing the rule and threshold "
            f"on {v_split} of {v_dir} ({criterion})")
        v_pred = SplitPredictor(v_dir, v_split, batch_size, cfg).predictions(model, classes)
        decision = write_decision(run_dir, v_pred, v_split, os.path.basename(ckpt), criterion,
                                  target_sensitivity,
                                  path=None if save_decision else os.path.join(
                                      output_dir, DECISION_FILE))
        notes.append(f"The run had no {DECISION_FILE}: the rule and threshold were chosen "
                     f"now on split {v_split!r} of {v_dir} ({decision['criterion']})" +
                     (" and saved into the run folder." if save_decision else
                      f"; written to {os.path.join(output_dir, DECISION_FILE)}."))
    if same_split(decision.get("data_dir"), decision.get("split"), data_dir, split,
                  decision.get("dataset_manifest_sha256")):
        warnings.append(f"This split ({split}) chose the decision threshold: its metrics "
                        "are optimistic; report a held-out split.")
    if same_split(run_data_dir, run_val, data_dir, split):
        warnings.append(f"This split ({split}) chose the checkpoint during training: its "
                        "metrics are optimistic.")
    if trained_folds(run_dir, data_dir, split):
        warnings.append(f"This split ({split}) trained the ensemble's folds and chose their "
                        "checkpoints and its decision: its metrics are optimistic; report a "
                        "held-out split.")
    if trained_folds(RunDir(run_dir).distill_teacher(), data_dir, split):  # its teacher
        warnings.append(f"This split ({split}) trained the folds of the ensemble this model "
                        "was distilled from (--distill_from): its metrics are optimistic; "
                        "report a held-out split.")

    result = evaluate_predictions(preds, decision, n_bootstrap, seed)
    result["warnings"] = warnings + result["warnings"]
    result["notes"] = notes
    result["run_dir"] = run_dir
    result["checkpoint"] = ckpt
    result["model"] = spec
    result["kind"] = "covid_keras.evaluate"
    pats = result["_patients"]
    write_slices_csv(os.path.join(output_dir, "slices.csv"), preds)
    write_patients_csv(os.path.join(output_dir, "patients.csv"), pats,
                       result["_patient_pred"], classes)
    if report:
        from covid_keras.evaluation import report as rep

        plots = rep.write_plots(output_dir, result, preds)
        expl = rep.write_explanations(output_dir, model, predictor, preds, result,
                                      top=top_slices, max_patients=max_explained)
        result["explanations"] = len(expl)
        rep.write_html(output_dir, result, plots, expl,
                       title=f"Evaluation of {os.path.basename(os.path.normpath(run_dir))} "
                             f"on {split}")
    public = public_result(result)
    atomic_write(os.path.join(output_dir, "metrics.json"), dumps(public))
    for w in result["warnings"]:
        log(f"WARNING: {w}")
    log(summary_line(public))
    log(f"written to {output_dir}: " + ("report.html, " if report else "") +
        "metrics.json, slices.csv, patients.csv" + (" and the plots" if report else ""))
    return public


# ------------------------------------------------------------------ --compare
def is_evaluation(path: str) -> bool:
    m = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(m):
        return False
    with open(m) as f:
        return json.load(f).get("kind") == "covid_keras.evaluate"


def run_name(path: str, taken: set) -> str:
    """The run's folder with its parent (runs/<experiment>/seed0 -> <experiment>/seed0),
    numbered if that is taken."""
    parts = [p for p in os.path.normpath(os.path.abspath(path)).split(os.sep) if p]
    name = "/".join(parts[-2:])
    base, i = name, 2
    while name in taken:
        name, i = f"{base} ({i})", i + 1
    return name


def compare_runs(paths: list[str], output_dir: str, settings: dict) -> dict:
    """``evaluate --compare``: each path an evaluation folder (its metrics.json) or a
    training run (evaluated now with ``settings``, :func:`evaluate_run`'s arguments but the
    run and output folders, into ``<output_dir>/<run name>/``); comparison.md and
    comparison.csv in ``output_dir``. Returns :func:`write_comparison`'s answer and the
    metrics by row label (``"results"``)."""
    results, taken = {}, set()
    for path in paths:
        name = run_name(path, taken)
        taken.add(name)
        if is_evaluation(path):
            with open(os.path.join(path, METRICS_FILE)) as f:
                m = json.load(f)
        elif not any(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINTS):
            raise ValueError(f"--compare: {path} is neither an evaluation folder (metrics.json"
                             " written by covid_keras.evaluate) nor a training run (best.keras"
                             " or final.keras)")
        else:
            m = evaluate_run(run_dir=path, output_dir=os.path.join(
                output_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name)), **settings)
        spec = m.get("model", {})
        label = f"{name} ({spec.get('kind', '?')}, {spec.get('backbone', '?')})"
        results[label] = m
    return {**write_comparison(output_dir, results), "results": results}
