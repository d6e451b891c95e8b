"""Benchmark: metrics.json's patient bootstrap, every resample at once against one resample
at a time.

Not a test. ``covid_keras.evaluate`` and a ``--folds`` run's out-of-fold metrics give 95 %
CIs from 1000 resamples of the patients. One resample at a time means scikit-learn's metric
functions 8 times a resample for two classes (16 for three), and each call costs
milliseconds of input checks whatever the size. metrics.json now computes the replicates
as weights (a patient drawn k times counts k times), all resamples of a chunk in a few
NumPy operations. Both are run here on the same generated predictions, with the same seed:
the table gives each one's time, their ratio, and the largest gap between their intervals
(0 up to rounding: the same resamples). Ends with a ``RESULT {json}`` line.

    .venv/bin/python bench/bootstrap.py --patients=270 --slices=3 --classes=2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit_result, parser  # noqa: E402


def predictions(patients: int, slices: int, classes: int, seed: int = 0):
    """Slice probabilities of ``patients`` x ``slices`` (the labels in turn), a little
    higher for the true class; the patient rule ``mean``."""
    import numpy as np

    from covid_keras.evaluation import decision

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(patients) % classes, slices)
    logits = rng.normal(size=(len(labels), classes))
    logits[np.arange(len(labels)), labels] += 0.7
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    keys = [f"p{i // slices}" for i in range(len(labels))]
    pos = 1
    pats = decision.aggregate(probs, labels, keys, "mean", pos, ["default"] * len(labels))
    return (pats, labels, probs, decision.decide(probs, 0.5, pos),
            decision.decide(pats.probs, 0.5, pos), pos)


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--patients", type=int, default=270, help="patients (COVID-CT's "
                   "train + val: about 270, a 5-fold run's out-of-fold set)")
    p.add_argument("--slices", type=int, default=3, help="slices a patient")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    import numpy as np

    from covid_keras.evaluation import metrics

    pats, labels, probs, slice_pred, patient_pred, pos = predictions(
        args.patients, args.slices, args.classes)

    def both(idx):
        s = np.concatenate([pats.slices[i] for i in idx])
        return {"slice": metrics.level_metrics(labels[s], probs[s], slice_pred[s], pos),
                "patient": metrics.level_metrics(pats.labels[idx], pats.probs[idx],
                                                 patient_pred[idx], pos)}

    t = time.perf_counter()
    one = metrics.bootstrap(both, pats.labels, args.resamples, seed=0)
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    batched = metrics._bootstrap_levels(pats, labels, probs, slice_pred, patient_pred, pos,
                                        args.resamples, 0)
    batched_s = time.perf_counter() - t
    gap = max((abs(a - b) for k in one if one[k][0] is not None
               for a, b in zip(one[k][:2], batched[k][:2])), default=0.0)
    res = {"patients": args.patients, "slices": args.slices, "classes": args.classes,
           "resamples": args.resamples, "one_at_a_time_s": round(one_s, 3),
           "all_at_once_s": round(batched_s, 3), "ratio": round(one_s / batched_s, 1),
           "max_ci_gap": gap, "same_keys": one.keys() == batched.keys()}

    def table(r):
        print(f"{r['resamples']} resamples of {r['patients']} patients x {r['slices']} "
              f"slices, {r['classes']} classes")
        print(f"  one resample at a time (scikit-learn each): {r['one_at_a_time_s']:8.3f} s")
        print(f"  all at once (weights):                      {r['all_at_once_s']:8.3f} s")
        print(f"  ratio {r['ratio']}x; largest CI gap {r['max_ci_gap']:.2e}")

    emit_result(res, table, args.output_json)
    return res


if __name__ == "__main__":
    main()
