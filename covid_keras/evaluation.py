"""Evaluation: one home for predicting a split, patient decisions and metrics with CIs.

    predictor = SplitPredictor(data_dir, "test", batch_size=8, cfg=cfg)
    preds = predictor.predictions(model, classes)          # slice probabilities + keys
    decision = read_decision(run_dir)                       # chosen on val at training
    result = evaluate_predictions(preds, decision)          # metrics.json's content

Used by the training callback (the split's prediction), the end of training
(:func:`write_decision`: the rule and threshold chosen on the validation split, written to
``<run_dir>/decision.json``) and ``python -m covid_keras.evaluate``.

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
  (:mod:`covid_keras.serving_signatures`) apply the same rule.
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
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from covid_keras.run_dir import DECISION, RunDir

RULES = ("mean", "any")
CRITERIA = ("youden", "sensitivity")
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
DECISION_FILE = DECISION
DEFAULT_BOOTSTRAP = 1000
ECE_BINS = 10

DEFINITIONS = {
    "positive_class": "'covid' when the classes have it, else class 1; score = its "
                      "probability",
    "rules": {"mean": "patient probabilities = mean of its slices' (DRENet paper)",
              "any": "patient positive if any slice is, normal only if all slices are "
                     "(seed 004): score = highest slice score, probabilities = that "
                     "slice's"},
    "decision": "positive when score >= threshold, else the most probable other class; "
                "slices use the same threshold on their own score. Rule 'any' with a "
                "normal class: a patient who is not positive is normal only if every "
                "slice is decided normal, else the abnormal class decided on his slices "
                "(several: the slice with the highest probability of its decided class)",
    "normal_class": "the class meaning no disease (normal, healthy, non_covid...), "
                    "inferred from the class names; null with two classes or none: then "
                    "'any' decides a non-positive patient by his highest-scoring slice's "
                    "most probable other class",
    "f1": "2PR/(P+R) (the DRENet paper prints (P+R)/2 as F1)",
    "ci95": "percentile bootstrap over patients (all their slices), stratified by label, "
            "seeded",
    "ece": f"expected calibration error of the positive score, {ECE_BINS} equal-width bins",
    "multi_class": "top-level entries: positive class vs rest; per_class: each class vs "
                   "rest; macro: their mean, and accuracy over all classes",
}


def positive_index(classes) -> int:
    classes = list(classes)
    return classes.index("covid") if "covid" in classes else 1


# Class names (lower case, "-" and " " read as "_") that mean "no disease".
NORMAL_NAMES = ("normal", "healthy", "non_covid", "noncovid", "negative", "no_finding",
                "no_findings")


def infer_normal_class(classes, positive_class: str | None = None) -> str | None:
    """The class among ``classes`` that means "no disease" (:data:`NORMAL_NAMES`), or None:
    with two classes (the ``any`` rule's decision does not need it), when none does, or
    when several do (ambiguous)."""
    classes = [str(c) for c in classes]
    if len(classes) <= 2:
        return None
    found = [c for c in classes if c != positive_class and
             c.strip().lower().replace("-", "_").replace(" ", "_") in NORMAL_NAMES]
    return found[0] if len(found) == 1 else None


def normal_class_of(decision: dict, classes=None) -> str | None:
    """The normal class of a decision (decision.json): its ``normal_class`` when it has the
    field (None allowed), else inferred from its ``classes`` (or ``classes``): decision
    files written before the field existed. Raises when it names no class of the
    decision's, or the positive class."""
    names = list(decision.get("classes") or classes or [])
    pos = decision.get("positive_class")
    if "normal_class" not in decision:
        return infer_normal_class(names, pos)
    normal = decision["normal_class"]
    if normal is None:
        return None
    if names and normal not in names:
        raise ValueError(f"normal_class {normal!r} is not one of the classes {names}")
    if normal == pos:
        raise ValueError(f"normal_class {normal!r} is the positive class")
    return str(normal)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


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

        from covid_keras import data, schema

        self.data_dir, self.split, self.batch_size = data_dir, split, int(batch_size)
        self.cfg = cfg if cfg is not None else data.PipelineConfig()
        self.files = data.shard_files(data_dir, split)
        keys = (schema.LABEL_INDEX, schema.PATIENT_KEY, schema.STUDY_KEY, schema.SLICE_INDEX,
                schema.SITE, schema.SOP_KEY)
        spec = {k: v for k, v in schema.parse_spec().items() if k in keys}
        raw = tf.data.TFRecordDataset(self.files, "GZIP").map(
            lambda r: tf.io.parse_single_example(r, spec))
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
        blank = tf.data.Dataset.from_tensors(tf.zeros([size, size, 3], tf.float32)).repeat(pad)
        ds = data.make_dataset(data_dir, split, self.batch_size, training=False, cfg=self.cfg)
        self.images = (ds.map(lambda x, y: x).unbatch().concatenate(blank)
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

    def images_u8(self, indices) -> dict:
        """index -> uint8 (S, S, 3) image at the model's input size (no normalisation),
        for the records at ``indices`` (one pass over the shards)."""
        import tensorflow as tf

        from covid_keras import data, schema

        wanted = set(int(i) for i in indices)
        out: dict = {}
        if not wanted:
            return out
        spec = {schema.IMAGE: schema.parse_spec()[schema.IMAGE]}
        ds = tf.data.TFRecordDataset(self.files, "GZIP")
        for i, rec in enumerate(ds):
            if i in wanted:
                r = tf.io.parse_single_example(rec, spec)
                out[i] = data.decode_image(r[schema.IMAGE], self.cfg.input_size).numpy()
                if len(out) == len(wanted):
                    break
        return out


# ------------------------------------------------------------------ patients and rules
@dataclass
class Patients:
    keys: list
    labels: np.ndarray  # (P,)
    probs: np.ndarray  # (P, C): the rule's probabilities
    score: np.ndarray  # (P,): the rule's positive score
    slices: list  # (P,) arrays of slice indices
    sites: list = field(default_factory=list)


def group_slices(patient_keys) -> "OrderedDict[str, np.ndarray]":
    """patient key -> its slice indices, patients in first-seen order."""
    groups: OrderedDict = OrderedDict()
    for i, key in enumerate(patient_keys):
        groups.setdefault(key, []).append(i)
    return OrderedDict((k, np.asarray(v, np.int64)) for k, v in groups.items())


def aggregate(probs: np.ndarray, labels: np.ndarray, patient_keys, rule: str, positive: int,
              sites=None) -> Patients:
    """Slice probabilities -> one row per patient by ``rule`` (see the module docstring).
    Raises if a patient's slices disagree on the label."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}. Received: {rule!r}")
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    groups = group_slices(patient_keys)
    p_probs, p_labels, p_sites = [], [], []
    for key, idx in groups.items():
        ys = set(int(v) for v in labels[idx])
        if len(ys) != 1:
            raise ValueError(f"Patient {key!r} has slices with labels {sorted(ys)}")
        p_labels.append(ys.pop())
        if rule == "mean":
            p_probs.append(probs[idx].mean(axis=0))
        else:
            p_probs.append(probs[idx[int(np.argmax(probs[idx, positive]))]])
        if sites is not None:
            p_sites.append(sites[int(idx[0])])
    p = np.asarray(p_probs).reshape(len(groups), probs.shape[1] if probs.ndim == 2 else 0)
    return Patients(list(groups), np.asarray(p_labels, np.int64), p, p[:, positive],
                    list(groups.values()), p_sites)


def rule_text(rule: str, positive: str, threshold, normal: str | None = None) -> str:
    """The patient decision in words (for a console line), e.g. ``mean rule: covid when
    the mean of its slices' covid probability >= 0.44, else the likeliest other class``."""
    t = f"{float(threshold):.4g}" if isinstance(threshold, (int, float)) else "?"
    if rule == "any":
        other = (f"{normal} only if every slice is {normal}, else the class of the strongest "
                 "abnormal slice" if normal else
                 f"the likeliest other class of the slice with the highest {positive} "
                 "probability")
        return f"any rule: {positive} when a slice's {positive} probability >= {t}, else {other}"
    return (f"{rule} rule: {positive} when the mean of its slices' {positive} probability "
            f">= {t}, else the likeliest other class")


def decide(probs: np.ndarray, threshold: float, positive: int) -> np.ndarray:
    """Class decisions: ``positive`` where its probability >= threshold, else the most
    probable other class."""
    probs = np.asarray(probs, np.float64)
    others = probs.copy()
    others[:, positive] = -np.inf
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))


