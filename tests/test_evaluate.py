"""Evaluation: metrics against scikit-learn, patient rules, decisions chosen on val only,
the seeded bootstrap, strict metrics.json, Grad-CAM on a planted lesion, the CLI on a run
folder, and the HTML report in headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from covid_keras.evaluation import evaluation as ev
from covid_keras.model import saving
from tests.helpers import write_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["non_covid", "covid"]


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def make_preds(rng, patients=12, slices=3, classes=CLASSES, signal=1.0, sites=None):
    """Random slice probabilities, the positive class's a little higher for its patients."""
    pos = ev.positive_index(classes)
    labels, keys, probs, site = [], [], [], []
    for p in range(patients):
        y = p % len(classes)
        for _ in range(slices):
            logits = rng.normal(size=len(classes))
            logits[y] += signal
            probs.append(np.exp(logits) / np.exp(logits).sum())
            labels.append(y)
            keys.append(f"p{p:03d}")
            site.append(sites[p] if sites else "default")
    n = len(labels)
    assert pos < len(classes)
    return ev.Predictions(list(classes), np.asarray(labels), np.asarray(probs), keys,
                          [f"s{k}" for k in keys], np.zeros(n, int), site, {}, "test", "")


# ------------------------------------------------------------------ metrics
def test_binary_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        score = np.round(rng.uniform(size=60), 1)  # ties
        pred = (score >= 0.5).astype(int)
        m = ev.binary_metrics(y, score, pred)
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, score))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
        assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
        assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
        assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred))


def test_three_class_per_class_and_macro_equal_scikit_learn():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], 90)
    labels = rng.integers(0, 3, 90)
    pred = probs.argmax(1)
    m = ev.level_metrics(labels, probs, pred, positive=1)
    assert m["macro"]["auc"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert m["macro"]["sensitivity"] == pytest.approx(
        skm.recall_score(labels, pred, average="macro"))
    assert m["macro"]["ppv"] == pytest.approx(skm.precision_score(labels, pred, average="macro"))
    assert m["macro"]["f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert m["macro"]["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    for c in range(3):
        assert m["per_class"][c]["auc"] == pytest.approx(
            skm.roc_auc_score(labels == c, probs[:, c]))
        assert m["per_class"][c]["specificity"] == pytest.approx(
            skm.recall_score(labels == c, pred == c, pos_label=False))
    assert m["sensitivity"] == m["per_class"][1]["sensitivity"]  # top level: covid vs rest


def test_f1_is_two_pr_over_p_plus_r_not_the_papers_mean():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    pred = np.array([1, 0, 0, 0, 1, 0, 0, 0])  # P = 1/2, R = 1/4
    m = ev.binary_metrics(y, pred.astype(float), pred)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert m["f1"] != pytest.approx((0.5 + 0.25) / 2)
    none_found = ev.binary_metrics(y, np.zeros(8), np.zeros(8, int))
    assert none_found["f1"] == 0.0 == skm.f1_score(y, np.zeros(8, int), zero_division=0)
    assert none_found["ppv"] != none_found["ppv"]  # NaN: no positive decisions


def test_ece_and_reliability_by_hand():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.05, 0.15, 0.95, 0.55])
    # bins: [0,.1): |0-.05|; [.1,.2): |0-.15|; [.5,.6): |1-.55|; [.9,1]: |1-.95|
    assert ev.ece_score(y, s) == pytest.approx((0.05 + 0.15 + 0.45 + 0.05) / 4)
    bins = ev.reliability(y, s)
    assert bins[5][2] == 1 and bins[5][4] == 1.0 and bins[3][2] == 0 and bins[3][3] is None


# ------------------------------------------------------------------ patient rules
def test_mean_and_any_rules_on_hand_made_patients():
    p_covid = np.array([0.2, 0.9, 0.3,   # a: mean 0.467, max 0.9
                        0.1, 0.2,        # b: mean 0.15, max 0.2
                        0.6, 0.7])       # c: mean 0.65, max 0.7
    probs = np.stack([1 - p_covid, p_covid], 1)
    labels = np.array([1, 1, 1, 0, 0, 1, 1])
    keys = ["a", "a", "a", "b", "b", "c", "c"]
    mean = ev.aggregate(probs, labels, keys, "mean", 1)
    anyr = ev.aggregate(probs, labels, keys, "any", 1)
    assert mean.keys == anyr.keys == ["a", "b", "c"]
    np.testing.assert_allclose(mean.score, [1.4 / 3, 0.15, 0.65])
    np.testing.assert_allclose(anyr.score, [0.9, 0.2, 0.7])
    np.testing.assert_allclose(anyr.probs[0], [0.1, 0.9])  # the most positive slice's
    # At 0.5: the mean misses patient a, "any" calls it positive (one abnormal slice).
    assert ev.decide(mean.probs, 0.5, 1).tolist() == [0, 0, 1]
    assert ev.decide(anyr.probs, 0.5, 1).tolist() == [1, 0, 1]
    # Negative only if every slice is below the threshold.
    assert ev.decide(anyr.probs, 0.95, 1).tolist() == [0, 0, 0]


def test_three_class_decision_falls_back_to_the_most_probable_other_class():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.35, 0.55], [0.2, 0.5, 0.3]])
    # covid (1) above 0.32 wins; else the larger of the other two.
    assert ev.decide(probs, 0.32, 1).tolist() == [0, 1, 1]
    assert ev.decide(probs, 0.6, 1).tolist() == [0, 2, 2]


CLASSES3 = ["normal", "covid", "bacterial"]


def _patient_preds(classes, patients: dict) -> "ev.Predictions":
    """Predictions of hand-made patients: key -> (label, [slice probabilities])."""
    labels, keys, probs = [], [], []
    for key, (label, rows) in patients.items():
        for row in rows:
            labels.append(classes.index(label))
            keys.append(key)
            probs.append(row)
    n = len(labels)
    return ev.Predictions(list(classes), np.asarray(labels), np.asarray(probs, np.float64),
                          keys, [f"s{k}" for k in keys], np.zeros(n, int), ["a"] * n, {},
                          "test", "")


