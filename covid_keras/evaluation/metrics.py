"""Metrics of slices and patients (NumPy and scikit-learn; no TensorFlow): the AUC,
accuracy, sensitivity, specificity, PPV, NPV and F1 of a decision, the calibration (ECE),
the patient bootstrap's 95 % intervals, and metrics.json's content
(:func:`evaluate_predictions`), on the definitions of :mod:`covid_keras.evaluation.evaluation`
(:data:`DEFINITIONS`, written into every metrics.json).

scikit-learn computes what it has: ``roc_auc_score`` (AUC, one-vs-rest macro AUC),
``roc_curve`` and ``confusion_matrix`` (the counts every ratio comes from). Ours: the ratios
with their undefined cases (NaN, then ``{"value": null, "reason": ...}``), the expected
calibration error, and the percentile bootstrap that resamples *patients* (with all their
slices), stratified by label and seeded.

The training logs (:func:`classification_metrics`) use the paper's aggregation (a patient's
probabilities are the mean of their slices', :func:`covid_keras.evaluation.decision.aggregate` with
``rule="mean"``) and the predicted class (argmax); positive class "covid" when the classes
have it (else class 1): COVID vs the rest. Reports use the decision chosen on validation
(rule and threshold, ``decision.json``) through :func:`evaluate_predictions`. With more
than two classes the macro one-vs-rest AUC and the accuracy are reported too.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from covid_keras.evaluation.decision import (
    aggregate,
    decide,
    normal_class_of,
    patient_decisions,
    positive_index,
)

__all__ = ["positive_index", "softmax", "aggregate_by_patient", "classification_metrics",
           "auc_score", "binary_metrics", "level_metrics", "bootstrap",
           "evaluate_predictions", "public_result"]

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def auc_score(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC: scikit-learn's roc_auc_score; NaN when ``y`` has one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(score, np.float64)))


def binary_metrics(y: np.ndarray, score: np.ndarray, pred: np.ndarray) -> dict:
    """y, pred: 0/1 arrays; score: the positive score (for the AUC). NaN when undefined.
    The counts are scikit-learn's confusion matrix."""
    from sklearn.metrics import confusion_matrix

    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    tn, fp, fn, tp = (float(v) for v in confusion_matrix(
        y, pred, labels=[False, True]).ravel()) if len(y) else (0.0,) * 4
    return {"auc": auc_score(y, score),
            **{k: float(v) for k, v in _rates(tp, fp, fn, tn).items()}}


def _ratios(a, b):
    """a / b, NaN where b is 0 (elementwise)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


def _rates(tp, fp, fn, tn) -> dict:
    """The rates of :data:`METRICS` but the AUC, from the confusion counts (scalars, or
    arrays: one entry a bootstrap resample). F1 is 2PR/(P+R): 0 when nothing positive is
    found."""
    return {"accuracy": _ratios(tp + tn, tp + fp + fn + tn),
            "sensitivity": _ratios(tp, tp + fn), "specificity": _ratios(tn, tn + fp),
            "ppv": _ratios(tp, tp + fp), "npv": _ratios(tn, tn + fn),
            "f1": _ratios(2 * tp, 2 * tp + fp + fn)}


REASONS = {"auc": "the labels have one class only",
           "accuracy": "no examples",
           "sensitivity": "no positive examples",
           "specificity": "no negative examples",
           "ppv": "no positive decisions",
           "npv": "no negative decisions",
           "f1": "no positive examples and no positive decisions",
           "ece": "no examples"}


def _bins(score: np.ndarray, bins: int) -> np.ndarray:
    """The equal-width bin of each score in [0, 1] (1 in the last)."""
    return np.minimum((np.asarray(score, np.float64) * bins).astype(int), bins - 1)


def ece_score(y: np.ndarray, score: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the positive score (NaN without examples)."""
    return float(_weighted_ece(y, score, np.ones((1, len(y))), bins)[0])


def reliability(y: np.ndarray, score: np.ndarray, bins: int = ECE_BINS) -> list:
    """Per bin: [lo, hi, count, mean score, observed positive fraction] (null if empty)."""
    y = np.asarray(y, np.float64)
    score = np.asarray(score, np.float64)
    which = _bins(score, bins)
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
        macro["accuracy"] = float(_ratios(float(np.sum(pred == labels)), len(labels)))
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


def _strata(patient_labels: np.ndarray) -> list:
    labels = np.asarray(patient_labels)
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def _percentile_cis(reps: dict, n: int) -> dict:
    """flat key -> (lo, hi, valid resamples) of the replicates; NaN replicates are left out,
    and fewer than max(10, n / 2) valid ones give no interval."""
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


