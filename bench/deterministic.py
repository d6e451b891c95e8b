"""Benchmark: what ``train --deterministic`` (the default) costs, and whether it repeats.

Not a test: it trains. Runs the same training (``--flagfile``, default the demo recipe, cut
to ``--epochs``) ``--repeats`` times with ``--deterministic`` and as often with
``--nodeterministic``, the two interleaved (det, nodet, nodet, det, ...) so that a change in
the machine's load falls on both, each a fresh process on the backend named by
``--backend`` (``KERAS_BACKEND``: under JAX, ``--deterministic`` fixes the tf.data input
pipeline's order and TensorFlow's ops there; the model's ops are JAX's). Prints the median
wall time of each mode, their ratio (deterministic / not: the issue's threshold for the
default is <= 1.25), and whether each mode's runs wrote the same ``log.csv`` (the largest
difference between two runs' epoch figures: 0 when a rerun repeats exactly).

    .venv/bin/python bench/deterministic.py --data_dir=runs/demo/tfrecords --backend=jax
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, parser  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = {"deterministic": "--deterministic", "nondeterministic": "--nodeterministic"}


def read_log(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest absolute difference of any epoch figure of two logs (inf if their
    epochs or columns differ)."""
    if len(a) != len(b) or any(r.keys() != s.keys() for r, s in zip(a, b)):
        return float("inf")
    return max((abs(r[k] - s[k]) for r, s in zip(a, b) for k in r), default=0.0)


def train(args, mode: str, index: int) -> dict:
    run_dir = Path(args.work_dir) / args.backend / f"{mode}_{index}"
    cmd = [sys.executable, "-m", "covid_keras.train", f"--flagfile={args.flagfile}",
           f"--data_dir={args.data_dir}", f"--run_dir={run_dir}", f"--seed={args.seed}",
           f"--epochs={args.epochs}", "--report_splits=", "--verbose=0", "--overwrite",
           MODES[mode]]
    env = dict(os.environ, KERAS_BACKEND=args.backend)
    print(f"[{time.strftime('%H:%M:%S')}] {args.backend} {mode} run {index}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    print(f"    {seconds:.1f} s", flush=True)
    return {"mode": mode, "index": index, "seconds": seconds,
            "log": read_log(run_dir / "log.csv")}


def print_table(res: dict) -> None:
    print(f"\n{res['backend']}, {res['flagfile']}, {res['epochs']} epochs, "
          f"{res['repeats']} runs a mode (interleaved):")
    print(f"{'mode':<18} {'median wall s':>14} {'runs':>24} {'rerun max diff':>15}")
    for mode in MODES:
        m = res["modes"][mode]
        runs = ", ".join(f"{s:.1f}" for s in m["seconds"])
        print(f"{mode:<18} {m['median_seconds']:>14.1f} {runs:>24} "
              f"{m['rerun_max_difference']:>15.3g}")
    print(f"ratio deterministic / nondeterministic: {res['ratio']:.3f} "
          f"(default if <= 1.25: {'yes' if res['ratio'] <= 1.25 else 'no'})")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--data_dir", required=True, help="data_prep output (e.g. make demo's).")
    p.add_argument("--flagfile", default=str(REPO / "configs" / "demo.cfg"))
    p.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                   choices=["tensorflow", "jax"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="Runs of each mode (>= 2: the "
                   "rerun difference needs two).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default="runs/bench_deterministic")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if not (Path(args.data_dir) / "manifest.json").is_file():
        p.error(f"--data_dir={args.data_dir} is not a data_prep output (no manifest.json)")
    if args.repeats < 2:
        p.error("--repeats must be at least 2")
    order = []
    for i in range(args.repeats):  # det, nodet, nodet, det, det, nodet, ...
        pair = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
        order += [(mode, i) for mode in pair]
    runs = [train(args, mode, i) for mode, i in order]
    res = {"backend": args.backend, "flagfile": args.flagfile, "epochs": args.epochs,
           "repeats": args.repeats, "data_dir": args.data_dir, "modes": {}}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        res["modes"][mode] = {
            "seconds": [r["seconds"] for r in mine],
            "median_seconds": statistics.median(r["seconds"] for r in mine),
            "rerun_max_difference": max(largest_difference(mine[0]["log"], r["log"])
                                        for r in mine[1:])}
    res["ratio"] = (res["modes"]["deterministic"]["median_seconds"]
                    / res["modes"]["nondeterministic"]["median_seconds"])
    emit_result(res, print_table, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
