"""Benchmark: checkpoint rules and epoch-to-epoch swing, read off tracked accuracy_jax runs.

``bench/accuracy_jax.py --track_held_out`` records, for every epoch, the val figures (that
choose) and the held-out patient AUC (that never chooses); with ``--bn_stats=both`` also
the same weights' figures with population batch-norm statistics (``*_pop``). This script
reads those run JSONs (and the ``.partial.json`` of unfinished runs, named in the table's
heading; ``--finished_only`` leaves them out) and, per group of runs,
reports:

- the swing: the mean |change| of the val and of the held-out patient AUC from one epoch
  to the next, and the issue's stability figure (the largest distance of the last 5
  epochs' val patient AUC from their mean), for the moving and the population statistics,
  for DRENet's global branch alone (``raw_logits``, recorded as ``*_raw``: row "raw"), and
  in a run with ``--ema_momentum`` for the weights being trained, without the average
  (``*_noavg``: row "noavg", paired epoch by epoch with the averaged figures);
- for each checkpoint rule, applied to the val history alone, the chosen epoch and that
  epoch's held-out patient AUC (mean +- sd over the runs). The rules:
  ``smoothed3`` (the trainer's: the mean of the last 3 epochs' val patient AUC, the first
  epochs over fewer, ties to the lower val loss), ``smoothed3_full`` (the same, but only
  epochs with 3 values in their window), ``val_loss`` (the lowest val prediction loss),
  ``last`` (the last epoch).

The held-out figures are diagnostics of the rules: nothing here is chosen on held out.
Ends with a table and a ``RESULT {json}`` line.

    python bench/checkpoint_rules.py --runs=runs/pbn,runs/ema995
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from accuracy import mean_sd, stability_of  # noqa: E402
from accuracy_jax import SMOOTHING_EPOCHS, smoothed_choice  # noqa: E402
from common import emit_result, parser  # noqa: E402

RULES = ("smoothed3", "smoothed3_full", "val_loss", "last")
# figures per run: the prediction with moving / population batch-norm statistics, DRENet's
# global branch (raw_logits) alone with the run's statistics (accuracy_jax *_raw), and in
# a run with --ema_momentum the trained weights without the average (*_noavg)
VARIANTS = ("moving", "population", "raw", "noavg")


def choose(history: list[dict], rule: str, suffix: str = "") -> int | None:
    """The epoch (1-based) that ``rule`` picks from the val figures of ``history``
    (``suffix`` "_pop": the population-statistics figures; "_raw": DRENet's global branch;
    "_noavg": the weights without their moving average).
    None if none is eligible."""
    auc = [h.get(f"val_patient_auc{suffix}") for h in history]
    loss = [h.get(f"val_prediction_loss{suffix}") for h in history]
    if not history or any(a is None for a in auc):
        return None
    if rule == "last":
        return history[-1]["epoch"]
    if rule == "val_loss":
        return history[min(range(len(history)), key=lambda i: loss[i])]["epoch"]
    best, best_key = None, None
    for i, h in enumerate(history):
        if rule == "smoothed3_full" and i + 1 < SMOOTHING_EPOCHS:
            continue
        _, key = smoothed_choice(auc[max(0, i - SMOOTHING_EPOCHS + 1):i + 1], loss[i])
        if best_key is None or key < best_key:
            best, best_key = h["epoch"], key
    return best


def swing(values: list[float]) -> float | None:
    """Mean |change| from one epoch to the next."""
    v = [x for x in values if x is not None]
    if len(v) < 2:
        return None
    return sum(abs(b - a) for a, b in zip(v, v[1:])) / (len(v) - 1)


def analyse_run(run: dict, held_out: str = "test") -> dict:
    hist = run["history"]
    out = {"seed": run.get("seed"), "epochs": len(hist)}
    # a --bn_stats=population run's plain figures are population ones (no *_pop keys)
    variants = ([("population", "")] if run.get("bn_stats") == "population"
                else [("moving", ""), ("population", "_pop")])
    variants.append(("raw", "_raw"))  # DRENet: its global branch alone, chosen on its own val
    variants.append(("noavg", "_noavg"))  # --ema_momentum: the weights without the average
    for stats, suffix in variants:
        val = [h.get(f"val_patient_auc{suffix}") for h in hist]
        test = [h.get(f"{held_out}_patient_auc{suffix}") for h in hist]
        if any(v is None for v in val):
            continue
        by_epoch = {h["epoch"]: t for h, t in zip(hist, test)}
        row = {"val_swing": swing(val), "held_out_swing": swing(test),
               "last5_val_max_dev": stability_of(val)["max_dev"], "rules": {}}
        for rule in RULES:
            epoch = choose(hist, rule, suffix)
            row["rules"][rule] = {"epoch": epoch, "held_out_patient_auc": by_epoch.get(epoch)}
        out[stats] = row
    return out


def load_runs(folder: Path, finished_only: bool = False) -> tuple[list[dict], list[dict]]:
    """A work folder's run JSONs and, unless ``finished_only``, an unfinished run's
    .partial.json where no JSON is. Returns (runs, the unfinished ones among them)."""
    finished, partial = {}, {}
    for path in folder.glob("*.json"):
        name = path.name
        if name.endswith(".partial.json"):
            if not finished_only:
                partial[name[: -len(".partial.json")]] = json.loads(path.read_text())
        elif name.count("-seed"):
            finished[path.stem] = json.loads(path.read_text())
    runs = {**partial, **finished}  # a finished run's JSON wins over its partial
    kept = {k: runs[k] for k in sorted(runs) if runs[k].get("history")}
    return list(kept.values()), [r for k, r in kept.items() if k not in finished]


def summarise(analyses: list[dict]) -> dict:
    out = {}
    for stats in VARIANTS:
        rows = [a[stats] for a in analyses if stats in a]
        if not rows:
            continue
        s = {k: mean_sd([r[k] for r in rows if r[k] is not None])
             for k in ("val_swing", "held_out_swing", "last5_val_max_dev")}
        s["rules"] = {}
        for rule in RULES:
            picks = [r["rules"][rule] for r in rows]
            s["rules"][rule] = {
                "held_out_patient_auc": mean_sd([p["held_out_patient_auc"] for p in picks
                                                 if p["held_out_patient_auc"] is not None]),
                "epochs": [p["epoch"] for p in picks]}
        out[stats] = s
    return out


def _fmt(d: dict) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.3f} +- {d['sd']:.3f}"


def print_table(res: dict) -> None:
    for group, g in res["groups"].items():
        unfinished = "".join(
            f"; unfinished: seed {u['seed']} at epoch {u['epochs']}" for u in g["unfinished"])
        print(f"\n{group}: {g['runs']} run(s), held out = {res['held_out']}{unfinished}")
        print("| statistics | val swing | held-out swing | last-5 max dev | "
              + " | ".join(RULES) + " |")
        print("| --- " * (4 + len(RULES)) + "|")
        for stats, s in g["summary"].items():
            cells = [_fmt(s["val_swing"]), _fmt(s["held_out_swing"]),
                     _fmt(s["last5_val_max_dev"])]
            cells += [f"{_fmt(s['rules'][r]['held_out_patient_auc'])} "
                      f"(epochs {','.join(str(e) for e in s['rules'][r]['epochs'])})"
                      for r in RULES]
            print(f"| {stats} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--runs", required=True,
                   help="Comma-separated accuracy_jax work folders (one group each).")
    p.add_argument("--held_out", default="test", help="Held-out split recorded per epoch.")
    p.add_argument("--finished_only", action="store_true",
                   help="Leave out unfinished runs (.partial.json: one still running, or "
                        "one that was stopped), which are counted by default and named in "
                        "the table's heading.")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    res = {"held_out": args.held_out, "groups": {}}
    for folder in [f for f in args.runs.split(",") if f]:
        path = Path(folder)
        if not path.is_dir():
            p.error(f"--runs: {folder}: no such folder")
        runs, unfinished = load_runs(path, args.finished_only)
        if not any(f"{args.held_out}_patient_auc" in h for r in runs for h in r["history"]):
            p.error(f"{folder}: no run with a per-epoch {args.held_out} AUC (run "
                    "bench/accuracy_jax.py with --track_held_out)")
        analyses = [analyse_run(r, args.held_out) for r in runs]
        res["groups"][folder] = {"runs": len(runs), "per_run": analyses,
                                 "unfinished": [{"seed": r.get("seed"),
                                                 "epochs": len(r["history"])}
                                                for r in unfinished],
                                 "summary": summarise(analyses)}
    emit_result(res, print_table, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
