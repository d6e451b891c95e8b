"""Benchmark: can the tf.data training pipeline feed DRENet training? (CPU)

Not a test: it prints figures. In one run, at the SAME input size and batch size:

1. PIPELINE: slices/s of :func:`covid_keras.io.data.make_dataset` as training uses it
   (``training=True, repeat=True``; ``--backbone`` normalisation, flip / brightness /
   contrast augmentation plus ``--rotation`` degrees, batch ``--batch_size``) over data_prep
   TFRecords: ``--warmup_batches`` untimed, then at least ``--batches`` and
   ``--min_seconds`` timed (slices / wall time; the batches are the eager tensors the
   iterator yields, nothing copied). Each measurement is a fresh process pinned with
   ``taskset -c 0`` (1 core) and ``taskset -c 0,1`` (2 cores) (``os.sched_setaffinity``
   before TensorFlow is imported where there is no taskset: the same system call), so
   TensorFlow sizes its thread pools to the pinned cores; ``--repeats`` rounds, the core
   counts alternating, the median reported.
2. TRAIN: slices/s of a DRENet train step (:func:`covid_keras.model.drenet.build_drenet`,
   ``--variant`` paper, ResNet-50, ``weights=None``), ``compile(optimizer=SGD(8e-4,
   momentum=0.9))`` + ``train_on_batch`` on one synthetic in-memory batch (so input is not
   the bottleneck), in a fresh process on every allowed core: the first call (tracing) is
   timed apart, ``--train_warmup`` - 1 more untimed steps, then the median of
   ``--train_steps`` steps. ``jit_compile=False`` unless ``--jit on`` (XLA made CPU train
   steps ~2x slower, see bench/README.md).
3. RATIO = pipeline slices/s on 2 cores / train slices/s; the target is >= 5x on CPU. (When
   both share the CPU, the input side takes about 1 / ratio of the machine's CPU time.) Also
   the pipeline's slices/s per core, and the cores that would feed a GPU DRENet at
   ``--gpu_slices_s`` (290: the DESIGN's H100 target) = 290 / (slices/s per core, 1 core),
   and the same from CPU time (slices per CPU-second of the 1-core process).

Other jobs on the machine make wall-clock figures noisy and can hide the 2-core scaling:
every child reports its CPU seconds / wall seconds ("busy" cores), the 1-minute load
average is reported, and a CPU probe (one busy-looping process per core, ``--probe_seconds``)
before and after says how many cores the machine actually left to the benchmark.

Data: ``--data_dir`` (a data_prep output with a train split), or phantom studies
(``data_prep.phantom``: normal, covid, bacterial x ``--patients_per_kind``, ``--num_slices``
slices of 256x256) built into TFRecords by ``data_prep.build_tfrecords`` at
``--input_size`` (so nothing is resized when decoding), all in the train split; in a temp
dir unless ``--work_dir`` (kept and reused).

The defaults are 224 px, batch 4 (a DRENet train step at 448 px, batch 8 takes ~35 s on the
2-core CPU, its first call ~85 s); the pipeline figures for sizing a GPU host come from
``--input_size 448 --batch_size 8`` (~6 min).

Prints a table and one ``RESULT {json}`` line; ``--output_json`` also writes the JSON.

    .venv/bin/python bench/input.py                                   # ~2-3 min
    .venv/bin/python bench/input.py --input_size 448 --batch_size 8   # ~6 min
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/input.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from common import child_result, emit_result, print_child  # noqa: E402 (bench/common.py)

TARGET_RATIO = 5.0  # pipeline slices/s (2 cores) >= 5 x DRENet train slices/s
LEARNING_RATE, MOMENTUM = 8e-4, 0.9
KINDS = "normal,covid,bacterial"
# One busy-looping process: prints the CPU seconds it got in argv[1] wall seconds.
_SPIN = ("import sys, time\nend = time.perf_counter() + float(sys.argv[1])\n"
         "c0 = time.process_time()\nwhile time.perf_counter() < end:\n    pass\n"
         "print(time.process_time() - c0)")


# ------------------------------------------------------------------------------------------
# Children (fresh processes: pinned pipeline, training step)
# ------------------------------------------------------------------------------------------


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def child_pipeline(args: argparse.Namespace) -> dict:
    if args._cpus:  # no taskset: pin before TensorFlow is imported (same syscall)
        os.sched_setaffinity(0, {int(c) for c in args._cpus.split(",")})
    _quiet_tf()
    load0 = os.getloadavg()[0]
    import tensorflow as tf

    from covid_keras.io.data import PipelineConfig, make_dataset, shard_files

    # as the trainer feeds a new model (the spec of child_train's: it normalises its input)
    spec = {"input_size": args.input_size, "backbone": args.backbone,
            "include_preprocessing": True}
    cfg = PipelineConfig.for_model(spec, rotation_degrees=args.rotation, seed=0)
    files = shard_files(args.data_dir, "train")
    t0 = time.perf_counter()
    ds = make_dataset(args.data_dir, "train", args.batch_size, training=True, cfg=cfg,
                      repeat=True)
    it = iter(ds)
    first = None
    for i in range(args.warmup_batches):
        images, labels = next(it)
        if i == 0:
            first = time.perf_counter() - t0
    warm_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    n = wall = 0
    while n < args.batches or wall < args.min_seconds:
        images, labels = next(it)
        n += 1
        wall = time.perf_counter() - t0
    cpu = time.process_time() - c0  # every thread of this process
    want = (args.batch_size, args.input_size, args.input_size, 3)
    if tuple(images.shape) != want or images.dtype != tf.float32:
        raise AssertionError(f"pipeline batch {images.shape} {images.dtype}, want {want}")
    if not bool(tf.reduce_all(tf.math.is_finite(images))):
        raise AssertionError("non-finite pipeline output")
    slices = n * args.batch_size
    return {"cpus": sorted(os.sched_getaffinity(0)), "shards": len(files),
            "tf_threads": {"inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                           "intra_op": tf.config.threading.get_intra_op_parallelism_threads()},
            "first_batch_s": round(first, 3), "warmup_s": round(warm_s, 3),
            "timed_s": round(wall, 3), "slices": slices, "slices_s": round(slices / wall, 2),
            "cpu_s": round(cpu, 3), "cores_busy": round(cpu / wall, 2),
            "slices_per_cpu_s": round(slices / cpu, 2),
            "loadavg_1min": [load0, os.getloadavg()[0]], "tensorflow": tf.__version__}


def child_train(args: argparse.Namespace) -> dict:
    _quiet_tf()
    load0 = os.getloadavg()[0]
    import keras
    import numpy as np

    from covid_keras.model.drenet import build_drenet

    size, batch = args.input_size, args.batch_size
    t0 = time.perf_counter()
    model = build_drenet(args.num_classes, input_size=size, backbone=args.backbone,
                         weights=None, variant=args.variant, include_preprocessing=True)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
                  jit_compile=args.jit == "on")
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    # Pixel values 0..255 (what the pipeline yields: the model normalises them itself).
    x = rng.uniform(0.0, 255.0, size=(batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, args.num_classes, size=(batch,)).astype(np.int32)
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)

    cpu_times = []

    def step() -> float:
        t, c = time.perf_counter(), time.process_time()
        loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])  # synchronises
        if not math.isfinite(loss):
            raise FloatingPointError("non-finite DRENet loss")
        cpu_times.append(time.process_time() - c)
        return time.perf_counter() - t

    first = step()
    for _ in range(args.train_warmup - 1):
        step()
    times = [step() for _ in range(args.train_steps)]
    med = statistics.median(times)
    cpu = sum(cpu_times[-args.train_steps:])
    return {"cpus": sorted(os.sched_getaffinity(0)), "build_s": round(build_s, 2),
            "jit_compile": args.jit == "on", "first_call_s": round(first, 2),
            "steps_s": [round(t, 3) for t in times], "step_s": round(med, 3),
            "slices_s": round(batch / med, 3), "params": int(model.count_params()),
            "cores_busy": round(cpu / sum(times), 2),
            "loadavg_1min": [load0, os.getloadavg()[0]], "keras": keras.__version__}


# ------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------


def _child_cmd(args: argparse.Namespace, kind: str, cpus: str | None) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind,
           "--data_dir", str(args.data_dir)]
    for key in ("input_size", "batch_size", "backbone", "rotation", "warmup_batches",
                "batches", "min_seconds", "variant", "num_classes", "train_steps",
                "train_warmup", "jit"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if cpus is None:
        return cmd
    if shutil.which("taskset"):
        return ["taskset", "-c", cpus] + cmd
    return cmd + ["--_cpus", cpus]


def run_child(args: argparse.Namespace, kind: str, cpus: str | None) -> dict:
    return child_result(_child_cmd(args, kind, cpus), f"{kind} child (cpus {cpus})", REPO)


def cpu_probe(n: int, seconds: float) -> float:
    """Cores that ``n`` busy-looping processes obtain together (n when the machine is idle):
    how much of the CPU other jobs leave to this benchmark."""
    procs = [subprocess.Popen([sys.executable, "-S", "-c", _SPIN, str(seconds)],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    cpu = sum(float(p.communicate()[0]) for p in procs)
    return round(cpu / seconds, 2)


def make_data(args: argparse.Namespace, root: Path) -> tuple[Path, float]:
    """Phantom studies -> train-split TFRecords at --input_size; reused when present."""
    out = root / f"tfrecords_{args.input_size}px"
    if (out / "manifest.json").is_file():
        return out, 0.0
    t0 = time.perf_counter()
    studies = root / "studies"
    if not studies.is_dir():
        _run([sys.executable, "-m", "data_prep.phantom", f"--output_dir={studies}",
              f"--kinds={KINDS}", f"--patients_per_kind={args.patients_per_kind}",
              f"--num_slices={args.num_slices}", "--matrix=256"])
    _run([sys.executable, "-m", "data_prep.build_tfrecords", f"--input={studies}",
          f"--output_dir={out}", f"--image_size={args.input_size}",
          f"--workers={min(2, os.cpu_count() or 1)}", "--split_fractions=1,0,0"])
    return out, time.perf_counter() - t0


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")


def dataset_info(data_dir: Path) -> dict:
    """Train records, shards and size from the manifest (no TensorFlow in this process)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    files = sorted(glob.glob(str(data_dir / "train-*-of-*.tfrecord.gz")))
    if not files:
        raise FileNotFoundError(f"no train-*-of-*.tfrecord.gz shards in {data_dir}")
    records = sum(cell["slices"] for sites in manifest["counts"].get("train", {}).values()
                  for cell in sites.values())
    return {"records": records, "shards": len(files),
            "mb": round(sum(os.path.getsize(f) for f in files) / 2**20, 1),
            "image_size": manifest.get("flags", {}).get("image_size")}