# Seed 004: one abnormal slice is enough (covid, and the other diseases too); normal only
# when every slice is normal. Threshold 0.5 on covid.
SEED004 = {
    # one bacterial slice among normal ones; the highest covid score (0.3) is on a normal
    # slice, whose most probable other class is normal: the old rule said normal.
    "one_bacterial": ("bacterial", [[0.6, 0.3, 0.1], [0.3, 0.05, 0.65], [0.9, 0.05, 0.05]]),
    "all_normal": ("normal", [[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05]]),
    # one covid slice above the threshold among bacterial and normal ones: covid
    "one_covid": ("covid", [[0.1, 0.2, 0.7], [0.2, 0.7, 0.1], [0.8, 0.1, 0.1]]),
    # below the threshold everywhere, bacterial everywhere
    "bacterial": ("bacterial", [[0.3, 0.2, 0.5], [0.2, 0.3, 0.5]]),
}
SEED004_OLD = {"one_bacterial": "normal", "all_normal": "normal", "one_covid": "covid",
               "bacterial": "bacterial"}


def test_any_rule_is_normal_only_when_every_slice_is_normal():
    preds = _patient_preds(CLASSES3, SEED004)
    d = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "classes": CLASSES3,
         "criterion": "youden_j", "split": "val"}
    assert ev.normal_class_of(d) == "normal"  # inferred: no normal_class field
    r = ev.evaluate_predictions(preds, d, n_bootstrap=0)
    got = {k: CLASSES3[int(c)] for k, c in zip(r["_patients"].keys, r["_patient_pred"])}
    assert got == {k: v[0] for k, v in SEED004.items()}
    assert r["decision"]["normal_class"] == "normal"
    # the patient level sees those decisions: every patient right, the confusion diagonal
    assert r["patient"]["macro"]["accuracy"]["value"] == 1.0
    assert r["confusion"]["patient"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]
    # the score, its AUC and the positive decision are as before (covid vs the threshold)
    np.testing.assert_allclose(r["_patients"].score, [0.3, 0.2, 0.7, 0.3])
    for key, (_, rows) in SEED004.items():
        out = ev.decide_patient(np.asarray(rows), d)
        assert out["decision"] == got[key] and out["normal_class"] == "normal"
        assert out["score"] == pytest.approx(max(r[1] for r in rows))
    # normal_class null: the old rule (the highest-scoring slice's most probable other)
    old = dict(d, normal_class=None)
    r_old = ev.evaluate_predictions(preds, old, n_bootstrap=0)
    assert {k: CLASSES3[int(c)] for k, c in zip(r_old["_patients"].keys,
                                                 r_old["_patient_pred"])} == SEED004_OLD
    for key, (_, rows) in SEED004.items():
        assert ev.decide_patient(np.asarray(rows), old)["decision"] == SEED004_OLD[key]
    # the mean rule is unchanged by the normal class
    mean = dict(d, rule="mean")
    pats = ev.aggregate(preds.probs, preds.labels, preds.patient_keys, "mean", 1)
    np.testing.assert_array_equal(
        ev.evaluate_predictions(preds, mean, n_bootstrap=0)["_patient_pred"],
        ev.decide(pats.probs, 0.5, 1))


def test_any_rule_with_several_abnormal_classes_takes_the_strongest_slice():
    classes = ["normal", "covid", "bacterial", "viral"]
    d = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "classes": classes,
         "normal_class": "normal"}
    rows = [[0.5, 0.1, 0.1, 0.3],     # normal
            [0.2, 0.1, 0.55, 0.15],   # bacterial 0.55
            [0.15, 0.15, 0.1, 0.6],   # viral 0.6: the strongest abnormal slice
            [0.3, 0.2, 0.45, 0.05]]   # bacterial 0.45
    assert ev.decide_patient(np.asarray(rows), d)["decision"] == "viral"
    rows[1] = [0.1, 0.1, 0.7, 0.1]
    assert ev.decide_patient(np.asarray(rows), d)["decision"] == "bacterial"
    rows[3] = [0.1, 0.5, 0.3, 0.1]  # covid reaches the threshold on one slice: covid
    assert ev.decide_patient(np.asarray(rows), d)["decision"] == "covid"
    # three classes without a normal one: the old rule
    no_normal = ["covid", "bacterial", "viral"]
    assert ev.infer_normal_class(no_normal, "covid") is None
    d2 = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "classes": no_normal}
    probs = np.array([[0.4, 0.5, 0.1], [0.1, 0.2, 0.7]])
    assert ev.decide_patient(probs, d2)["decision"] == "bacterial"  # slice 0's other class


def test_binary_any_rule_is_unchanged():
    rng = np.random.default_rng(21)
    for classes in (CLASSES, ["normal", "covid"], ["bacterial", "covid"]):
        preds = make_preds(rng, patients=30, slices=4, classes=classes)
        for rule in ev.RULES:
            d = {"rule": rule, "threshold": 0.45, "positive_class": "covid",
                 "classes": classes}
            assert ev.normal_class_of(d) is None
            r = ev.evaluate_predictions(preds, d, n_bootstrap=0)
            pats = ev.aggregate(preds.probs, preds.labels, preds.patient_keys, rule, 1)
            want = ev.decide(pats.probs, 0.45, 1)
            np.testing.assert_array_equal(r["_patient_pred"], want)
            # even with a normal class named: two classes leave no other choice
            np.testing.assert_array_equal(ev.patient_decisions(
                preds.probs, pats, 0.45, 1, rule, normal=0), want)


