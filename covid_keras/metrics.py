"""Slice- and patient-level metrics (NumPy / scikit-learn; no TensorFlow).

A patient's probabilities are the mean of their slices' probabilities (the paper's
aggregation). The positive class for AUC, sensitivity and specificity is "covid" when the
classes have it (else class 1): COVID vs the rest. Sensitivity / specificity use the
predicted class (argmax); the AUC, every threshold. With more than two classes the
macro one-vs-rest AUC and the accuracy are reported too.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from sklearn.metrics import roc_auc_score


def positive_index(classes: list[str]) -> int:
    return classes.index("covid") if "covid" in classes else 1


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def aggregate_by_patient(probs: np.ndarray, labels: np.ndarray, patient_keys
                         ) -> tuple[np.ndarray, np.ndarray, list]:
    """Mean probabilities per patient (in first-seen order), the patient's label, the keys.
    Raises if a patient's slices disagree on the label."""
    groups: OrderedDict = OrderedDict()
    for i, key in enumerate(patient_keys):
        groups.setdefault(key, []).append(i)
    p_out, y_out = [], []
    for key, idx in groups.items():
        ys = set(int(v) for v in labels[idx])
        if len(ys) != 1:
            raise ValueError(f"Patient {key!r} has slices with labels {sorted(ys)}")
        p_out.append(probs[idx].mean(axis=0))
        y_out.append(ys.pop())
    return np.asarray(p_out), np.asarray(y_out), list(groups)


def _binary(probs: np.ndarray, labels: np.ndarray, pos: int) -> dict:
    y = (labels == pos).astype(int)
    pred = (probs.argmax(axis=1) == pos).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    out = {
        "auc": float(roc_auc_score(y, probs[:, pos])) if 0 < y.sum() < len(y) else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "accuracy": float((probs.argmax(axis=1) == labels).mean()) if len(labels) else float(
            "nan"),
    }
    if probs.shape[1] > 2:
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
