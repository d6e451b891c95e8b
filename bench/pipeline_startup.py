"""Benchmark: what building the tf.data pipelines costs a process, with and without
AutoGraph's conversion of their functions (CPU).

Not a test: it prints figures. Every process that trains, evaluates or predicts builds a
training and/or an evaluation pipeline (:func:`covid_keras.io.data.make_dataset`) before
its first batch. Its functions are passed to tf.data through :func:`covid_keras.io.data.graph_fn`,
which tells AutoGraph not to convert them (they branch on Python values only). Each round
starts two fresh processes, one as shipped (``plain``) and one with ``graph_fn`` replaced by
the identity (``converted``: what tf.data did before), in alternating order; each times

- ``build``: a training pipeline (``training=True, repeat=True``, flip and brightness) and
  an evaluation pipeline (``training=False, with_meta=True``) of the same split, built;
- ``first``: the first batch of each pulled.

The median over ``--repeats`` rounds, and the ratio converted / plain of the build time
(measured in one run, so both sides share the machine's load). Data: ``--data_dir`` (a
data_prep output with a train split) or phantom TFRecords made by bench/input.py's
``make_data`` in ``--work_dir`` (kept and reused) or a temp dir. Ends with a table and a
``RESULT {json}`` line (``--output_json`` writes it too).

    .venv/bin/python bench/pipeline_startup.py            # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from common import child_result, emit_result, parser, print_child  # noqa: E402 (bench/common.py)

KINDS = ("plain", "converted")


def child(args: argparse.Namespace) -> dict:
    """One process: builds the two pipelines and pulls a batch of each (``args.child``:
    ``plain`` as shipped, ``converted`` with AutoGraph converting the functions)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from covid_keras.io import data

    tf.get_logger().setLevel("ERROR")
    if args.child == "converted":
        data.graph_fn = lambda fn: fn
    cfg = data.PipelineConfig(input_size=args.input_size, backbone="resnet50")
    t0 = time.perf_counter()
    train = data.make_dataset(str(args.data_dir), "train", args.batch_size, True, cfg,
                              repeat=True)
    evaluation = data.make_dataset(str(args.data_dir), "train", args.batch_size, False, cfg,
                                   with_meta=True)
    t1 = time.perf_counter()
    next(iter(train))
    next(iter(evaluation))
    return {"build_s": t1 - t0, "first_s": time.perf_counter() - t1}


def run_child(args: argparse.Namespace, kind: str) -> dict:
    cmd = [sys.executable, __file__, f"--child={kind}", f"--data_dir={args.data_dir}",
           f"--input_size={args.input_size}", f"--batch_size={args.batch_size}"]
    return child_result(cmd, f"the {kind} process", REPO)


def bench(args: argparse.Namespace) -> dict:
    times: dict = {k: [] for k in KINDS}
    for r in range(args.repeats):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            times[kind].append(run_child(args, kind))
    res: dict = {"repeats": args.repeats, "input_size": args.input_size,
                 "batch_size": args.batch_size}
    for kind in KINDS:
        for key in ("build_s", "first_s"):
            res[f"{kind}_{key}"] = round(statistics.median(t[key] for t in times[kind]), 3)
    res["build_ratio_converted_over_plain"] = round(
        res["converted_build_s"] / res["plain_build_s"], 2)
    res["saved_s_per_process"] = round(
        res["converted_build_s"] + res["converted_first_s"]
        - res["plain_build_s"] - res["plain_first_s"], 2)
    return res


def print_table(res: dict) -> None:
    print(f"{'pipelines':<12}{'build s':>10}{'first batch s':>16}")
    for kind in KINDS:
        print(f"{kind:<12}{res[f'{kind}_build_s']:>10.3f}{res[f'{kind}_first_s']:>16.3f}")
    print(f"build: converted / plain = {res['build_ratio_converted_over_plain']}x; "
          f"saved per process: {res['saved_s_per_process']} s (median of {res['repeats']})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--data_dir", type=Path, help="data_prep TFRecords with a train split; "
                   "default: phantom data (bench/input.py's make_data)")
    p.add_argument("--work_dir", type=Path, help="where phantom data goes (kept, reused)")
    p.add_argument("--input_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="rounds of the two processes")
    p.add_argument("--output_json", help="also write the RESULT here")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print_child(child(args))
        return
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir is None:
            from input import make_data  # bench/input.py

            ns = argparse.Namespace(input_size=args.input_size, patients_per_kind=1,
                                    num_slices=20)
            args.data_dir, _ = make_data(ns, args.work_dir or Path(tmp))
        emit_result(bench(args), print_table, args.output_json)


if __name__ == "__main__":
    main()