def test_normal_class_is_inferred_written_and_read(tmp_path):
    assert ev.infer_normal_class(["normal", "covid", "bacterial"]) == "normal"
    assert ev.infer_normal_class(["Healthy", "covid", "bacterial"]) == "Healthy"
    assert ev.infer_normal_class(["non-covid", "covid", "tuberculosis"]) == "non-covid"
    assert ev.infer_normal_class(["normal", "covid", "viral", "bacterial",
                                  "tuberculosis"]) == "normal"
    assert ev.infer_normal_class(["non_covid", "covid"]) is None  # binary
    assert ev.infer_normal_class(["normal", "healthy", "covid"]) is None  # ambiguous
    # write_decision stores it; a binary decision stores null
    rng = np.random.default_rng(8)
    val = make_preds(rng, patients=12, classes=CLASSES3)
    d = ev.write_decision(str(tmp_path), val, split="val")
    assert d["normal_class"] == "normal"
    stored = strict_loads((tmp_path / "decision.json").read_text())
    assert stored["normal_class"] == "normal"
    assert ev.read_decision(str(tmp_path))["normal_class"] == "normal"
    d2 = ev.write_decision(str(tmp_path / "b"), make_preds(rng, patients=10), split="val")
    assert d2["normal_class"] is None
    assert strict_loads((tmp_path / "b" / "decision.json").read_text())["normal_class"] is None
    # an old decision.json (no normal_class) loads, the normal class inferred
    old = {k: v for k, v in stored.items() if k != "normal_class"}
    (tmp_path / "decision.json").write_text(json.dumps(old))
    back = ev.read_decision(str(tmp_path))
    assert back["normal_class"] == "normal" and back["threshold"] == d["threshold"]
    minimal = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    (tmp_path / "decision.json").write_text(json.dumps(minimal))
    assert ev.read_decision(str(tmp_path))["normal_class"] is None  # no classes known
    # explicit null is kept; a wrong name is refused
    (tmp_path / "decision.json").write_text(json.dumps(dict(old, normal_class=None)))
    assert ev.read_decision(str(tmp_path))["normal_class"] is None
    for bad in ("viral", "covid"):
        (tmp_path / "decision.json").write_text(json.dumps(dict(old, normal_class=bad)))
        with pytest.raises(ValueError, match="normal_class"):
            ev.read_decision(str(tmp_path))
    # old decisions evaluate with the seed-004 rule
    preds = _patient_preds(CLASSES3, SEED004)
    r = ev.evaluate_predictions(preds, dict(old, rule="any", threshold=0.5), n_bootstrap=0)
    assert [CLASSES3[int(c)] for c in r["_patient_pred"]] == [v[0] for v in SEED004.values()]


def test_patients_csv_decision_follows_the_any_rule(tmp_path):
    preds = _patient_preds(CLASSES3, SEED004)
    d = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "classes": CLASSES3,
         "normal_class": "normal"}
    r = ev.evaluate_predictions(preds, d, n_bootstrap=0)
    path = tmp_path / "patients.csv"
    ev.write_patients_csv(str(path), r["_patients"], r["_patient_pred"], CLASSES3)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert {row["patient_key"]: row["decision"] for row in rows} == {
        k: v[0] for k, v in SEED004.items()}


def test_patient_with_two_labels_is_an_error():
    with pytest.raises(ValueError, match="labels"):
        ev.aggregate(np.full((2, 2), 0.5), np.array([0, 1]), ["a", "a"], "mean", 1)


# ------------------------------------------------------------------ decisions
def test_choose_decision_youden_by_hand():
    # One slice per patient: positives 0.3, 0.4, 0.8; negatives 0.1, 0.2, 0.35.
    s = np.array([0.3, 0.4, 0.8, 0.1, 0.2, 0.35])
    labels = np.array([1, 1, 1, 0, 0, 0])
    d = ev.choose_decision(np.stack([1 - s, s], 1), labels, list("abcdef"), CLASSES)
    # t = 0.25 (midpoint 0.2 / 0.3): sens 1, spec 2/3 -> J 0.667; t = 0.375: sens 2/3,
    # spec 1 -> J 0.667 too; the tie goes to the threshold nearest 0.5.
    assert d["threshold"] == pytest.approx(0.375)
    assert d["criterion_value"] == pytest.approx(2 / 3)
    assert d["rule"] == "mean" and d["positive_class"] == "covid"
    d90 = ev.choose_decision(np.stack([1 - s, s], 1), labels, list("abcdef"), CLASSES,
                             criterion="sensitivity", target_sensitivity=0.9)
    assert d90["threshold"] == pytest.approx(0.25) and d90["val_sensitivity"] == 1.0


def test_choose_decision_prefers_any_when_it_separates_val():
    # Positives have one high slice among low ones: only "any" separates them.
    p = np.array([0.9, 0.1, 0.1, 0.8, 0.1, 0.1, 0.4, 0.4, 0.4, 0.45, 0.4, 0.4])
    labels = np.array([1] * 6 + [0] * 6)
    keys = [k for k in "abcd" for _ in range(3)]
    d = ev.choose_decision(np.stack([1 - p, p], 1), labels, keys, CLASSES)
    assert d["rule"] == "any" and d["criterion_value"] == pytest.approx(1.0)
    assert d["per_rule"]["mean"]["criterion_value"] < 1.0


def test_threshold_comes_from_val_never_from_the_evaluated_split():
    rng = np.random.default_rng(3)
    val = make_preds(rng, patients=20, signal=2.0)
    test = make_preds(rng, patients=20, signal=2.0)
    test.probs = np.stack([1 - test.probs[:, 1] ** 3, test.probs[:, 1] ** 3], 1)  # shifted
    d = ev.choose_decision(val.probs, val.labels, val.patient_keys, CLASSES)
    d["split"] = "val"
    r = ev.evaluate_predictions(test, d, n_bootstrap=0)
    assert r["decision"]["threshold"] == d["threshold"]
    assert r["decision"]["chosen_on_split"] == "val"
    pats = ev.aggregate(test.probs, test.labels, test.patient_keys, d["rule"], 1)
    expected = ev.binary_metrics(pats.labels == 1, pats.score, pats.score >= d["threshold"])
    assert r["patient"]["sensitivity"]["value"] == pytest.approx(expected["sensitivity"])
    on_test = ev.choose_decision(test.probs, test.labels, test.patient_keys, CLASSES)
    assert on_test["threshold"] != pytest.approx(d["threshold"])  # test would choose another


def test_write_and_read_decision(tmp_path):
    rng = np.random.default_rng(4)
    val = make_preds(rng, patients=10)
    d = ev.write_decision(str(tmp_path), val, split="val", checkpoint="best.keras")
    back = ev.read_decision(str(tmp_path))
    assert back["rule"] == d["rule"] and back["threshold"] == d["threshold"]
    assert back["split"] == "val" and back["checkpoint"] == "best.keras"
    strict_loads((tmp_path / "decision.json").read_text())
    (tmp_path / "decision.json").write_text('{"rule": "median", "threshold": 0.5, '
                                            '"positive_class": "covid", "split": "val"}')
    with pytest.raises(ValueError, match="rule"):
        ev.read_decision(str(tmp_path))


