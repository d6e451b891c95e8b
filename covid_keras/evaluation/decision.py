"""The patient decision: positive and normal class, aggregation of slices into patients,
the rule and its threshold (chosen on validation), and decision.json.

    decision = Decision.read("runs/x/decision.json")   # or read_decision("runs/x")
    decide_patient(slice_probs, decision.to_dict())    # one unlabelled patient

The definitions (the positive class, the normal class, the ``mean`` and ``any`` rules,
slice and patient decisions, how the threshold is chosen) are written out in
:mod:`covid_keras.evaluation.evaluation`'s docstring and in every metrics.json (``definitions``,
:data:`covid_keras.evaluation.metrics.DEFINITIONS`). :func:`patient_decisions` (evaluation),
:func:`decide_patient` (one unlabelled patient: predict, serving) and the export's
``predict_study`` (:mod:`covid_keras.serving.serving_signatures`) apply the same rule.

NumPy and scikit-learn only (no TensorFlow).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from covid_keras.core import files, schema
from covid_keras.io.run_dir import DECISION as DECISION_FILE

RULES = ("mean", "any")
CRITERIA = ("youden", "sensitivity")


def positive_index(classes) -> int:
    """The positive class: "covid" when the classes have it, else class 1."""
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
    from sklearn.metrics import roc_auc_score

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
                          "specificity": spec, "auc": float(roc_auc_score(y, pats.score))}
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


def write_decision(run_dir: str, preds, split: str | None = None,
                   checkpoint: str = "best.keras", criterion: str = "youden",
                   target_sensitivity: float = 0.9, path: str | None = None) -> dict:
    """Chooses the decision on ``preds``
    (:class:`covid_keras.evaluation.evaluation.Predictions` of the validation split by the
    run's checkpoint) and writes it atomically to
    ``<run_dir>/decision.json`` (or ``path``). Call it at the end of training with the val
    split's predictions of best.keras. Returns decision.json's content."""
    d = choose_decision(preds.probs, preds.labels, preds.patient_keys, preds.classes,
                        criterion, target_sensitivity)
    data_dir = preds.data_dir
    if data_dir and not files.is_remote(data_dir):
        data_dir = os.path.abspath(data_dir)
    d.update({"split": split or preds.split, "data_dir": data_dir or None,
              "dataset_manifest_sha256": manifest_sha(preds.data_dir),
              "checkpoint": checkpoint, "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    Decision.from_dict(d).write(path or os.path.join(run_dir, DECISION_FILE))
    return d


def read_decision(run_dir: str) -> dict | None:
    """``<run_dir>/decision.json`` checked, ``normal_class`` filled (files written before
    it existed get it inferred); None when the run has none."""
    d = Decision.read(os.path.join(run_dir, DECISION_FILE))
    return None if d is None else d.to_dict()


def manifest_sha(data_dir: str | None) -> str | None:
    """SHA-256 of a dataset's manifest.json (None without one)."""
    if not data_dir:
        return None
    path = os.path.join(data_dir, schema.MANIFEST)
    if not files.exists(path):
        return None
    return files.sha256(path)


@dataclass
class Decision:
    """decision.json: the rule, its threshold, the classes it was chosen for and where.
    ``extra`` keeps every other key of the file (criterion_value, val_*, per_rule,
    data_dir, dataset_manifest_sha256, checkpoint, chosen_at...), so a file read and
    written again keeps them."""

    rule: str
    threshold: float
    positive_class: str
    split: str | None = None
    classes: list | None = None
    normal_class: str | None = None
    criterion: str | None = None
    extra: dict = field(default_factory=dict)

    REQUIRED = ("rule", "threshold", "positive_class", "split")

    @classmethod
    def from_dict(cls, d: dict, where: str = "decision") -> "Decision":
        """A decision.json's content, checked; ``where`` names it in errors."""
        for key in cls.REQUIRED:
            if key not in d:
                raise ValueError(f"{where} has no {key!r}: not a covid_keras decision file")
        if d["rule"] not in RULES:
            raise ValueError(f"{where}: rule must be one of {RULES}. Received: {d['rule']!r}")
        try:
            # Files written before normal_class existed: inferred from their classes.
            normal = normal_class_of(d)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        named = ("rule", "threshold", "positive_class", "split", "classes", "normal_class",
                 "criterion")
        return cls(d["rule"], d["threshold"], d["positive_class"], d["split"],
                   None if d.get("classes") is None else list(d["classes"]), normal,
                   d.get("criterion"), {k: v for k, v in d.items() if k not in named})

    def to_dict(self) -> dict:
        """decision.json's content (``classes`` and ``criterion`` only when known)."""
        out = {"rule": self.rule, "threshold": self.threshold,
               "positive_class": self.positive_class}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        out["normal_class"] = self.normal_class
        if self.criterion is not None:
            out["criterion"] = self.criterion
        out.update(self.extra)
        out["split"] = self.split
        return out

    def text(self) -> str:
        """The rule in words (:func:`rule_text`)."""
        return rule_text(self.rule, self.positive_class, self.threshold, self.normal_class)

    @classmethod
    def read(cls, path: str) -> "Decision | None":
        """The decision.json at ``path``, or None when there is none."""
        if not files.exists(path):
            return None
        import json

        try:
            d = json.loads(files.read_text(path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
        return cls.from_dict(d, path)

    def write(self, path: str) -> None:
        """Atomically to ``path`` (its folder made when missing), strict JSON."""
        if os.path.dirname(path):
            files.makedirs(os.path.dirname(path))
        files.atomic_write_text(path, files.dumps(self.to_dict()))