def _resamples(patient_labels: np.ndarray, n: int, seed: int):
    """``n`` seeded resamples of the patients' indices (with replacement, stratified by
    label)."""
    rng = np.random.default_rng(seed)
    strata = _strata(patient_labels)
    for _ in range(int(n)):
        yield _stratified_sample(rng, strata)


def bootstrap(fn, patient_labels: np.ndarray, n: int = DEFAULT_BOOTSTRAP, seed: int = 0
              ) -> dict:
    """Percentile 95 % intervals of every number ``fn(patient_indices)`` returns (a nested
    dict), over ``n`` resamples of the patients (with replacement, stratified by label).
    Returns flat key -> (lo, hi, valid resamples); NaN replicates are left out. (metrics.json
    uses :func:`bootstrap_counts`, the same resamples, all at once.)"""
    reps: dict = {}
    for idx in _resamples(patient_labels, n, seed):
        for k, v in _flatten(fn(idx)).items():
            reps.setdefault(k, []).append(v)
    return _percentile_cis(reps, n)


def bootstrap_counts(patient_labels: np.ndarray, n: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                     chunk: int = 128):
    """The resamples of :func:`bootstrap` (the same seed gives the same patients), as
    chunks of a (resamples, patients) matrix: how many times each patient is drawn."""
    counts = (np.bincount(idx, minlength=len(patient_labels))
              for idx in _resamples(patient_labels, n, seed))
    while block := list(itertools.islice(counts, chunk)):
        yield np.stack(block).astype(np.float64)


