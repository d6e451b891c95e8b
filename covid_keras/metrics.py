"""The training logs' slice- and patient-level metrics (NumPy / scikit-learn; no
TensorFlow), on :mod:`covid_keras.evaluation`'s definitions.

A patient's probabilities are the mean of their slices' probabilities (the paper's
aggregation, :func:`covid_keras.evaluation.aggregate` with ``rule="mean"``). The positive
class for AUC, sensitivity and specificity is "covid" when the classes have it (else class
1): COVID vs the rest. Sensitivity / specificity here use the predicted class (argmax): the
per-epoch logs. Reports use the decision chosen on validation (rule and threshold,
``decision.json``) through :func:`covid_keras.evaluation.evaluate_predictions`. With more
than two classes the macro one-vs-rest AUC and the accuracy are reported too.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from covid_keras.evaluation import aggregate, auc_score, positive_index, softmax

__all__ = ["positive_index", "softmax", "aggregate_by_patient", "classification_metrics"]


def aggregate_by_patient(probs: np.ndarray, labels: np.ndarray, patient_keys
                         ) -> tuple[np.ndarray, np.ndarray, list]:
    """Mean probabilities per patient (in first-seen order), the patient's label, the keys.
    Raises if a patient's slices disagree on the label."""
    probs = np.asarray(probs, np.float64)
    pats = aggregate(probs, np.asarray(labels), patient_keys, "mean", positive=1)
    return pats.probs, pats.labels, pats.keys


def _binary(probs: np.ndarray, labels: np.ndarray, pos: int) -> dict:
    y = (labels == pos).astype(int)
    pred = (probs.argmax(axis=1) == pos).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    out = {
        "auc": auc_score(y, probs[:, pos]),
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