def test_a_run_without_decision_is_not_decided_on_the_evaluated_split(tmp_path):
    (tmp_path / "run_info.json").write_text(json.dumps(
        {"flags": {"data_dir": str(tmp_path / "data"), "val_split": "val"}}))
    (tmp_path / "best.keras").write_bytes(b"")  # refused before any model is read
    with pytest.raises(ValueError, match="never chosen on the split"):
        ev.evaluate_run(str(tmp_path), split="val", output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_wrong_run_folder_or_split_is_named_and_nothing_is_written(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="is not a run folder: no such folder"):
        ev.evaluate_run(str(tmp_path / "nope"), data_dir=str(dataset))
    assert not (tmp_path / "nope").exists()
    (tmp_path / "parent").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a training run: it has no best"):
        ev.evaluate_run(str(tmp_path / "parent"), data_dir=str(dataset))
    assert not any((tmp_path / "parent").iterdir())
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.keras").write_bytes(b"")  # not read: the split is checked first
    with pytest.raises(FileNotFoundError, match=r"has no split 'tset' \(its splits: "
                                                r"test, train, val\)"):
        ev.evaluate_run(str(run), data_dir=str(dataset), split="tset")
    assert sorted(p.name for p in run.iterdir()) == ["best.keras"]


# ------------------------------------------------------------------ bootstrap, JSON
def test_bootstrap_is_seeded_and_reproducible():
    rng = np.random.default_rng(5)
    preds = make_preds(rng, patients=16, signal=0.3)
    d = {"rule": "mean", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    a = ev.evaluate_predictions(preds, d, n_bootstrap=200, seed=7)
    b = ev.evaluate_predictions(preds, d, n_bootstrap=200, seed=7)
    c = ev.evaluate_predictions(preds, d, n_bootstrap=200, seed=8)
    for level in ("slice", "patient"):
        assert a[level]["auc"]["ci95"] == b[level]["auc"]["ci95"]
        lo, hi = a[level]["auc"]["ci95"]
        assert lo <= a[level]["auc"]["value"] <= hi
    assert 0.0 < a["patient"]["auc"]["ci95"][0] < a["patient"]["auc"]["ci95"][1] < 1.0
    assert a["patient"]["auc"]["ci95"] != c["patient"]["auc"]["ci95"]
    assert a["slice"]["f1"]["ci95"] != c["slice"]["f1"]["ci95"]


def test_bootstrap_resamples_patients_not_slices():
    # Two patients of each class, 50 slices each: slice bootstrap would give a narrow
    # interval; resampling patients must give a wide one.
    rng = np.random.default_rng(6)
    preds = make_preds(rng, patients=4, slices=50, signal=0.5)
    calls = []

    def fn(idx):
        calls.append(np.asarray(idx))
        return {"x": float(len(idx))}

    ev.bootstrap(fn, np.array([0, 1, 0, 1]), n=20, seed=0)
    assert all(len(c) == 4 and set(c) <= {0, 1, 2, 3} for c in calls)
    # stratified: each resample keeps two patients of each label
    assert all(sorted(np.array([0, 1, 0, 1])[c].tolist()) == [0, 0, 1, 1] for c in calls)
    del preds


@pytest.mark.parametrize("classes", [CLASSES, CLASSES3])
def test_bootstrap_replicates_are_the_metrics_of_the_resampled_patients(classes):
    """metrics.json's CIs count a patient drawn k times k times (weights, every resample at
    once): each replicate equals level_metrics (scikit-learn) on the resampled slices and
    patients, and the intervals equal those of bootstrap() over ``both`` levels."""
    from covid_keras.evaluation import decision as dec
    from covid_keras.evaluation import metrics

    rng = np.random.default_rng(12)
    preds = make_preds(rng, patients=14, slices=4, classes=classes, signal=0.4)
    preds.probs[:] = np.round(preds.probs, 1)  # ties, within and across classes
    pos = classes.index("covid")
    pats = dec.aggregate(preds.probs, preds.labels, preds.patient_keys, "mean", pos,
                         preds.sites)
    slice_pred = dec.decide(preds.probs, 0.4, pos)
    patient_pred = dec.decide(pats.probs, 0.4, pos)
    sl = np.concatenate(pats.slices)
    owner = np.repeat(np.arange(len(pats.slices)), [len(x) for x in pats.slices])

    def both(idx):
        s = np.concatenate([pats.slices[i] for i in idx])
        return {"slice": metrics.level_metrics(preds.labels[s], preds.probs[s], slice_pred[s],
                                               pos),
                "patient": metrics.level_metrics(pats.labels[idx], pats.probs[idx],
                                                 patient_pred[idx], pos)}

    w = next(metrics.bootstrap_counts(pats.labels, 6, seed=3))
    assert w.shape == (6, len(pats.keys)) and (w.sum(axis=1) == len(pats.keys)).all()
    fast = {"slice": metrics.weighted_level_metrics(preds.labels[sl], preds.probs[sl],
                                                    slice_pred[sl], pos, w[:, owner]),
            "patient": metrics.weighted_level_metrics(pats.labels, pats.probs, patient_pred,
                                                      pos, w)}
    for r in range(len(w)):
        idx = np.repeat(np.arange(len(pats.keys)), w[r].astype(int))
        want = metrics._flatten(both(idx))
        got = {f"{level}/{k}": v[r] for level, m in fast.items() for k, v in m.items()}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-12,
                                   atol=1e-12, err_msg=str(r))
    d = {"rule": "mean", "threshold": 0.4, "positive_class": "covid", "split": "val"}
    cis = metrics._bootstrap_levels(pats, preds.labels, preds.probs, slice_pred, patient_pred,
                                    pos, 40, 5)
    slow = metrics.bootstrap(both, pats.labels, 40, 5)
    assert cis.keys() == slow.keys()
    for k in slow:
        assert cis[k][2] == slow[k][2], k
        if slow[k][0] is not None:
            np.testing.assert_allclose(cis[k][:2], slow[k][:2], rtol=1e-12, atol=1e-12,
                                       err_msg=k)
    r = ev.evaluate_predictions(preds, d, n_bootstrap=40, seed=5)
    assert r["patient"]["auc"]["ci95"] == list(cis["patient/auc"][:2])


def test_metrics_json_is_strict_with_null_and_reason(tmp_path):
    rng = np.random.default_rng(7)
    preds = make_preds(rng, patients=6)
    keep = preds.labels == 1  # one class only: AUC and specificity undefined
    one = ev.Predictions(CLASSES, preds.labels[keep], preds.probs[keep],
                         [k for k, m in zip(preds.patient_keys, keep) if m],
                         [k for k, m in zip(preds.study_keys, keep) if m],
                         preds.slice_index[keep], [s for s, m in zip(preds.sites, keep) if m])
    d = {"rule": "mean", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    r = ev.evaluate_predictions(one, d, n_bootstrap=50)
    text = ev.dumps(ev.public_result(r))
    m = strict_loads(text)
    assert m["patient"]["auc"] == {"value": None, "ci95": None,
                                   "reason": "the labels have one class only"}
    assert m["patient"]["specificity"]["value"] is None
    assert m["patient"]["sensitivity"]["value"] is not None
    for level in ("slice", "patient"):
        for k in ev.METRICS:
            assert set(m[level][k]) >= {"value", "ci95"}


def test_three_classes_have_per_class_and_macro_sections():
    rng = np.random.default_rng(8)
    classes = ["normal", "covid", "bacterial"]
    preds = make_preds(rng, patients=15, classes=classes, signal=1.5)
    d = {"rule": "mean", "threshold": 0.4, "positive_class": "covid", "split": "val"}
    m = strict_loads(ev.dumps(ev.public_result(ev.evaluate_predictions(preds, d, 100))))
    for level in ("slice", "patient"):
        assert set(m[level]["per_class"]) == set(classes)
        assert set(m[level]["macro"]) == set(ev.METRICS)
        assert m[level]["macro"]["auc"]["ci95"] is not None
    assert len(m["confusion"]["patient"]) == 3


def test_per_site_warns_when_a_class_comes_from_one_site():
    rng = np.random.default_rng(9)
    sites = ["A" if p % 2 == 0 else ("A" if p % 4 == 1 else "B") for p in range(12)]
    # even patients (non_covid) all from A; covid patients from A and B
    preds = make_preds(rng, patients=12, sites=sites)
    d = {"rule": "mean", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    r = ev.evaluate_predictions(preds, d, n_bootstrap=0)
    assert set(r["sites"]) == {"A", "B"}
    assert r["sites"]["B"]["patients_by_class"] == {"non_covid": 0, "covid": 3}
    assert any("'non_covid' comes from a single site ('A')" in w for w in r["warnings"])
    assert not any("'covid' comes from a single site" in w for w in r["warnings"])
    assert sum("unreliable" in w for w in r["warnings"]) == 2  # 6 patients per class
    big = ev.evaluate_predictions(make_preds(rng, patients=24), d, n_bootstrap=0)
    assert not any("unreliable" in w for w in big["warnings"])


def test_csv_files_have_the_contract_columns(tmp_path):
    rng = np.random.default_rng(10)
    preds = make_preds(rng, patients=4, slices=2)
    preds.outputs = {"boxes": np.tile([[1.0, 2.0, 30.0, 40.0]], (len(preds), 2, 1)),
                     "box_scores": np.ones((len(preds), 2))}
    d = {"rule": "any", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    r = ev.evaluate_predictions(preds, d, n_bootstrap=0)
    ev.write_slices_csv(str(tmp_path / "slices.csv"), preds)
    ev.write_patients_csv(str(tmp_path / "patients.csv"), r["_patients"], r["_patient_pred"],
                          CLASSES)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "slices.csv").read_text())))
    assert list(rows[0]) == ["patient_key", "study_key", "slice_index", "label",
                             "prob_non_covid", "prob_covid", "boxes"]
    assert json.loads(rows[0]["boxes"])[0] == [1.0, 2.0, 30.0, 40.0, 1.0]
    pats = list(csv.DictReader(io.StringIO((tmp_path / "patients.csv").read_text())))
    assert list(pats[0]) == ["patient_key", "label", "prob_non_covid", "prob_covid",
                             "decision"]
    assert len(pats) == 4
    for row in pats:  # "any": a patient's probabilities are its most positive slice's
        mine = [float(s["prob_covid"]) for s in rows if s["patient_key"] == row["patient_key"]]
        assert float(row["prob_covid"]) == pytest.approx(max(mine), abs=1e-6)
        assert row["decision"] == ("covid" if max(mine) >= 0.5 else "non_covid")


