"""Patient-level splits: seeded, stratified by label and site; a manifest's split wins.

``paper``: 60 / 10 / 30 % train / val / test (DRENet, following LUNA16).
``repeated_3to1``: seed 004's five repeated random 3:1 train / val splits; ``repeat``
chooses which one the records carry, and :func:`repeated_splits` lists all five for the
dataset manifest. Patients whose manifest row names a split keep it (e.g. an external test
hospital).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from data_prep.errors import StudyError

SCHEMES = ("paper", "repeated_3to1")
NUM_REPEATS = 5


@dataclass(frozen=True)
class PatientInfo:
    label: str
    site: str
    manifest_split: str  # "" when the manifest does not say
    # the split order (data_prep.study.split_order_key of the raw patient id): in memory
    # only, never written; "" places the patient by its key
    order: str = ""


def _stratum_seed(seed: int, stratum: str, repeat: int) -> list[int]:
    digest = hashlib.sha256(f"{stratum}|{repeat}".encode()).hexdigest()[:8]
    return [seed, repeat, int(digest, 16)]


def split_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Largest-remainder counts for ``n`` patients; when n allows, every split with a
    positive fraction gets at least one (a 6-patient stratum still has a val patient)."""
    f = np.asarray(fractions, dtype=np.float64) / float(sum(fractions))
    raw = f * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    if n >= int((f > 0).sum()):
        for i in np.nonzero((f > 0) & (counts == 0))[0]:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    return [int(c) for c in counts]


def _cut(keys: list[str], fractions: tuple[float, ...], names: tuple[str, ...],
         rng: np.random.Generator) -> dict[str, str]:
    order = [keys[i] for i in rng.permutation(len(keys))]
    out, start = {}, 0
    for name, count in zip(names, split_counts(len(order), fractions)):
        for k in order[start:start + count]:
            out[k] = name
        start += count
    return out


def assign_splits(patients: dict[str, PatientInfo], *, scheme: str = "paper",
                  fractions: tuple[float, float, float] = (0.6, 0.1, 0.3), seed: int = 0,
                  repeat: int = 0, val_from_train: float = 0.0) -> dict[str, str]:
    """patient key -> split. Deterministic for the same patients, seed and repeat.

    The seeded permutation starts from the patients' ``order`` keys (salt-independent, held
    in memory only), so the split does not change with the per-folder salt; a patient
    without one is placed by its key.

    ``val_from_train`` moves that fraction of the train patients (stratified, seeded) to
    val: for a dataset whose official split has no separate validation set to choose
    checkpoints on (COVID-CT: its official val then serves as the held-out test, with
    ``--split_map=val:test``)."""
    if scheme not in SCHEMES:
        raise ValueError(f"Split scheme must be one of {SCHEMES}. Received: {scheme!r}")
    if not 0 <= repeat < NUM_REPEATS:
        raise ValueError(f"repeat must be in [0, {NUM_REPEATS}). Received: {repeat}")
    if scheme == "paper":
        if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
            raise ValueError(f"Three non-negative split fractions needed. Received: {fractions}")
        names, fracs = ("train", "val", "test"), tuple(fractions)
    else:
        names, fracs = ("train", "val"), (3.0, 1.0)
    def ordered(keys) -> list[str]:
        return sorted(keys, key=lambda k: (patients[k].order or k, k))

    out = {k: p.manifest_split for k, p in patients.items() if p.manifest_split}
    strata: dict[str, list[str]] = {}
    for key in ordered(patients):
        p = patients[key]
        if not p.manifest_split:
            strata.setdefault(f"{p.label}|{p.site}", []).append(key)
    for stratum, keys in sorted(strata.items()):
        rng = np.random.default_rng(_stratum_seed(seed, stratum, repeat))
        out.update(_cut(keys, fracs, names, rng))
    if val_from_train:
        if not 0.0 < val_from_train < 1.0:
            raise ValueError(f"val_from_train must be in (0, 1). Received: {val_from_train}")
        train: dict[str, list[str]] = {}
        for key in ordered(out):
            if out[key] == "train":
                p = patients[key]
                train.setdefault(f"{p.label}|{p.site}", []).append(key)
        for stratum, keys in sorted(train.items()):
            rng = np.random.default_rng(_stratum_seed(seed, "val_from_train|" + stratum,
                                                      repeat))
            out.update(_cut(keys, (1.0 - val_from_train, val_from_train), ("train", "val"),
                            rng))
    return out


def repeated_splits(patients: dict[str, PatientInfo], seed: int) -> list[dict[str, list[str]]]:
    """All five repeated 3:1 splits: [{"train": [keys], "val": [keys], ...}, ...]."""
    out = []
    for r in range(NUM_REPEATS):
        assignment = assign_splits(patients, scheme="repeated_3to1", seed=seed, repeat=r)
        by_split: dict[str, list[str]] = {}
        for k in sorted(assignment):
            by_split.setdefault(assignment[k], []).append(k)
        out.append(by_split)
    return out


def merge_patient(patients: dict[str, PatientInfo], key: str, info: PatientInfo,
                  study: str) -> None:
    """Adds one study's view of a patient; a patient given two manifest splits is fatal."""
    old = patients.get(key)
    if old is None:
        patients[key] = info
        return
    if old.manifest_split and info.manifest_split and old.manifest_split != info.manifest_split:
        raise StudyError("patient_split_conflict",
                         f"patient {key} is in split {old.manifest_split!r} and, through "
                         f"study {study}, in {info.manifest_split!r}")
    if not old.manifest_split and info.manifest_split:
        patients[key] = PatientInfo(old.label, old.site, info.manifest_split,
                                    old.order or info.order)


def check_disjoint(assignment_by_study: list[tuple[str, str]]) -> None:
    """(patient key, split) pairs of every written study: raises if a patient is in two."""
    seen: dict[str, str] = {}
    for patient, split in assignment_by_study:
        if seen.setdefault(patient, split) != split:
            raise StudyError("patient_split_conflict",
                             f"patient {patient} written to {seen[patient]!r} and {split!r}")