def bench(args: argparse.Namespace, root: Path) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    allowed = sorted(os.sched_getaffinity(0))
    cores = [n for n in (1, 2) if n <= len(allowed)]
    if args.data_dir:
        data_dir, gen_s = Path(args.data_dir).resolve(), 0.0
    else:
        data_dir, gen_s = make_data(args, root)
    args.data_dir = data_dir
    info = dataset_info(data_dir)
    print(f"data: {data_dir}", flush=True)
    print(f"  {info['records']} train records in {info['shards']} shard(s), {info['mb']} MiB, "
          f"stored at {info['image_size']} px; built in {gen_s:.1f} s", flush=True)
    if info["image_size"] not in (None, args.input_size):
        print(f"  note: records are {info['image_size']} px, the pipeline resizes them to "
              f"{args.input_size}", flush=True)

    probe = {"start": cpu_probe(len(allowed), args.probe_seconds)}
    print(f"CPU probe: {len(allowed)} busy loops got {probe['start']:.2f} cores", flush=True)
    pipe: dict[int, list[dict]] = {n: [] for n in cores}
    for r in range(args.repeats):
        for n in (cores if r % 2 == 0 else cores[::-1]):
            cpus = ",".join(str(c) for c in allowed[:n])
            res = run_child(args, "pipeline", cpus)
            pipe[n].append(res)
            print(f"  pipeline on cpus {res['cpus']}: {res['slices_s']:.1f} slices/s "
                  f"({res['slices']} in {res['timed_s']:.1f} s, {res['cores_busy']:.2f} cores "
                  f"busy; warm-up {res['warmup_s']:.1f} s; load "
                  f"{res['loadavg_1min'][0]:.1f})", flush=True)
    print(f"  DRENet train step, {args.input_size} px, batch {args.batch_size} (first call "
          "is slow) ...", flush=True)
    train = run_child(args, "train", None)
    print(f"  DRENet train on cpus {train['cpus']}: {train['step_s']:.2f} s/step "
          f"({train['slices_s']:.2f} slices/s, {train['cores_busy']:.2f} cores busy; first "
          f"call {train['first_call_s']:.1f} s)", flush=True)

    probe["end"] = cpu_probe(len(allowed), args.probe_seconds)
    pipeline = {}
    for n, runs in pipe.items():
        rate = statistics.median(r["slices_s"] for r in runs)
        pipeline[str(n)] = {
            "slices_s": round(rate, 2), "per_core": round(rate / n, 2),
            "cores_busy": round(statistics.median(r["cores_busy"] for r in runs), 2),
            "slices_per_cpu_s": round(statistics.median(r["slices_per_cpu_s"] for r in runs),
                                      2),
            "runs_slices_s": [r["slices_s"] for r in runs], "cpus": runs[0]["cpus"],
            "tf_threads": runs[0]["tf_threads"]}
    top = pipeline[str(max(cores))]
    per_core = pipeline["1"]["per_core"]
    per_cpu_s = pipeline["1"]["slices_per_cpu_s"]
    ratio = top["slices_s"] / train["slices_s"]
    res = {
        "input_size": args.input_size, "batch_size": args.batch_size,
        "backbone": args.backbone, "rotation_degrees": args.rotation,
        "variant": args.variant,
        "pinning": "taskset" if shutil.which("taskset") else "sched_setaffinity",
        "warmup_batches": args.warmup_batches, "batches": args.batches,
        "min_seconds": args.min_seconds, "repeats": args.repeats,
        "data": {**info, "gen_s": round(gen_s, 1)},
        "pipeline": pipeline, "train": train,
        "ratio": {"pipeline_cores": max(cores), "value": round(ratio, 2),
                  "target": TARGET_RATIO, "met": bool(ratio >= TARGET_RATIO)},
        "gpu_sizing": {"gpu_slices_s": args.gpu_slices_s,
                       "pipeline_slices_s_per_core": per_core,
                       "cores_needed": round(args.gpu_slices_s / per_core, 1),
                       # From CPU time, not wall time: less sensitive to other jobs.
                       "pipeline_slices_per_cpu_s": per_cpu_s,
                       "cores_needed_cpu_time": round(args.gpu_slices_s / per_cpu_s, 1),
                       "at_input_size": args.input_size},
        "cpus_allowed": allowed, "tensorflow": pipe[1][0]["tensorflow"],
        "keras": train["keras"],
        "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "cpu_probe_cores": probe,
        "runtime_s": round(time.perf_counter() - t_start, 1)}
    if max(cores) == 2:
        res["pipeline_scaling_2_over_1"] = round(
            pipeline["2"]["slices_s"] / pipeline["1"]["slices_s"], 2)
    return res