def any_rule_other(slice_probs: np.ndarray, slice_pred: np.ndarray, normal: int) -> int:
    """Seed 004's ``any`` decision of a patient who is not positive (no slice reaches the
    threshold): ``normal`` only if every slice is decided ``normal``; else the abnormal
    class decided on his slices, the one of the slice with the highest probability of its
    decided class (ties: the first such slice)."""
    slice_probs = np.asarray(slice_probs, np.float64)
    slice_pred = np.asarray(slice_pred, np.int64)
    abnormal = slice_pred != normal
    if not abnormal.any():
        return int(normal)
    strength = np.where(abnormal, slice_probs[np.arange(len(slice_pred)), slice_pred],
                        -np.inf)
    return int(slice_pred[int(np.argmax(strength))])


def patient_decisions(slice_probs: np.ndarray, pats: Patients, threshold: float,
                      positive: int, rule: str, normal: int | None = None,
                      slice_pred: np.ndarray | None = None) -> np.ndarray:
    """Class decision per patient of ``pats`` (:func:`aggregate` of ``slice_probs`` by
    ``rule``): positive when the patient's score >= ``threshold``; otherwise, for ``any``
    with a ``normal`` class index, :func:`any_rule_other` on his slices' decisions
    (``slice_pred``, :func:`decide` of ``slice_probs`` when not given); else the most
    probable other class of the patient's probabilities (:func:`decide`)."""
    pred = decide(pats.probs, threshold, positive).astype(np.int64)
    if rule != "any" or normal is None:
        return pred
    if normal == positive:
        raise ValueError("The normal class cannot be the positive class")
    slice_probs = np.asarray(slice_probs, np.float64)
    if slice_pred is None:
        slice_pred = decide(slice_probs, threshold, positive)
    for i, idx in enumerate(pats.slices):
        if pred[i] != positive:
            pred[i] = any_rule_other(slice_probs[idx], slice_pred[idx], normal)
    return pred


