"""Benchmark: DRENet's train and inference step time against the plain classifier.

Not a test: it prints figures. Synthetic data (random images and labels), random weights
(``weights=None``, nothing downloaded). Two modes:

* CPU (default): the backend KERAS_BACKEND names (default tensorflow). DRENet
  (:func:`covid_keras.build_drenet`, ``--variant`` paper, ``--backbone`` resnet50) and the
  plain classifier (:func:`covid_keras.build_classifier`, the same backbone) at the SAME
  input size and batch size. Reports the median train step (``train_on_batch``) and
  inference step (``predict_on_batch``) of each, and DRENet / classifier. The ideal ratio
  counts backbone passes: 2 at the input size (the image and the generated image) plus K
  crops at half the side, each a quarter of the cost: 2 + K / 4 = 2.75 for the paper (K=3)
  at any input size, since the crops scale with the input.
* GPU (``--gpu``): KERAS_BACKEND=jax (set here if it is not), ``mixed_bfloat16``, batch 64,
  DRENet at 448 and the classifier at 224 (the crop size). Reports DRENet train and
  inference slices/s, the classifier's train img/s, and the targets: DRENet train >= 0.8 x
  (classifier-224 img/s / 11) (11 = 2 passes at 448, 4 x 224's cost each, + 3 crops at
  224) and DRENet inference >= 1000 slices/s. TensorFlow is never imported on this path
  (the GPU image has none; the JSON says whether it was). ``--quick`` shrinks everything
  (tiny backbone, 128 px, batch 2) for a smoke run of either path on a CPU.

Every model: ``compile(optimizer=SGD(8e-4, momentum=0.9))`` (the classifier with a
SparseCategoricalCrossentropy on ``logits``; DRENet's loss is its own ``compute_loss``) and
``jit_compile``: ``--jit try`` (default) tries XLA and falls back to ``jit_compile=False``
for a model whose first train or inference step fails under XLA (the table says which was
used and the JSON why). The first call of each function (tracing + compilation + one step)
is timed apart; then ``--warmup`` - 1 more untimed steps and ``--steps`` timed steps, the
models interleaved (the order alternates per round); every step is synchronised (the loss
converted to float, the predictions returned as NumPy). Peak RSS is ``ru_maxrss``.

Prints a table and one ``RESULT {json}`` line; ``--output_json`` also writes the JSON.

    .venv/bin/python bench/model.py                                  # CPU, ~3-4 min
    KERAS_BACKEND=jax .venv/bin/python bench/model.py --gpu --quick  # smoke of the GPU path
    python bench/model.py --gpu                                      # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/model.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from common import emit_result  # noqa: E402 (bench/common.py)

# Per mode: input_size, batch_size, backbone, steps, warmup, dtype policy.
DEFAULTS = {
    "cpu": dict(input_size=224, batch_size=2, backbone="resnet50", steps=5, warmup=2,
                dtype_policy="float32"),
    "gpu": dict(input_size=448, batch_size=64, backbone="resnet50", steps=20, warmup=3,
                dtype_policy="mixed_bfloat16"),
    "quick": dict(input_size=128, batch_size=2, backbone="tiny", steps=2, warmup=1),
}
TRAIN_TARGET_FRACTION = 0.8  # DRENet train slices/s >= 0.8 x (classifier-224 img/s / 11)
INFER_TARGET = 1000.0  # DRENet inference slices/s
LEARNING_RATE, MOMENTUM = 8e-4, 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="DRENet vs the plain classifier: train / inference step time (synthetic "
                    "data, random weights). Prints a table and a RESULT {json} line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="GPU mode: KERAS_BACKEND=jax, mixed_bfloat16, batch 64, DRENet at 448 "
                        "vs the classifier at 224, throughput targets")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny backbone, 128 px, batch 2, 2 steps (explicit flags "
                        "still win)")
    p.add_argument("--input_size", type=int, default=None,
                   help="DRENet input side (crops: half); CPU 224, GPU 448")
    p.add_argument("--batch_size", type=int, default=None, help="CPU 2, GPU 64")
    p.add_argument("--backbone", default=None,
                   help="backbone of both models (resnet50, vgg16, densenet121, densenet169, "
                        "tiny); default resnet50")
    p.add_argument("--variant", choices=("paper", "code"), default="paper",
                   help="DRENet variant")
    p.add_argument("--num_classes", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps (median); CPU 5, GPU 20")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps incl. the compiling first call; CPU 2, GPU 3")
    p.add_argument("--jit", choices=("try", "on", "off"), default="try",
                   help="jit_compile: try XLA, fall back to False per model; or force it")
    p.add_argument("--dtype_policy", default=None,
                   help="Keras dtype policy; CPU float32, GPU mixed_bfloat16")
    p.add_argument("--output_json", default=None, help="also write the RESULT JSON here")
    args = p.parse_args(argv)
    mode = "gpu" if args.gpu else "cpu"
    for key, value in DEFAULTS[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, DEFAULTS["quick"].get(key, value) if args.quick else value)
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        p.error("--steps, --warmup and --batch_size must be >= 1")
    args.mode = mode
    return args


def set_environment(args: argparse.Namespace) -> list[str]:
    """Environment variables that must be set before Keras is imported; returns notes."""
    notes = []
    if args.gpu:
        if os.environ.get("KERAS_BACKEND") != "jax":
            notes.append(f"--gpu: KERAS_BACKEND {os.environ.get('KERAS_BACKEND')!r} -> 'jax'")
            os.environ["KERAS_BACKEND"] = "jax"
        # JAX preallocates 75% of the GPU by default; DRENet at 448 x 64 needs more.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    else:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return notes


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 1024.0  # bytes / KiB


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


class Case:
    """One model with its synthetic batch, compiled with a jit_compile setting."""

    def __init__(self, name: str, model, size: int, batch: int, num_classes: int,
                 classifier: bool, rng: np.random.Generator):
        from keras import ops

        self.name, self.model, self.size, self.batch = name, model, size, batch
        self.classifier = classifier
        images = rng.uniform(-1.0, 1.0, size=(batch, size, size, 3)).astype(np.float32)
        labels = rng.integers(0, num_classes, size=(batch,)).astype(np.int32)
        # Backend tensors (on the accelerator under JAX): no host-to-device copy per step.
        self.x = ops.convert_to_tensor(images)
        y = ops.convert_to_tensor(labels)
        self.y = {"logits": y} if classifier else y
        self.jit = None
        self.jit_error = None
        self.first = {}
        self.times = {"train": [], "infer": []}

    def compile(self, jit: bool) -> None:
        import keras

        kwargs = {}
        if self.classifier:
            kwargs["loss"] = {"logits": keras.losses.SparseCategoricalCrossentropy(
                from_logits=True)}
        self.model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
                           jit_compile=jit, **kwargs)
        self.jit = jit

    def train_step(self) -> float:
        logs = self.model.train_on_batch(self.x, self.y, return_dict=True)
        return float(logs["loss"])  # synchronises

    def infer_step(self) -> None:
        out = self.model.predict_on_batch(self.x)  # NumPy: synchronised
        if not np.isfinite(np.asarray(out["logits"])).all():
            raise FloatingPointError(f"{self.name}: non-finite logits")

    def prepare(self, jit_mode: str, warmup: int, log) -> None:
        """Compiles, times the first call of each function, runs the warm-up steps."""
        tries = {"try": [True, False], "on": [True], "off": [False]}[jit_mode]
        for i, jit in enumerate(tries):
            self.compile(jit)
            try:
                t0 = time.perf_counter()
                loss = self.train_step()
                self.first["train"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.infer_step()
                self.first["infer"] = time.perf_counter() - t0
            except Exception as exc:  # XLA cannot compile some op: fall back
                if i == len(tries) - 1:
                    raise
                self.jit_error = _first_line(exc)
                log(f"  {self.name}: jit_compile={jit} failed ({self.jit_error}); "
                    f"retrying with jit_compile={tries[i + 1]}")
                continue
            log(f"  {self.name}: jit_compile={jit}, first train call "
                f"{self.first['train']:.1f} s (loss {loss:.3f}), first inference call "
                f"{self.first['infer']:.1f} s")
            break
        for _ in range(warmup - 1):
            self.train_step()
            self.infer_step()

    def summary(self) -> dict:
        train = statistics.median(self.times["train"])
        infer = statistics.median(self.times["infer"])
        return {"input_size": self.size, "batch_size": self.batch, "jit_compile": self.jit,
                "jit_error": self.jit_error, "params": int(self.model.count_params()),
                "first_train_call_s": round(self.first["train"], 3),
                "first_infer_call_s": round(self.first["infer"], 3),
                "train_step_s": round(train, 5), "infer_step_s": round(infer, 5),
                "train_per_s": round(self.batch / train, 3),
                "infer_per_s": round(self.batch / infer, 3),
                "train_steps_s": [round(t, 5) for t in self.times["train"]],
                "infer_steps_s": [round(t, 5) for t in self.times["infer"]]}


def time_interleaved(cases: list[Case], steps: int) -> None:
    for kind in ("train", "infer"):
        for r in range(steps):
            for case in (cases if r % 2 == 0 else cases[::-1]):
                step = case.train_step if kind == "train" else case.infer_step
                t0 = time.perf_counter()
                step()
                case.times[kind].append(time.perf_counter() - t0)


def _device() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        d = jax.devices()[0]
        return f"jax:{d.platform}:{getattr(d, 'device_kind', '')}"
    return f"{keras.backend.backend()}:cpu ({os.cpu_count()} cores)"


def _accelerator_peak_gb() -> float | None:
    try:
        import keras

        if keras.backend.backend() != "jax":
            return None
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else round(peak / 2**30, 2)
    except Exception:
        return None


def bench(args: argparse.Namespace, notes: list[str]) -> dict:
    import keras

    from covid_keras.model.baselines import build_classifier
    from covid_keras.model.drenet import build_drenet

    def log(msg: str) -> None:
        print(msg, flush=True)

    for note in notes:
        log(note)
    rss_import = _maxrss_mb()
    keras.mixed_precision.set_dtype_policy(args.dtype_policy)
    rng = np.random.default_rng(0)
    size, batch = args.input_size, args.batch_size
    crop = size // 2
    # CPU: the classifier at DRENet's input size; GPU: at the crop size (224 at 448).
    base_size = crop if args.gpu else size
    log(f"backend={keras.backend.backend()} device={_device()} policy={args.dtype_policy} "
        f"backbone={args.backbone} batch={batch} DRENet {size} px (crops {crop}), "
        f"classifier {base_size} px")

    t0 = time.perf_counter()
    drenet = build_drenet(args.num_classes, input_size=size, backbone=args.backbone,
                          weights=None, variant=args.variant)
    base = build_classifier(args.backbone, args.num_classes, input_size=base_size,
                            weights=None)
    build_s = time.perf_counter() - t0
    k = int(drenet.get_layer("top_k").k)
    base_name = f"{args.backbone}_{base_size}"
    cases = [Case(base_name, base, base_size, batch, args.num_classes, True, rng),
             Case(f"drenet_{size}", drenet, size, batch, args.num_classes, False, rng)]
    log(f"built both models in {build_s:.1f} s; compiling and warming up (jit={args.jit})")
    for case in cases:
        case.prepare(args.jit, args.warmup, log)
    rss_compiled = _maxrss_mb()
    log(f"timing {args.steps} steps each, interleaved")
    time_interleaved(cases, args.steps)

    res = {"mode": args.mode + ("_quick" if args.quick else ""),
           "backend": keras.backend.backend(), "device": _device(),
           "keras": keras.__version__, "dtype_policy": args.dtype_policy,
           "backbone": args.backbone, "variant": args.variant, "regions": k,
           "input_size": size, "crop_size": crop, "batch_size": batch, "steps": args.steps,
           "warmup": args.warmup, "jit": args.jit, "build_s": round(build_s, 2),
           "models": {c.name: c.summary() for c in cases}}
    if res["backend"] == "jax":
        res["jax"] = sys.modules["jax"].__version__
    if "tensorflow" in sys.modules:
        res["tensorflow"] = getattr(sys.modules["tensorflow"], "__version__", "?")
    res["tensorflow_imported"] = "tensorflow" in sys.modules
    b, d = res["models"][base_name], res["models"][f"drenet_{size}"]
    # Backbone passes in units of one pass at the crop size: 2 at the input (area (S/c)^2
    # each) + K crops.
    crop_equiv = 2 * (size / crop) ** 2 + k
    if args.gpu:
        train_target = TRAIN_TARGET_FRACTION * b["train_per_s"] / crop_equiv
        res["gpu"] = {
            "classifier_train_img_s": b["train_per_s"],
            "classifier_infer_img_s": b["infer_per_s"],
            "drenet_train_slices_s": d["train_per_s"],
            "drenet_infer_slices_s": d["infer_per_s"],
            "crop_pass_equivalents": round(crop_equiv, 3),
            "targets": {
                "train": {"target_slices_s": round(train_target, 3),
                          "measured": d["train_per_s"],
                          "pass": bool(d["train_per_s"] >= train_target)},
                "infer": {"target_slices_s": INFER_TARGET, "measured": d["infer_per_s"],
                          "pass": bool(d["infer_per_s"] >= INFER_TARGET)}},
            "accelerator_peak_gb": _accelerator_peak_gb()}
    else:
        res["ratio"] = {"train": round(d["train_step_s"] / b["train_step_s"], 3),
                        "infer": round(d["infer_step_s"] / b["infer_step_s"], 3),
                        "ideal": round(crop_equiv / (size / crop) ** 2, 3)}
        if b["jit_compile"] != d["jit_compile"]:
            res["ratio"]["note"] = "the two models ran with different jit_compile settings"
    res["peak_rss_mb"] = {"after_import": round(rss_import, 1),
                          "after_compile_warmup": round(rss_compiled, 1),
                          "end": round(_maxrss_mb(), 1)}
    return res


def print_table(res: dict) -> None:
    print()
    print(f"{res['mode']}: backend {res['backend']}, {res['device']}, policy "
          f"{res['dtype_policy']}, batch {res['batch_size']}, median of {res['steps']} steps")
    header = (f"{'model':<18}{'px':>5}{'jit':>7}{'1st train s':>13}{'1st infer s':>13}"
              f"{'train s':>10}{'infer s':>10}{'train/s':>10}{'infer/s':>10}")
    print(header)
    print("-" * len(header))
    for name, m in res["models"].items():
        print(f"{name:<18}{m['input_size']:>5}{str(m['jit_compile']):>7}"
              f"{m['first_train_call_s']:>13.2f}{m['first_infer_call_s']:>13.2f}"
              f"{m['train_step_s']:>10.3f}{m['infer_step_s']:>10.3f}"
              f"{m['train_per_s']:>10.2f}{m['infer_per_s']:>10.2f}")
        if m["jit_error"]:
            print(f"  XLA failed for {name}: {m['jit_error']}")
    if "ratio" in res:
        r = res["ratio"]
        print(f"DRENet / {res['backbone']} at the same size: train {r['train']:.2f}x, "
              f"inference {r['infer']:.2f}x (ideal {r['ideal']:.2f}x: 2 passes + "
              f"{res['regions']} half-size crops)")
        if "note" in r:
            print(f"  note: {r['note']}")
    if "gpu" in res:
        g = res["gpu"]
        print(f"classifier at {res['crop_size']} px: train {g['classifier_train_img_s']:.1f} "
              f"img/s, inference {g['classifier_infer_img_s']:.1f} img/s")
        t = g["targets"]
        print(f"DRENet train {t['train']['measured']:.1f} slices/s, target >= "
              f"{TRAIN_TARGET_FRACTION} x classifier / {g['crop_pass_equivalents']:g} = "
              f"{t['train']['target_slices_s']:.1f}: "
              f"{'PASS' if t['train']['pass'] else 'FAIL'}")
        print(f"DRENet inference {t['infer']['measured']:.1f} slices/s, target >= "
              f"{INFER_TARGET:g}: {'PASS' if t['infer']['pass'] else 'FAIL'}")
        if res["mode"].endswith("quick"):
            print("  (--quick: tiny sizes, the targets are not meaningful)")
        if g["accelerator_peak_gb"] is not None:
            print(f"accelerator peak memory: {g['accelerator_peak_gb']} GiB")
        if res["tensorflow_imported"]:
            print("WARNING: TensorFlow was imported on the GPU path")
    p = res["peak_rss_mb"]
    print(f"peak RSS: {p['after_import']:.0f} MB after import, {p['after_compile_warmup']:.0f} "
          f"MB after compiling + warm-up (both models), {p['end']:.0f} MB at the end")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    notes = set_environment(args)  # before Keras is imported (in bench)
    res = bench(args, notes)
    emit_result(res, print_table, args.output_json)


if __name__ == "__main__":
    main()
