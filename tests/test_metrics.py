import numpy as np
import pytest

from covid_keras.evaluation.metrics import aggregate_by_patient, classification_metrics


def test_patient_mean_and_binary_metrics_by_hand():
    classes = ["non_covid", "covid"]
    # patient a (covid): slices 0.9, 0.3 -> mean 0.6 -> covid; b (non): 0.2, 0.4 -> 0.3;
    # c (covid): 0.4 -> non (false negative at the patient level)
    p_covid = np.array([0.9, 0.3, 0.2, 0.4, 0.4])
    probs = np.stack([1 - p_covid, p_covid], axis=1)
    labels = np.array([1, 1, 0, 0, 1])
    keys = ["a", "a", "b", "b", "c"]
    m = classification_metrics(probs, labels, keys, classes)
    assert m["patients"] == 3 and m["slices"] == 5
    assert m["patient_sensitivity"] == pytest.approx(0.5)
    assert m["patient_specificity"] == pytest.approx(1.0)
    assert m["patient_auc"] == pytest.approx(1.0)  # 0.6, 0.4 above 0.3
    assert m["slice_sensitivity"] == pytest.approx(1 / 3)
    assert m["slice_specificity"] == pytest.approx(1.0)
    # pairs (pos, neg): 0.9 beats both, 0.3 beats 0.2, 0.4 beats 0.2 and ties 0.4 (half)
    assert m["slice_auc"] == pytest.approx(4.5 / 6)


def test_three_classes_positive_is_covid():
    classes = ["normal", "covid", "bacterial"]
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    labels = np.array([0, 1, 2, 1])
    m = classification_metrics(probs, labels, ["a", "b", "c", "d"], classes)
    assert m["patient_sensitivity"] == 1.0 and m["patient_specificity"] == 1.0
    assert m["patient_macro_auc"] == pytest.approx(1.0)


def test_patient_with_two_labels_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        aggregate_by_patient(np.ones((2, 2)) / 2, np.array([0, 1]), ["a", "a"])


def test_training_metrics_share_evaluations_definitions():
    from sklearn.metrics import roc_auc_score

    from covid_keras.evaluation import decision

    rng = np.random.default_rng(0)
    p = np.round(rng.uniform(size=40), 1)
    probs = np.stack([1 - p, p], 1)
    labels = rng.integers(0, 2, 40)
    keys = [f"k{i // 2}" for i in range(40)]
    labels = np.repeat(labels[::2], 2)  # one label per patient
    m = classification_metrics(probs, labels, keys, ["non_covid", "covid"])
    assert m["slice_auc"] == pytest.approx(roc_auc_score(labels, p))
    pats = decision.aggregate(probs, labels, keys, "mean", 1)
    assert m["patient_auc"] == pytest.approx(roc_auc_score(pats.labels, pats.score))
    p_probs, p_labels, p_keys = aggregate_by_patient(probs, labels, keys)
    np.testing.assert_allclose(p_probs, pats.probs)
    assert p_keys == pats.keys and p_labels.tolist() == pats.labels.tolist()