def decide_patient(slice_probs: np.ndarray, decision: dict) -> dict:
    """One unlabelled patient (predict, serving): its slices' probabilities (S, C) under
    ``decision`` (decision.json: rule, threshold, classes, positive_class, normal_class;
    without normal_class it is inferred from the classes) -> {"probs" (C,), "score",
    "decision" (class name), "rule", "threshold", "normal_class", "slice_order" (slices
    by score, highest first)}."""
    classes = list(decision["classes"])
    pos = classes.index(decision["positive_class"])
    normal = normal_class_of(decision, classes)
    probs = np.asarray(slice_probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or not len(probs):
        raise ValueError(f"slice_probs must be (slices >= 1, {len(classes)}). Received: "
                         f"{probs.shape}")
    pats = aggregate(probs, np.zeros(len(probs), np.int64), ["p"] * len(probs),
                     decision["rule"], pos)
    t = float(decision["threshold"])
    pred = patient_decisions(probs, pats, t, pos, decision["rule"],
                             None if normal is None else classes.index(normal))
    return {"probs": pats.probs[0].tolist(), "score": float(pats.score[0]),
            "decision": classes[int(pred[0])],
            "rule": decision["rule"], "threshold": t, "normal_class": normal,
            "slice_order": np.argsort(-probs[:, pos], kind="stable").tolist()}


# ------------------------------------------------------------------ metrics
def auc_score(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half): scikit-learn's roc_auc_score; NaN when
    ``y`` has one class only."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def binary_metrics(y: np.ndarray, score: np.ndarray, pred: np.ndarray) -> dict:
    """y, pred: 0/1 arrays; score: the positive score (for the AUC). NaN when undefined."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    tp = float(np.sum(pred & y))
    tn = float(np.sum(~pred & ~y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)  # 2PR/(P+R); 0 when nothing positive is found
    return {"auc": auc_score(y, score), "accuracy": _ratio(tp + tn, len(y)),
            "sensitivity": sens, "specificity": _ratio(tn, tn + fp), "ppv": ppv,
            "npv": _ratio(tn, tn + fn), "f1": f1}


REASONS = {"auc": "the labels have one class only",
           "accuracy": "no examples",
           "sensitivity": "no positive examples",
           "specificity": "no negative examples",
           "ppv": "no positive decisions",
           "npv": "no negative decisions",
           "f1": "no positive examples and no positive decisions",
           "ece": "no examples"}


def ece_score(y: np.ndarray, score: np.ndarray, bins: int = ECE_BINS) -> float:
    y = np.asarray(y, np.float64)
    score = np.asarray(score, np.float64)
    if not len(y):
        return float("nan")
    which = np.minimum((score * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / len(y) * abs(y[m].mean() - score[m].mean())
    return float(total)


def reliability(y: np.ndarray, score: np.ndarray, bins: int = ECE_BINS) -> list:
    """Per bin: [lo, hi, count, mean score, observed positive fraction] (null if empty)."""
    y = np.asarray(y, np.float64)
    score = np.asarray(score, np.float64)
    which = np.minimum((score * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        out.append([b / bins, (b + 1) / bins, int(m.sum()),
                    float(score[m].mean()) if m.any() else None,
                    float(y[m].mean()) if m.any() else None])
    return out


def level_metrics(labels, probs, pred, positive: int) -> dict:
    """Metrics of one level (slices or patients): top-level = positive vs rest, ``ece``;
    with more than 2 classes ``per_class`` (one vs rest) and ``macro``."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    pred = np.asarray(pred)
    num_classes = probs.shape[1]
    out = binary_metrics(labels == positive, probs[:, positive], pred == positive)
    out["ece"] = ece_score(labels == positive, probs[:, positive])
    if num_classes > 2:
        per = {c: binary_metrics(labels == c, probs[:, c], pred == c)
               for c in range(num_classes)}
        out["per_class"] = per
        macro = {}
        for k in METRICS:
            vals = [per[c][k] for c in range(num_classes)]
            macro[k] = float(np.mean(vals)) if all(v == v for v in vals) else float("nan")
        macro["accuracy"] = _ratio(float(np.sum(pred == labels)), len(labels))
        out["macro"] = macro
    return out


def _flatten(m: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _stratified_sample(rng: np.random.Generator, strata: list) -> np.ndarray:
    return np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])