def test_csv_probabilities_read_back_exactly_and_give_metrics_jsons_auc(tmp_path):
    # two saturated patients: 6 decimals wrote both as 1.000000 (a tie: AUC 0.5, not 1.0)
    covid = np.array([0.99999997, 0.99999991])
    probs = np.stack([1.0 - covid, covid], axis=1)
    preds = ev.Predictions(list(CLASSES), np.array([1, 0]), probs, ["a", "b"], ["sa", "sb"],
                           np.zeros(2, int), ["default"] * 2, {}, "test", "")
    r = ev.evaluate_predictions(preds, {"rule": "mean", "threshold": 0.5,
                                        "positive_class": "covid", "split": "val"},
                                n_bootstrap=0)
    ev.write_slices_csv(str(tmp_path / "slices.csv"), preds)
    ev.write_patients_csv(str(tmp_path / "patients.csv"), r["_patients"], r["_patient_pred"],
                          CLASSES)
    for name, want in (("slices.csv", probs[:, 1]), ("patients.csv", r["_patients"].probs[:, 1])):
        rows = list(csv.DictReader(io.StringIO((tmp_path / name).read_text())))
        got = np.array([float(row["prob_covid"]) for row in rows])
        np.testing.assert_array_equal(got, want)  # exact, not approximately
    pats = list(csv.DictReader(io.StringIO((tmp_path / "patients.csv").read_text())))
    auc = skm.roc_auc_score([row["label"] == "covid" for row in pats],
                            [float(row["prob_covid"]) for row in pats])
    assert auc == r["patient"]["auc"]["value"] == 1.0