def _weighted_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The ROC AUC of each row of weights ``w`` (resamples, examples): what
    :func:`auc_score` gives on the examples repeated that many times (every positive
    against every negative, a tie counting one half); NaN without both classes."""
    order = np.argsort(score, kind="stable")
    s, yy, ws = score[order], y[order], w[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]         # groups of tied scores
    ends = np.r_[starts[1:], len(s)]
    group = np.repeat(np.arange(len(starts)), ends - starts)
    pos, neg = ws * yy, ws * ~yy
    below = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg, axis=1)], axis=1)
    under = below[:, starts[group]]                             # negatives scored lower
    tied = below[:, ends[group]] - under                        # negatives tied with it
    p, q = pos.sum(axis=1), neg.sum(axis=1)
    return _ratios((pos * (under + 0.5 * tied)).sum(axis=1), np.where(q > 0, p * q, 0.0))


def _weighted_binary(y, score, pred, w: np.ndarray) -> dict:
    """:func:`binary_metrics` of each row of weights ``w`` at once (the bootstrap's)."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp = w @ (y & pred), w @ (~y & pred)
    fn, tn = w @ (y & ~pred), w @ (~y & ~pred)
    return {"auc": _weighted_auc(y, np.asarray(score, np.float64), w),
            **_rates(tp, fp, fn, tn)}


def _weighted_ece(y, score, w: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """:func:`ece_score` of each row of weights ``w`` (resamples, examples) at once: per bin,
    its weight share times the gap between its mean label and mean score."""
    y, score = np.asarray(y, np.float64), np.asarray(score, np.float64)
    which = _bins(score, bins)
    total = w.sum(axis=1)
    ece = np.zeros(len(w))
    for b in range(bins):
        m = which == b
        if m.any():
            wb = w[:, m]
            mass = wb.sum(axis=1)
            gap = np.abs(_ratios(wb @ y[m], mass) - _ratios(wb @ score[m], mass))
            ece += np.where(mass > 0, _ratios(mass, total) * np.nan_to_num(gap), 0.0)
    return np.where(total > 0, ece, np.nan)


def weighted_level_metrics(labels, probs, pred, positive: int, w: np.ndarray) -> dict:
    """:func:`level_metrics` of each row of example weights ``w`` (resamples, examples), as
    flat key -> (resamples,) array with the keys of its flattened dict: the bootstrap's
    replicates, all at once (the tests hold them to level_metrics on repeated examples)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    pred = np.asarray(pred)
    out = _weighted_binary(labels == positive, probs[:, positive], pred == positive, w)
    out["ece"] = _weighted_ece(labels == positive, probs[:, positive], w)
    if probs.shape[1] > 2:
        per = [_weighted_binary(labels == c, probs[:, c], pred == c, w)
               for c in range(probs.shape[1])]
        for c, m in enumerate(per):
            out.update({f"per_class/{c}/{k}": v for k, v in m.items()})
        out.update({f"macro/{k}": np.mean([m[k] for m in per], axis=0) for k in METRICS})
        out["macro/accuracy"] = _ratios(w @ (pred == labels), w.sum(axis=1))
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
    """[[count of label i decided j]] (scikit-learn's confusion_matrix)."""
    from sklearn.metrics import confusion_matrix

    if not len(labels):
        return np.zeros((num_classes, num_classes), np.int64).tolist()
    return confusion_matrix(np.asarray(labels, int), np.asarray(pred, int),
                            labels=list(range(num_classes))).tolist()


def roc_points(y, score) -> dict:
    """ROC curve: fpr, tpr and thresholds (positive when score >= threshold; the first,
    inf, decides nothing positive): scikit-learn's roc_curve at every distinct score. A
    rate with no example of its class is 0."""
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    if not len(y):
        return {"fpr": [0.0], "tpr": [0.0], "thresholds": [float("inf")]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, ts = roc_curve(y, score, drop_intermediate=False)
    return {"fpr": np.nan_to_num(fpr).tolist(), "tpr": np.nan_to_num(tpr).tolist(),
            "thresholds": [float("inf")] + ts[1:].tolist()}


def _bootstrap_levels(pats, labels, probs, slice_pred, patient_pred, pos: int, n: int,
                      seed: int) -> dict:
    """:func:`bootstrap` of both levels' metrics (what ``both`` in
    :func:`evaluate_predictions` gives), the same resamples computed as weights: a slice
    counts as often as its patient is drawn."""
    sl = np.concatenate(pats.slices) if len(pats.slices) else np.zeros(0, int)
    owner = np.repeat(np.arange(len(pats.slices)), [len(x) for x in pats.slices])
    reps: dict = {}
    for w in bootstrap_counts(pats.labels, n, seed):
        for level, m in (("slice", weighted_level_metrics(labels[sl], probs[sl],
                                                          slice_pred[sl], pos, w[:, owner])),
                         ("patient", weighted_level_metrics(pats.labels, pats.probs,
                                                            patient_pred, pos, w))):
            for k, v in m.items():
                reps.setdefault(f"{level}/{k}", []).extend(v.tolist())
    return _percentile_cis(reps, n)


def evaluate_predictions(preds, decision: dict, n_bootstrap: int =
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
    cis = _bootstrap_levels(pats, labels, preds.probs, slice_pred, patient_pred, pos,
                            n_bootstrap, seed) if n_bootstrap else {}
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


def per_site(pats, patient_pred: np.ndarray, classes, pos: int):
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


def public_result(result: dict) -> dict:
    """metrics.json's content: the result without its private (``_``) entries."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def aggregate_by_patient(probs: np.ndarray, labels: np.ndarray, patient_keys
                         ) -> tuple[np.ndarray, np.ndarray, list]:
    """Mean probabilities per patient (in first-seen order), the patient's label, the keys.
    Raises if a patient's slices disagree on the label."""
    probs = np.asarray(probs, np.float64)
    pats = aggregate(probs, np.asarray(labels), patient_keys, "mean", positive=1)
    return pats.probs, pats.labels, pats.keys


def _binary(probs: np.ndarray, labels: np.ndarray, pos: int) -> dict:
    """The per-epoch logs' metrics: positive vs rest by the argmax (:func:`binary_metrics`),
    the accuracy over all classes, the macro one-vs-rest AUC with more than two."""
    argmax = probs.argmax(axis=1)
    m = binary_metrics(labels == pos, probs[:, pos], argmax == pos)
    out = {"auc": m["auc"], "sensitivity": m["sensitivity"],
           "specificity": m["specificity"], "precision": m["ppv"],
           "accuracy": float(_ratios(float(np.sum(argmax == labels)), len(labels)))}
    if probs.shape[1] > 2:
        from sklearn.metrics import roc_auc_score

        present = np.unique(labels)
        if len(present) == probs.shape[1]:
            out["macro_auc"] = float(roc_auc_score(labels, probs, multi_class="ovr",
                                                   average="macro"))
    return out


def classification_metrics(probs: np.ndarray, labels: np.ndarray, patient_keys,
                           classes: list[str]) -> dict:
    """{"slice_auc", "slice_sensitivity", ..., "patient_auc", ..., "slices", "patients"}."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    pos = positive_index(classes)
    out = {f"slice_{k}": v for k, v in _binary(probs, labels, pos).items()}
    p_probs, p_labels, keys = aggregate_by_patient(probs, labels, patient_keys)
    out.update({f"patient_{k}": v for k, v in _binary(p_probs, p_labels, pos).items()})
    out["slices"] = int(len(labels))
    out["patients"] = int(len(keys))
    return out
