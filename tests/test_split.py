from collections import Counter

import pytest

from data_prep.errors import StudyError
from data_prep.split import (
    PatientInfo,
    assign_splits,
    check_disjoint,
    merge_patient,
    repeated_splits,
)


def _patients(n_per=20, labels=("covid", "normal"), sites=("a", "b")):
    return {f"{lab}-{s}-{i}": PatientInfo(lab, s, "") for lab in labels for s in sites
            for i in range(n_per)}


def test_paper_split_is_stratified_and_seeded():
    pats = _patients()
    a = assign_splits(pats, seed=3)
    assert a == assign_splits(pats, seed=3)
    assert a != assign_splits(pats, seed=4)
    for lab in ("covid", "normal"):
        for site in ("a", "b"):
            c = Counter(v for k, v in a.items() if k.startswith(f"{lab}-{site}-"))
            assert c == {"train": 12, "val": 2, "test": 6}


def test_manifest_split_wins():
    pats = _patients(n_per=5)
    pats["covid-a-0"] = PatientInfo("covid", "a", "test")
    pats["covid-a-1"] = PatientInfo("covid", "a", "train")
    a = assign_splits(pats, seed=0)
    assert a["covid-a-0"] == "test" and a["covid-a-1"] == "train"


def test_repeated_3to1():
    pats = _patients(n_per=8)
    reps = repeated_splits(pats, seed=4)
    assert len(reps) == 5
    for rep in reps:
        assert set(rep) == {"train", "val"}
        assert len(rep["train"]) == 24 and len(rep["val"]) == 8
        assert not set(rep["train"]) & set(rep["val"])
    assert len({tuple(r["val"]) for r in reps}) == 5  # five different splits


def test_patient_in_two_manifest_splits_fails():
    pats = {}
    merge_patient(pats, "p", PatientInfo("covid", "a", "train"), "s1")
    with pytest.raises(StudyError, match="patient p"):
        merge_patient(pats, "p", PatientInfo("covid", "a", "test"), "s2")


def test_check_disjoint():
    check_disjoint([("p1", "train"), ("p1", "train"), ("p2", "val")])
    with pytest.raises(StudyError):
        check_disjoint([("p1", "train"), ("p1", "val")])


@pytest.mark.parametrize("n,expected", [(1, [1, 0, 0]), (3, [1, 1, 1]), (6, [3, 1, 2]),
                                        (10, [6, 1, 3]), (20, [12, 2, 6])])
def test_split_counts(n, expected):
    from data_prep.split import split_counts

    assert split_counts(n, (0.6, 0.1, 0.3)) == expected


def test_val_from_train_moves_train_patients_only():
    pats = {f"p{i}": PatientInfo("covid" if i % 2 else "non_covid", "a",
                                 "test" if i >= 16 else "train") for i in range(20)}
    a = assign_splits(pats, seed=0, val_from_train=0.25)
    assert all(a[f"p{i}"] == "test" for i in range(16, 20))
    val = [k for k, v in a.items() if v == "val"]
    assert len(val) == 4 and {pats[k].label for k in val} == {"covid", "non_covid"}
    assert a == assign_splits(pats, seed=0, val_from_train=0.25)