def bootstrap(fn, patient_labels: np.ndarray, n: int = DEFAULT_BOOTSTRAP, seed: int = 0
              ) -> dict:
    """Percentile 95 % intervals of every number ``fn(patient_indices)`` returns (a nested
    dict), over ``n`` resamples of the patients (with replacement, stratified by label).
    Returns flat key -> (lo, hi, valid resamples); NaN replicates are left out."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(patient_labels)
    strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    reps: dict = {}
    for _ in range(int(n)):
        for k, v in _flatten(fn(_stratified_sample(rng, strata))).items():
            reps.setdefault(k, []).append(v)
    out = {}
    for k, vals in reps.items():
        a = np.asarray(vals, np.float64)
        a = a[np.isfinite(a)]
        if len(a) < max(10, 0.5 * n):
            out[k] = (None, None, int(len(a)))
        else:
            lo, hi = np.percentile(a, [2.5, 97.5])
            out[k] = (float(lo), float(hi), int(len(a)))
    return out


def _entry(value: float, ci, name: str) -> dict:
    if value is None or not math.isfinite(value):
        return {"value": None, "ci95": None, "reason": REASONS.get(name, "undefined")}
    out = {"value": float(value), "ci95": None}
    if ci is not None and ci[0] is not None:
        out["ci95"] = [ci[0], ci[1]]
    elif ci is not None:
        out["ci95_reason"] = (f"only {ci[2]} bootstrap resamples had a defined value")
    return out


def _with_cis(values: dict, cis: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out[str(k)] = _with_cis(v, cis, f"{prefix}{k}/")
        else:
            out[k] = _entry(v, cis.get(f"{prefix}{k}"), k)
    return out


def _name_classes(m: dict, classes) -> dict:
    if "per_class" in m:
        m["per_class"] = {classes[int(c)]: v for c, v in m["per_class"].items()}
    return m


def confusion(labels, pred, num_classes: int) -> list:
    """[[count of label i decided j]]."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for a, b in zip(np.asarray(labels, int), np.asarray(pred, int)):
        cm[a, b] += 1
    return cm.tolist()


def roc_points(y, score) -> dict:
    """ROC curve: fpr, tpr and thresholds (positive when score >= threshold)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    ts = np.unique(score)[::-1]
    fpr, tpr = [0.0], [0.0]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    for t in ts:
        d = score >= t
        tpr.append(float((d & y).sum() / n_pos))
        fpr.append(float((d & ~y).sum() / n_neg))
    return {"fpr": fpr, "tpr": tpr, "thresholds": [float("inf")] + ts.tolist()}


# ------------------------------------------------------------------ decisions
def candidate_thresholds(score: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct scores, plus one below and one above all."""
    s = np.unique(np.asarray(score, np.float64))
    mids = (s[1:] + s[:-1]) / 2.0
    return np.concatenate([[s[0] / 2.0 if len(s) else 0.5], mids,
                           [(1.0 + s[-1]) / 2.0 if len(s) else 0.5]])