def print_table(res: dict) -> None:
    print()
    print(f"input pipeline vs DRENet training: {res['input_size']} px, batch "
          f"{res['batch_size']}, {res['backbone']} normalisation,")
    print(f"  augmentation incl. rotation {res['rotation_degrees']:g} deg; pipeline pinned "
          f"with {res['pinning']}")
    head = (f"{'':<22}{'cpus':>5}{'slices/s':>10}{'per core':>10}{'busy':>6}{'per cpu-s':>11}"
            f"  runs (slices/s | s/step)")
    print(head)
    print("-" * len(head))
    for n, p in res["pipeline"].items():
        runs = ", ".join(f"{v:.1f}" for v in p["runs_slices_s"])
        print(f"{'tf.data pipeline':<22}{','.join(map(str, p['cpus'])):>5}"
              f"{p['slices_s']:>10.1f}{p['per_core']:>10.1f}{p['cores_busy']:>6.2f}"
              f"{p['slices_per_cpu_s']:>11.1f}  {runs}")
    t = res["train"]
    steps = ", ".join(f"{s:.2f}" for s in t["steps_s"])
    print(f"{'DRENet train_on_batch':<22}{','.join(map(str, t['cpus'])):>5}"
          f"{t['slices_s']:>10.2f}{'':>10}{t['cores_busy']:>6.2f}{'':>11}  {steps}")
    print("  (busy: CPU seconds of the process / wall seconds; per cpu-s: slices per CPU "
          "second)")
    print(f"  (DRENet: {res['variant']} variant, jit_compile={t['jit_compile']}, first call "
          f"{t['first_call_s']:.1f} s, median step {t['step_s']:.2f} s)")
    if "pipeline_scaling_2_over_1" in res:
        print(f"pipeline 2 cores / 1 core: {res['pipeline_scaling_2_over_1']:.2f}x")
    r = res["ratio"]
    print(f"ratio pipeline ({r['pipeline_cores']} cores) / training consumption: "
          f"{r['value']:.1f}x (target >= {r['target']:g}x: {'met' if r['met'] else 'NOT met'})")
    g = res["gpu_sizing"]
    print(f"to size a GPU host (DRENet at {g['gpu_slices_s']:g} slices/s): "
          f"{g['pipeline_slices_s_per_core']:.1f} slices/s per core -> "
          f"{g['cores_needed']:.1f} cores ({math.ceil(g['cores_needed'])})")
    print(f"  from CPU time: {g['pipeline_slices_per_cpu_s']:.1f} slices per CPU-second -> "
          f"{g['cores_needed_cpu_time']:.1f} cores ({math.ceil(g['cores_needed_cpu_time'])})")
    if g["at_input_size"] != 448:
        print(f"  (measured at {g['at_input_size']} px; a GPU DRENet runs at 448 px:")
        print("   run --input_size 448 --batch_size 8 for this figure)")
    load = res["loadavg_1min"]
    ncpu = len(res["cpus_allowed"])
    probe = res["cpu_probe_cores"]
    print(f"total runtime {res['runtime_s']:.0f} s; 1-min load average {load['start']:.1f} at "
          f"start, {load['end']:.1f} at end ({ncpu} CPUs)")
    print(f"CPU probe: {ncpu} busy loops got {probe['start']:.2f} cores at start, "
          f"{probe['end']:.2f} at end (idle machine: {ncpu})")
    if max(load.values()) > 0.5 * ncpu or min(probe.values()) < 0.8 * ncpu:
        print("NOTE: other processes were busy on this machine; the timings are noisy")
        print("      (the pinned cores were shared; the per cpu-s figures suffer least)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="tf.data training pipeline slices/s (1 and 2 pinned cores) vs DRENet "
                    "train-step slices/s, same input size and batch. Prints a table and a "
                    "RESULT {json} line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_size", type=int, default=224,
                   help="pipeline output and DRENet input side (448: the paper; ~6 min)")
    p.add_argument("--batch_size", type=int, default=4, help="pipeline and train batch")
    p.add_argument("--backbone", default="resnet50",
                   help="normalisation of the pipeline and DRENet's backbone")
    p.add_argument("--rotation", type=float, default=10.0, help="augmentation rotation, deg")
    p.add_argument("--data_dir", default=None,
                   help="existing data_prep TFRecords (train split); default: phantom data")
    p.add_argument("--work_dir", default=None,
                   help="where phantom data goes (kept and reused); default: a temp dir")
    p.add_argument("--patients_per_kind", type=int, default=4, help="phantom patients/kind")
    p.add_argument("--num_slices", type=int, default=60, help="phantom slices per series")
    p.add_argument("--warmup_batches", type=int, default=10, help="untimed pipeline batches")
    p.add_argument("--batches", type=int, default=40, help="timed pipeline batches (at least)")
    p.add_argument("--min_seconds", type=float, default=5.0,
                   help="time more batches until at least this long")
    p.add_argument("--repeats", type=int, default=2,
                   help="pipeline runs per core count (alternating); the median is reported")
    p.add_argument("--variant", choices=("paper", "code"), default="paper",
                   help="DRENet variant")
    p.add_argument("--num_classes", type=int, default=3)
    p.add_argument("--train_steps", type=int, default=3, help="timed train steps (median)")
    p.add_argument("--train_warmup", type=int, default=2,
                   help="untimed train steps incl. the first (tracing) call")
    p.add_argument("--jit", choices=("off", "on"), default="off",
                   help="DRENet jit_compile (XLA); off: oneDNN, faster on this CPU")
    p.add_argument("--gpu_slices_s", type=float, default=290.0,
                   help="GPU DRENet train slices/s to feed (DESIGN: H100 target)")
    p.add_argument("--probe_seconds", type=float, default=2.0,
                   help="CPU probe (busy loops, one per core) before and after")
    p.add_argument("--output_json", default=None, help="also write the RESULT JSON here")
    p.add_argument("--_child", choices=("pipeline", "train"), default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--_cpus", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch_size, args.batches, args.warmup_batches, args.repeats,
           args.train_steps, args.train_warmup, args.input_size) < 1:
        p.error("sizes, batches, repeats and steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child:
        fn = child_pipeline if args._child == "pipeline" else child_train
        print_child(fn(args))
        return
    if args.data_dir or args.work_dir:
        root = Path(args.work_dir or ".").resolve()
        if args.work_dir:
            root.mkdir(parents=True, exist_ok=True)
        res = bench(args, root)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
            res = bench(args, Path(tmp))
    emit_result(res, print_table, args.output_json)


if __name__ == "__main__":
    main()