def test_comparison_table_like_the_papers(tmp_path):
    rng = np.random.default_rng(11)
    d = {"rule": "mean", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    results = {name: ev.public_result(ev.evaluate_predictions(
        make_preds(rng, patients=10, signal=s), d, 100)) for name, s in
        (("drenet", 2.0), ("vgg16", 0.5))}
    out = ev.write_comparison(str(tmp_path), results)
    md = out["markdown"]
    assert "Table 1" in md and "| model | AUC | Recall | Precision | Specificity |" in md
    assert "(P+R)/2" in md
    rows = list(csv.reader(io.StringIO((tmp_path / "comparison.csv").read_text())))
    assert rows[0][:4] == ["model", "AUC", "AUC ci95 lo", "AUC ci95 hi"]
    assert [r[0] for r in rows[1:]] == ["drenet", "vgg16"]
    auc = results["drenet"]["patient"]["auc"]
    assert float(rows[1][1]) == pytest.approx(auc["value"], abs=1e-4)
    assert float(rows[1][2]) == pytest.approx(auc["ci95"][0], abs=1e-4)


def test_compare_accepts_space_separated_runs():
    from covid_keras.evaluate import expand_compare

    argv = ["prog", "--compare", "a", "b", "c", "--split=test", "--compare=d"]
    assert expand_compare(argv) == ["prog", "--compare=a,b,c", "--split=test",
                                    "--compare=d"]


# ------------------------------------------------------------------ Grad-CAM
def lesion_images(rng, n, size=96):
    """Pixel values 0..255 (the model's first layer maps them to [-1, 1]: tiny's
    normalisation), a bright disc in the positives; their masks."""
    x = rng.uniform(0.0, 0.4, (n, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 2, n)
    masks = np.zeros((n, size, size), bool)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(y):
        cy, cx = rng.integers(16, size - 16, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 10 ** 2
        x[i, masks[i], 0] = 0.95
    return np.repeat(x, 3, -1) * 255.0, y, masks


def test_gradcam_weighs_the_planted_lesion_over_the_background():
    import keras

    from covid_keras.evaluation.gradcam import GradCAM
    from covid_keras.model.baselines import build_classifier
    from covid_keras.model.optimizers import build_optimizer

    rng = np.random.default_rng(0)
    x, y, _ = lesion_images(rng, 256)
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny", 2, 96)
    model.compile(keras.optimizers.Adam(3e-3), loss={
        "logits": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    build_optimizer(model)
    model.fit(x, {"logits": y}, epochs=4, batch_size=16, verbose=0)
    xt, yt, mt = lesion_images(rng, 40)
    cams = GradCAM(model)(xt[yt == 1], class_index=1)
    assert cams.dtype == np.float32 and cams.shape == (int((yt == 1).sum()), 96, 96)
    assert 0.0 <= cams.min() and cams.max() <= 1.0
    inside = np.array([c[m].mean() for c, m in zip(cams, mt[yt == 1])])
    outside = np.array([c[~m].mean() for c, m in zip(cams, mt[yt == 1])])
    assert inside.mean() > 1.5 * outside.mean()
    assert (inside > outside).mean() >= 0.9


def test_gradcam_runs_on_drenet_over_the_image_backbone():
    from covid_keras.evaluation.gradcam import GradCAM, conv_features, image_backbone
    from covid_keras.model.drenet import build_drenet

    model = build_drenet(2, input_size=64, backbone="tiny")
    assert image_backbone(model).name == "tiny_backbone"
    assert tuple(conv_features(model).shape[1:3]) == (2, 2)
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    cams = GradCAM(model)(x, class_index=1)
    assert cams.shape == (3, 64, 64) and cams.dtype == np.float32
    assert np.isfinite(cams).all()


# ------------------------------------------------------------------ a run folder
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("evaldata") / "tfrecords",
                         {"train": 6, "val": 4, "test": 4})


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    """A run folder as train.py leaves it (run_info.json, best.keras), no decision.json:
    a tiny DRENet trained a few steps."""
    import keras

    from covid_keras.io import data
    from covid_keras.model.drenet import build_drenet
    from covid_keras.model.optimizers import build_optimizer

    run = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(0)
    model = build_drenet(2, input_size=64, backbone="tiny")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    build_optimizer(model)
    cfg = data.PipelineConfig.for_model(saving.model_spec(model))  # as the trainer feeds it
    ds = data.make_dataset(str(dataset), "train", 4, training=True, cfg=cfg, repeat=True)
    model.fit(ds, epochs=2, steps_per_epoch=6, verbose=0, shuffle=False)
    model.save(run / "best.keras")
    (run / "run_info.json").write_text(json.dumps(
        {"flags": {"data_dir": str(dataset), "val_split": "val", "model": "drenet",
                   "backbone": "tiny", "input_size": 64}}))
    return run


def test_split_predictor_keeps_the_pipelines_record_order(dataset):
    from covid_keras.io import data

    cfg = data.PipelineConfig(input_size=64, backbone="tiny")
    sp = ev.SplitPredictor(str(dataset), "test", 3, cfg, num_display=2)
    keys, labels = [], []
    for _, meta in data.make_dataset(str(dataset), "test", 5, training=False, cfg=cfg,
                                     with_meta=True):
        keys += [k.decode() for k in meta["patient_key"].numpy()]
        labels += meta["label"].numpy().tolist()
    assert sp.patient_keys == keys and sp.labels.tolist() == labels and len(sp) == 24
    assert set(sp.sites) == {"A", "B"}
    assert sp.display_u8.shape == (2, 64, 64, 3) and sp.display_u8.dtype == np.uint8


@pytest.mark.slow
def test_evaluate_command_on_a_run_folder(run_dir, dataset, tmp_path, commands):
    out = tmp_path / "eval"
    proc = commands.run("covid_keras.evaluate", f"--run_dir={run_dir}",
                        f"--data_dir={dataset}", "--split=test", f"--output_dir={out}",
                        "--bootstrap=100", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "no decision.json: choosing the rule and threshold on val" in proc.stdout
    assert f"written to {out}: report.html, metrics.json" in proc.stdout, proc.stdout
    assert "test, covid vs rest (" in proc.stdout, proc.stdout
    for name in ("metrics.json", "slices.csv", "patients.csv", "report.html", "roc.png",
                 "pr.png", "reliability.png", "confusion.png", "decision.json"):
        assert (out / name).is_file(), name
    m = strict_loads((out / "metrics.json").read_text())
    assert m["decision"]["chosen_on_split"] == "val" and m["split"] == "test"
    assert m["slice"]["count"] == 24 and m["patient"]["count"] == 8
    for level in ("slice", "patient"):
        for k in ev.METRICS:
            assert set(m[level][k]) >= {"value", "ci95"}
    # The threshold is the val split's choice, reproduced from val's predictions.
    import keras  # noqa: F401

    from covid_keras.io import data

    model = ev.load_model(str(run_dir / "best.keras"))
    cfg = data.PipelineConfig.for_model(saving.model_spec(model))
    val = ev.SplitPredictor(str(dataset), "val", 4, cfg).predictions(model, CLASSES)
    d = ev.choose_decision(val.probs, val.labels, val.patient_keys, CLASSES)
    assert m["decision"]["threshold"] == pytest.approx(d["threshold"])
    assert m["decision"]["rule"] == d["rule"]
    assert not (run_dir / "decision.json").exists()  # not saved without --save_decision
    assert not any("chose the decision threshold" in w for w in m["warnings"])
    assert any("'non_covid' comes from a single site" in w for w in m["warnings"])
    expl = sorted((out / "explanations").glob("*.png"))
    assert len(expl) == 8
    html = (out / "report.html").read_text()
    assert "Warning" in html and "roc.png" in html and "explanations/" in html
    with open(out / "patients.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


@pytest.mark.slow
def test_evaluating_the_threshold_split_warns_in_the_report(run_dir, dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    model = ev.load_model(str(run / "best.keras"))
    from covid_keras.io import data

    cfg = data.PipelineConfig.for_model(saving.model_spec(model))
    ev.write_decision(str(run), ev.SplitPredictor(str(dataset), "val", 4, cfg).predictions(
        model, CLASSES), split="val")
    m = ev.evaluate_run(str(run), split="val", output_dir=str(tmp_path / "out"),
                        n_bootstrap=20, max_explained=1, log=lambda s: None)
    assert any("chose the decision threshold" in w for w in m["warnings"])
    assert any("chose the checkpoint" in w for w in m["warnings"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "chose the decision threshold" in html
    assert len(list((tmp_path / "out" / "explanations").glob("*.png"))) == 1


# ------------------------------------------------------------------ the HTML report
CHROMIUM = "/usr/bin/chromium"


def synthetic_report(out: Path) -> Path:
    from covid_keras.evaluation import report

    rng = np.random.default_rng(12)
    preds = make_preds(rng, patients=10, sites=["A"] * 5 + ["B"] * 5)
    d = {"rule": "mean", "threshold": 0.5, "positive_class": "covid", "split": "val",
         "criterion": "youden_j"}
    r = ev.evaluate_predictions(preds, d, 100)
    r["warnings"].append("This split (val) chose the decision threshold: test warning.")
    plots = report.write_plots(str(out), r, preds)
    (out / "explanations").mkdir(exist_ok=True)
    shutil.copy(out / "roc.png", out / "explanations" / "p000.png")
    expl = [{"key": "p000", "label": "non_covid", "decision": "covid", "score": 0.6,
             "file": "explanations/p000.png", "slices": [0, 1, 2]}]
    return Path(report.write_html(str(out), r, plots, expl))


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def load_in_chromium(page: Path, shot: Path, profile: Path) -> dict:
    """Loads ``page`` in headless Chromium and screenshots it. Returns {"console": console
    errors and uncaught exceptions, "broken": images that did not load, "title"}. Through
    Playwright when it is installed, else Chromium's own --screenshot with its console log
    on stderr (images are then checked as files)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return _load_with_chromium_cli(page, shot, profile)
    console, broken = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1200, "height": 900})
        tab.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: console.append(str(e)))
        tab.on("requestfailed", lambda r: broken.append(r.url))
        tab.goto(page.as_uri(), wait_until="load")
        broken += tab.evaluate(
            "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => i.src)")
        title = tab.title()
        tab.screenshot(path=str(shot), full_page=True)
        browser.close()
    return {"console": console, "broken": broken, "title": title}


def _load_with_chromium_cli(page: Path, shot: Path, profile: Path) -> dict:
    import re
    from html.parser import HTMLParser

    from PIL import Image

    proc = subprocess.run(
        [CHROMIUM, "--headless", *CHROMIUM_ARGS, "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,4000",
         page.as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]

    class Images(HTMLParser):
        srcs: list = []
        title = ""

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.srcs = []
    text = page.read_text()
    parser.feed(text)
    broken = []
    for src in parser.srcs:
        try:
            Image.open(page.parent / src).verify()
        except Exception:  # noqa: BLE001 - any unreadable image is broken
            broken.append(src)
    m = re.search(r"<title>(.*?)</title>", text)
    return {"console": console, "broken": broken, "title": m.group(1) if m else ""}


needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (Debian: apt-get install "
                                         "chromium)")


@needs_chromium
def test_report_loads_in_headless_chromium_without_console_errors(tmp_path):
    page = synthetic_report(tmp_path)
    shot = tmp_path / "report.png"
    got = load_in_chromium(page, shot, tmp_path / "profile")
    artifacts = Path(os.environ.get("COVID_KERAS_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / "report_chromium.png")
    assert shot.stat().st_size > 10_000
    assert got["console"] == [] and got["broken"] == []
    assert got["title"].startswith("covid_keras evaluation")


@needs_chromium
def test_the_chromium_check_sees_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"><title>t'
                    '</title></head><body><img src="missing.png"><script>console.error('
                    '"boom"); undefinedFn();</script></body></html>')
    got = load_in_chromium(page, tmp_path / "bad.png", tmp_path / "profile")
    assert any("boom" in m for m in got["console"])
    assert any("undefinedFn" in m for m in got["console"])
    assert any("missing.png" in b for b in got["broken"])
    fallback = _load_with_chromium_cli(page, tmp_path / "bad2.png", tmp_path / "profile2")
    assert any("boom" in m for m in fallback["console"])
    assert fallback["broken"] == ["missing.png"]


def test_rule_text_says_what_each_rule_decides():
    assert ev.rule_text("mean", "covid", 0.44184607) == (
        "mean rule: covid when the mean of its slices' covid probability >= 0.4418, else "
        "the likeliest other class")
    assert ev.rule_text("any", "covid", 0.5, "normal") == (
        "any rule: covid when a slice's covid probability >= 0.5, else normal only if every "
        "slice is normal, else the class of the strongest abnormal slice")
    assert ev.rule_text("any", "covid", 0.5).endswith(
        "else the likeliest other class of the slice with the highest covid probability")
    assert ">= ?" in ev.rule_text("mean", "covid", None)  # an old decision.json: no crash


def test_decide_patient_for_prediction_without_labels():
    d = {"rule": "any", "threshold": 0.5, "classes": CLASSES, "positive_class": "covid"}
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
    out = ev.decide_patient(probs, d)
    assert out["decision"] == "covid" and out["score"] == pytest.approx(0.7)
    assert out["slice_order"] == [1, 2, 0]
    out = ev.decide_patient(probs, dict(d, rule="mean"))
    assert out["decision"] == "non_covid" and out["score"] == pytest.approx(1.0 / 3)
    with pytest.raises(ValueError, match="slice_probs"):
        ev.decide_patient(np.zeros((0, 2)), d)


def test_comparison_of_three_class_runs_is_laid_out_like_table_2(tmp_path):
    rng = np.random.default_rng(13)
    classes = ["normal", "covid", "bacterial"]
    d = {"rule": "mean", "threshold": 0.4, "positive_class": "covid", "split": "val"}
    results = {"drenet": ev.public_result(ev.evaluate_predictions(
        make_preds(rng, patients=12, classes=classes, signal=2.0), d, 50))}
    md = ev.write_comparison(str(tmp_path), results)["markdown"]
    assert "Table 2" in md and "| model | Recall | Precision | Specificity |" in md
    macro = results["drenet"]["patient"]["macro"]
    assert f"{macro['sensitivity']['value']:.3f}" in md.splitlines()[-1]


@pytest.mark.slow
def test_evaluate_reads_a_run_folder_written_by_train(dataset, tmp_path, commands):
    """The trainer's own run folder (configs/smoke.cfg, a few steps) evaluates."""
    run = tmp_path / "smoke"
    proc = commands.run("covid_keras.train", "--flagfile=configs/smoke.cfg",
                        f"--data_dir={dataset}", f"--run_dir={run}", "--epochs=1",
                        "--steps_per_epoch=2", "--num_display_images=0", "--verbose=0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "eval"
    m = ev.evaluate_run(str(run), split="test", output_dir=str(out), n_bootstrap=20,
                        max_explained=2, log=lambda s: None)
    assert m["data_dir"] == str(dataset) and m["decision"]["chosen_on_split"] == "val"
    assert m["patient"]["count"] == 8 and m["checkpoint"].endswith(".keras")
    assert (out / "report.html").is_file()
    assert len(list((out / "explanations").glob("*.png"))) == 2


def test_compare_names_runs_by_experiment_and_seed():
    from covid_keras.evaluation.evaluation import run_name

    taken: set = set()
    names = []
    for p in ("/r/drenet/seed0", "/r/resnet50/seed0", "/r/drenet/seed0"):
        names.append(run_name(p, taken))
        taken.add(names[-1])
    assert names == ["drenet/seed0", "resnet50/seed0", "drenet/seed0 (2)"]


def test_split_predictor_predicts_every_record_once_with_a_partial_batch(dataset):
    import keras

    from covid_keras.io import data
    from covid_keras.model.baselines import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("tiny", 2, 64)
    cfg = data.PipelineConfig(input_size=64, backbone="tiny")
    sp = ev.SplitPredictor(str(dataset), "test", 5, cfg)  # 24 records: 4 full + 4 padded
    out = sp.predict(model)
    assert out["logits"].shape == (24, 2)
    images = np.concatenate([x.numpy() for x, _ in data.make_dataset(
        str(dataset), "test", 7, training=False, cfg=cfg)])
    np.testing.assert_allclose(out["logits"], model.predict(images, verbose=0)["logits"],
                               rtol=1e-4, atol=1e-5)
    preds = sp.predictions(model, CLASSES, outputs=out)
    np.testing.assert_allclose(preds.probs.sum(1), 1.0)
    assert preds.split == "test" and len(preds) == 24


def test_compare_command_tabulates_evaluation_folders(tmp_path, commands):
    rng = np.random.default_rng(14)
    d = {"rule": "mean", "threshold": 0.5, "positive_class": "covid", "split": "val"}
    for name, signal in (("drenet", 2.0), ("vgg16", 0.3)):
        m = ev.public_result(ev.evaluate_predictions(make_preds(rng, 10, signal=signal), d,
                                                     50))
        m["kind"] = "covid_keras.evaluate"
        m["model"] = {"kind": "drenet" if name == "drenet" else "classifier",
                      "backbone": "resnet50" if name == "drenet" else "vgg16"}
        (tmp_path / "evals" / name).mkdir(parents=True)
        (tmp_path / "evals" / name / "metrics.json").write_text(ev.dumps(m))
    (tmp_path / "not_a_run").mkdir()
    cmd = ["covid_keras.evaluate", "--compare",
           str(tmp_path / "evals" / "drenet"), str(tmp_path / "evals" / "vgg16"),
           f"--output_dir={tmp_path / 'table'}"]
    proc = commands.run(*cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "table" / "comparison.md").read_text()
    assert "| evals/drenet (drenet, resnet50) |" in md and "evals/vgg16 (classifier, vgg16)" in md
    bad = commands.run(*cmd[:2], str(tmp_path / "not_a_run"), cmd[-1], timeout=300)
    assert bad.returncode != 0 and "neither an evaluation folder" in bad.stderr