def _operating_point(y, score, criterion: str, target_sensitivity: float):
    """(value, threshold, sensitivity, specificity) of the best threshold by ``criterion``;
    ties: the threshold nearest 0.5."""
    y = np.asarray(y).astype(bool)
    best = None
    for t in candidate_thresholds(score):
        d = score >= t
        sens = (d & y).sum() / y.sum()
        spec = (~d & ~y).sum() / (~y).sum()
        if criterion == "youden":
            value = sens + spec - 1.0
        else:
            if sens < target_sensitivity:
                continue
            value = spec
        key = (round(float(value), 12), -abs(float(t) - 0.5))
        if best is None or key > best[0]:
            best = (key, float(value), float(t), float(sens), float(spec))
    if best is None:
        return None
    return best[1:]


def choose_decision(probs: np.ndarray, labels: np.ndarray, patient_keys, classes,
                    criterion: str = "youden", target_sensitivity: float = 0.9,
                    rules=RULES) -> dict:
    """The patient rule and threshold that are best on these (validation) predictions by
    ``criterion``: ``youden`` (max sensitivity + specificity - 1) or ``sensitivity`` (max
    specificity with sensitivity >= ``target_sensitivity``). Equal rules: the first of
    ``rules`` (``mean``, the paper's). Returns decision.json's content (without the split)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}. Received: {criterion!r}")
    classes = list(classes)
    pos = positive_index(classes)
    per_rule = {}
    best_rule = None
    for rule in rules:
        pats = aggregate(probs, labels, patient_keys, rule, pos)
        y = pats.labels == pos
        if y.all() or not y.any():
            raise ValueError(f"Choosing a decision needs patients of both {classes[pos]!r} "
                             f"and other classes on the validation split. Received: "
                             f"{int(y.sum())} of {len(y)} patients positive")
        value, t, sens, spec = _operating_point(y, pats.score, criterion, target_sensitivity)
        per_rule[rule] = {"threshold": t, "criterion_value": value, "sensitivity": sens,
                          "specificity": spec, "auc": auc_score(y, pats.score)}
        if best_rule is None or value > per_rule[best_rule]["criterion_value"] + 1e-12:
            best_rule = rule
    chosen = per_rule[best_rule]
    name = ("youden_j" if criterion == "youden" else
            f"max_specificity_at_sensitivity>={target_sensitivity:g}")
    return {"rule": best_rule, "threshold": chosen["threshold"],
            "positive_class": classes[pos], "classes": classes,
            "normal_class": infer_normal_class(classes, classes[pos]), "criterion": name,
            "criterion_value": chosen["criterion_value"],
            "val_sensitivity": chosen["sensitivity"],
            "val_specificity": chosen["specificity"],
            "val_patients": int(len(group_slices(patient_keys))),
            "per_rule": per_rule}


def write_decision(run_dir: str, preds: Predictions, split: str | None = None,
                   checkpoint: str = "best.keras", criterion: str = "youden",
                   target_sensitivity: float = 0.9, path: str | None = None) -> dict:
    """Chooses the decision on ``preds`` (the validation split's predictions of the run's
    checkpoint) and writes it atomically to ``<run_dir>/decision.json`` (or ``path``).
    Call it at the end of training with the val split's predictions of best.keras."""
    d = choose_decision(preds.probs, preds.labels, preds.patient_keys, preds.classes,
                        criterion, target_sensitivity)
    from covid_keras import files

    data_dir = preds.data_dir
    if data_dir and not files.is_remote(data_dir):
        data_dir = os.path.abspath(data_dir)
    d.update({"split": split or preds.split, "data_dir": data_dir or None,
              "dataset_manifest_sha256":
              _manifest_sha(preds.data_dir), "checkpoint": checkpoint,
              "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    target = path or os.path.join(run_dir, DECISION_FILE)
    if os.path.dirname(target):
        files.makedirs(os.path.dirname(target))
    atomic_write(target, dumps(d))
    return d


def read_decision(run_dir: str) -> dict | None:
    from covid_keras import files

    path = os.path.join(run_dir, DECISION_FILE)
    if not files.exists(path):
        return None
    d = json.loads(files.read_text(path))
    for key in ("rule", "threshold", "positive_class", "split"):
        if key not in d:
            raise ValueError(f"{path} has no {key!r}: not a covid_keras decision file")
    if d["rule"] not in RULES:
        raise ValueError(f"{path}: rule must be one of {RULES}. Received: {d['rule']!r}")
    try:
        # Files written before normal_class existed: inferred from their classes.
        d["normal_class"] = normal_class_of(d)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return d


def _manifest_sha(data_dir: str | None) -> str | None:

    if not data_dir:
        return None
    from covid_keras import files

    path = os.path.join(data_dir, "manifest.json")
    if not files.exists(path):
        return None
    return files.sha256(path)


# ------------------------------------------------------------------ one evaluation
def evaluate_predictions(preds: Predictions, decision: dict, n_bootstrap: int =
                         DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """metrics.json's content for ``preds`` under ``decision`` (rule, threshold)."""
    classes = list(preds.classes)
    pos = classes.index(decision["positive_class"])
    if decision.get("classes") and list(decision["classes"]) != classes:
        raise ValueError(f"The decision was chosen for classes {decision['classes']}, the "
                         f"split has {classes}")
    rule, t = decision["rule"], float(decision["threshold"])
    normal = normal_class_of(decision, classes)
    labels = np.asarray(preds.labels, np.int64)
    pats = aggregate(preds.probs, labels, preds.patient_keys, rule, pos, preds.sites)
    slice_pred = decide(preds.probs, t, pos)
    patient_pred = patient_decisions(preds.probs, pats, t, pos, rule,
                                     None if normal is None else classes.index(normal),
                                     slice_pred)

    def both(idx):
        sl = np.concatenate([pats.slices[i] for i in idx]) if len(idx) else np.zeros(0, int)
        return {"slice": level_metrics(labels[sl], preds.probs[sl], slice_pred[sl], pos),
                "patient": level_metrics(pats.labels[idx], pats.probs[idx],
                                         patient_pred[idx], pos)}

    all_idx = np.arange(len(pats.keys))
    values = both(all_idx)
    cis = bootstrap(both, pats.labels, n_bootstrap, seed) if n_bootstrap else {}
    result: dict = {"split": preds.split, "data_dir": preds.data_dir, "classes": classes,
                    "positive_class": classes[pos],
                    "decision": {"rule": rule, "threshold": t, "normal_class": normal,
                                 "criterion": decision.get("criterion"),
                                 "chosen_on_split": decision.get("split")},
                    "bootstrap": {"resamples": int(n_bootstrap), "seed": int(seed),
                                  "unit": "patient", "stratified_by": "label"},
                    "definitions": DEFINITIONS}
    for level, n in (("slice", len(labels)), ("patient", len(pats.keys))):
        m = _with_cis(values[level], {k[len(level) + 1:]: v for k, v in cis.items()
                                      if k.startswith(level + "/")})
        ece = m.pop("ece")
        section = {"count": int(n), **_name_classes(m, classes)}
        result[level] = section
        result.setdefault("calibration", {})[level] = {
            "ece": ece, "bins": ECE_BINS,
            "reliability": reliability(
                (labels if level == "slice" else pats.labels) == pos,
                (preds.probs if level == "slice" else pats.probs)[:, pos]),
            "score": "slice probability" if level == "slice" else f"patient score ({rule})"}
    result["confusion"] = {
        "slice": confusion(labels, slice_pred, len(classes)),
        "patient": confusion(pats.labels, patient_pred, len(classes)),
        "rows": "label", "columns": "decision"}
    result["roc"] = {"slice": roc_points(labels == pos, preds.probs[:, pos]),
                     "patient": roc_points(pats.labels == pos, pats.score)}
    result["sites"], site_warnings = per_site(pats, patient_pred, classes, pos)
    result["warnings"] = site_warnings + small_sample_warnings(pats.labels, classes)
    result["_patients"] = pats  # for the CSVs and the report; removed before writing
    result["_patient_pred"] = patient_pred
    result["_slice_pred"] = slice_pred
    return result


MIN_PATIENTS_PER_CLASS = 10


def small_sample_warnings(patient_labels, classes) -> list:
    """A warning per class with fewer than :data:`MIN_PATIENTS_PER_CLASS` patients: a
    bootstrap over so few patients understates the uncertainty."""
    out = []
    for c, name in enumerate(classes):
        n = int(np.sum(np.asarray(patient_labels) == c))
        if n < MIN_PATIENTS_PER_CLASS:
            out.append(f"Class {name!r} has {n} patient(s) here: metrics and their bootstrap "
                       "CIs over so few patients are unreliable.")
    return out


def per_site(pats: Patients, patient_pred: np.ndarray, classes, pos: int):
    """Per site: patients per class and the patient-level metrics (values); warnings when a
    class comes from a single site (the model may learn the source, not the disease)."""
    sites = pats.sites or ["unknown"] * len(pats.keys)
    names = sorted(set(sites))
    out = {}
    for s in names:
        idx = np.asarray([i for i, v in enumerate(sites) if v == s], np.int64)
        counts = {classes[c]: int(np.sum(pats.labels[idx] == c)) for c in range(len(classes))}
        m = level_metrics(pats.labels[idx], pats.probs[idx], patient_pred[idx], pos)
        m.pop("ece")
        out[s] = {"patients": int(len(idx)), "patients_by_class": counts,
                  "patient": _name_classes(_with_cis(m, {}), classes)}
    warnings = []
    if len(names) == 1:
        warnings.append(f"Every patient comes from one site ({names[0]!r}): the per-site "
                        "check cannot tell whether a class is tied to its source.")
    else:
        for c, name in enumerate(classes):
            from_sites = sorted({sites[i] for i in range(len(sites)) if pats.labels[i] == c})
            if len(from_sites) == 1:
                warnings.append(f"Class {name!r} comes from a single site ({from_sites[0]!r})"
                                ": the model may learn the source, not the disease.")
    return out, warnings


# ------------------------------------------------------------------ files
def dumps(obj) -> str:
    """Strict JSON (NaN / inf become null; raises on anything else non-JSON)."""
    from covid_keras import files

    return files.dumps(obj)


def atomic_write(path: str, text: str) -> None:
    from covid_keras import files

    files.atomic_write_text(path, text)


def public_result(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _fmt_boxes(boxes, scores) -> str:
    if boxes is None:
        return ""
    items = []
    for j, b in enumerate(np.asarray(boxes)):
        s = None if scores is None else float(np.asarray(scores)[j])
        items.append([round(float(v), 1) for v in b] + ([round(s, 4)] if s is not None else []))
    return json.dumps(items)


def _prob(p) -> str:
    """A probability as its shortest exact text (``repr``): read back, it is the same
    number, so saturated probabilities do not tie and an AUC recomputed from the CSV equals
    metrics.json's (6 decimals made 0.99999991 and 0.99999997 both 1.000000)."""
    return repr(float(p))


def write_slices_csv(path: str, preds: Predictions) -> None:
    """patient_key, study_key, slice_index, label, prob_<class>..., boxes (JSON list of
    [y0, x0, y1, x1, score] in input pixels; empty for models without boxes)."""
    import csv

    boxes = preds.outputs.get("boxes")
    scores = preds.outputs.get("box_scores")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_key", "study_key", "slice_index", "label"] +
                   [f"prob_{c}" for c in preds.classes] + ["boxes"])
        for i in range(len(preds)):
            w.writerow([preds.patient_keys[i], preds.study_keys[i], int(preds.slice_index[i]),
                        preds.classes[int(preds.labels[i])]] +
                       [_prob(p) for p in preds.probs[i]] +
                       [_fmt_boxes(None if boxes is None else boxes[i],
                                   None if scores is None else scores[i])])


def write_patients_csv(path: str, pats: Patients, patient_pred, classes) -> None:
    """patient_key, label, prob_<class>... (the rule's), decision."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_key", "label"] + [f"prob_{c}" for c in classes] + ["decision"])
        for i, key in enumerate(pats.keys):
            w.writerow([key, classes[int(pats.labels[i])]] +
                       [_prob(p) for p in pats.probs[i]] + [classes[int(patient_pred[i])]])


# ------------------------------------------------------------------ comparison tables
PAPER_TABLE1 = ("auc", "sensitivity", "ppv", "specificity", "f1", "accuracy")
PAPER_TABLE2 = ("sensitivity", "ppv", "specificity", "f1", "accuracy")
HEADERS = {"auc": "AUC", "sensitivity": "Recall", "ppv": "Precision",
           "specificity": "Specificity", "f1": "F1 (2PR/(P+R))", "accuracy": "Accuracy",
           "f1_paper": "F1 as printed by the paper ((P+R)/2)"}


def comparison_rows(results: dict) -> tuple[list, list]:
    """name -> metrics.json; the paper's layout: Table 1 (binary, patient level: AUC,
    recall, precision, specificity, F1, accuracy) or Table 2 (more classes: the macro
    averages of recall, precision, specificity, F1, accuracy). Returns (header, rows)."""
    multi = any("macro" in r["patient"] for r in results.values())
    cols = PAPER_TABLE2 if multi else PAPER_TABLE1
    header = ["model"] + [HEADERS[c] for c in cols] + [HEADERS["f1_paper"], "patients",
                                                       "rule", "threshold", "split"]
    rows = []
    for name, r in results.items():
        sec = r["patient"]["macro"] if multi else r["patient"]
        row = [name]
        for c in cols:
            row.append(sec.get(c, {"value": None}))
        p, rr = sec["ppv"]["value"], sec["sensitivity"]["value"]
        row.append({"value": None if p is None or rr is None else (p + rr) / 2.0,
                    "ci95": None})
        row += [r["patient"]["count"], r["decision"]["rule"],
                round(float(r["decision"]["threshold"]), 4), r.get("split")]
        rows.append(row)
    return header, rows


def _cell(v) -> str:
    if isinstance(v, dict):
        if v.get("value") is None:
            return "n/a"
        s = f"{v['value']:.3f}"
        if v.get("ci95"):
            s += f" [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
        return s
    return str(v)


def comparison_markdown(results: dict) -> str:
    header, rows = comparison_rows(results)
    multi = any("macro" in r["patient"] for r in results.values())
    title = ("Patient-level comparison, laid out like the DRENet paper's Table 2 (macro "
             "averages over classes)" if multi else
             "Patient-level comparison, laid out like the DRENet paper's Table 1")
    lines = [f"**{title}**. Values with 95 % bootstrap CIs over patients. F1 is 2PR/(P+R); "
             "the paper prints (P+R)/2 as F1, given in its own column for comparison.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(output_dir: str, results: dict) -> dict:
    """comparison.md and comparison.csv (value, ci_lo, ci_hi columns per metric)."""
    import csv

    os.makedirs(output_dir, exist_ok=True)
    md = comparison_markdown(results)
    atomic_write(os.path.join(output_dir, "comparison.md"), md)
    header, rows = comparison_rows(results)
    with open(os.path.join(output_dir, "comparison.csv"), "w", newline="") as f:
        w = csv.writer(f)
        flat = []
        for h, v in zip(header, rows[0] if rows else header):
            flat += [h, f"{h} ci95 lo", f"{h} ci95 hi"] if isinstance(v, dict) else [h]
        w.writerow(flat)
        for row in rows:
            out = []
            for v in row:
                if isinstance(v, dict):
                    ci = v.get("ci95") or [None, None]
                    out += ["" if x is None else f"{x:.4f}" for x in (v.get("value"), *ci)]
                else:
                    out.append(v)
            w.writerow(out)
    return {"markdown": md}


# ------------------------------------------------------------------ run folders
def load_model(path: str):
    """A covid_keras ``.keras`` model for inference (not compiled):
    :func:`covid_keras.saving.load_model`."""
    from covid_keras import saving

    return saving.load_model(path, compile=False)


def model_spec(model) -> dict:
    """backbone, input_size, num_classes and kind ("drenet" / "classifier") of a model
    (metrics.json's ``model``): :func:`covid_keras.saving.model_spec`."""
    from covid_keras import saving

    spec = saving.model_spec(model)
    return {"backbone": spec["backbone"], "input_size": spec["input_size"],
            "num_classes": spec["num_classes"], "kind": spec["model"]}


def read_run(run_dir: str) -> dict:
    """The trainer's flags of a run: :meth:`covid_keras.run_dir.RunDir.flags`."""
    return RunDir(run_dir).flags()


def resolve_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """:meth:`covid_keras.run_dir.RunDir.checkpoint`."""
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
    from covid_keras import data

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
    model = load_model(ckpt)
    spec = model_spec(ckpt)
    classes = list(data.read_manifest(data_dir)["classes"])
    if len(classes) != spec["num_classes"]:
        raise ValueError(f"{ckpt} predicts {spec['num_classes']} classes, {data_dir} has "
                         f"{len(classes)} ({classes})")
    cfg = data.PipelineConfig(input_size=spec["input_size"], backbone=spec["backbone"])
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
        from covid_keras import report as rep

        plots = rep.write_plots(output_dir, result, preds)
        expl = rep.write_explanations(output_dir, model, predictor, preds, result,
                                      spec["backbone"], top_slices, max_explained)
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


def summary_line(m: dict) -> str:
    def f(entry):
        if entry.get("value") is None:
            return "n/a"
        ci = entry.get("ci95")
        return f"{entry['value']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    d = m["decision"]
    pos = m.get("positive_class", "positive")
    parts = [f"{m['split']}, {pos} vs rest ({d['rule']} rule, {pos} >= {d['threshold']:.4g} "
             f"chosen on {d.get('chosen_on_split')})"]
    for level in ("patient", "slice"):
        s = m[level]
        parts.append(f"{level}s {s['count']}: " + ", ".join(
            f"{k} {f(s[k])}" for k in METRICS))
    return " | ".join(parts)
