"""Benchmark: what a K-member ensemble (``train --folds=K``) costs at inference against one
member, for the Keras model and for its SavedModel's ``predict_study`` signature.

Not a test: it prints figures. Random weights (``weights=None``), random windowed slices
(0..255): one study of ``--slices`` slices per call, as ``predict_study`` and
``covid_keras.predict`` send it. For each of the single model and the K-member ensemble
(:func:`covid_keras.model.ensemble.build_ensemble` of K independently initialised models) it
times ``--steps`` calls after ``--warmup`` untimed ones, the two interleaved (the order
alternating per round), and reports the median seconds per study and the ratio ensemble /
single in the same run (the ideal is K: every member reads every slice). With ``--export``
it exports both with ``covid_keras.serving.exporter.export_model`` (no run folder, so no decision:
the argmax) and times ``predict_study`` of each SavedModel the same way.

    .venv/bin/python bench/ensemble.py --members=5                       # ~5 min on 2 cores
    .venv/bin/python bench/ensemble.py --members=5 --model=classifier
    .venv/bin/python bench/ensemble.py --quick                           # smoke: tiny, 64 px
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # the package, and bench/common.py when imported
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import emit_result  # noqa: E402 (bench/common.py)


def build(kind: str, backbone: str, size: int, members: int, classes: int = 2):
    import keras

    from covid_keras import build_classifier, build_drenet
    from covid_keras.model.ensemble import build_ensemble

    def one(seed):
        keras.utils.set_random_seed(seed)
        return (build_drenet(classes, input_size=size, backbone=backbone) if kind == "drenet"
                else build_classifier(backbone, classes, size))

    single = one(0)
    return single, build_ensemble([single] + [one(s) for s in range(1, members)])


def time_calls(fns: dict, steps: int, warmup: int) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for step in range(steps):
        for name in (names if step % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--model", choices=["drenet", "classifier"], default="drenet")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--slices", type=int, default=15, help="Slices per study (one call).")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--export", action="store_true",
                   help="Also time predict_study of both as SavedModels.")
    p.add_argument("--quick", action="store_true", help="tiny backbone, 64 px, 4 slices")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.input_size, args.slices, args.steps = "tiny", 64, 4, 3
    if args.members < 2:
        p.error("--members must be at least 2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from covid_keras.io import data
    from covid_keras.model import saving

    single, ensemble = build(args.model, args.backbone, args.input_size, args.members)
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (args.slices, args.input_size, args.input_size, 3)).astype(
        np.float32)
    # the models' input as their spec says (the pixel values: they normalise them)
    x = np.asarray(data.model_input(u8, data.PipelineConfig.for_model(
        saving.model_spec(single))))
    keras_s = time_calls({"single": lambda: single.predict_on_batch(x),
                          "ensemble": lambda: ensemble.predict_on_batch(x)},
                         args.steps, args.warmup)
    res = {"model": args.model, "backbone": args.backbone, "input_size": args.input_size,
           "members": args.members, "slices": args.slices, "backend": keras.backend.backend(),
           "keras_s_per_study": keras_s,
           "keras_ratio": keras_s["ensemble"] / keras_s["single"]}
    if args.export:  # as covid_keras.export writes them (no run folder: no decision)
        import tensorflow as tf

        from covid_keras.serving import exporter

        calls = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, model in (("single", single), ("ensemble", ensemble)):
                minfo = saving.model_info(model, ["non_covid", "covid"])
                prep, warnings = exporter.data_prep_settings(None, args.input_size)
                info = exporter.export_info(minfo, prep, None, None, name, warnings)
                path = exporter.export_model(model, info, None, tmp, name, 1)
                loaded = tf.saved_model.load(path).signatures["predict_study"]
                calls[name] = (lambda f: lambda: f(images=tf.constant(u8)))(loaded)
            saved_s = time_calls(calls, args.steps, args.warmup)
        res["savedmodel_s_per_study"] = saved_s
        res["savedmodel_ratio"] = saved_s["ensemble"] / saved_s["single"]

    def table(r):
        print(f"{r['model']} ({r['backbone']}, {r['input_size']} px), a study of "
              f"{r['slices']} slices, {r['members']} members, backend {r['backend']}:")
        print(f"  Keras predict: single {r['keras_s_per_study']['single']:.3f} s, ensemble "
              f"{r['keras_s_per_study']['ensemble']:.3f} s, ratio {r['keras_ratio']:.2f} "
              f"(ideal {r['members']})")
        if "savedmodel_ratio" in r:
            s = r["savedmodel_s_per_study"]
            print(f"  SavedModel predict_study: single {s['single']:.3f} s, ensemble "
                  f"{s['ensemble']:.3f} s, ratio {r['savedmodel_ratio']:.2f}")

    emit_result(res, table, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
