"""Benchmark: per-study preprocessing (decode only the sampled slices) vs decoding it all.

Not a test: it prints figures. Phantom studies (synthetic, real DICOM files written by
:func:`data_prep.phantom.write_series`) of 512x512 slices, at two series lengths
(default 100 and 300 slices), go through

* OURS: :func:`data_prep.study.scan_study` (headers only) + :func:`process_study` (decodes
  the 15 sampled slices), default ``PrepConfig()``, split "val";
* NAIVE: the usual way (e.g. the Kaggle "load_scan / get_pixels_hu" tutorials): read every
  file with ``pydicom.dcmread`` (pixels too), sort by ImagePositionPatient (projected on the
  slice normal, as ours), stack every slice's HU (stored x slope + intercept, clipped as
  ours) into a float32 volume, then the same ``sample_indices`` + ``prepare_slice`` + PNG
  encoding on the 15 sampled slices. The only difference: decoding everything.

Timing: page cache warmed first (every file read once), one untimed warm-up run per
method, then ``--repeats`` rounds over every study with the two methods interleaved (the
order alternates per round); the median seconds per study is reported, and naive/ours.

Memory: for each method and length, a fresh process (this script with a hidden flag)
imports everything, runs a tiny warm-up study (so lazy imports are in the baseline), reads
``ru_maxrss``, processes one study and reads ``ru_maxrss`` again; the difference is the
peak memory the study cost.

The phantom files are uncompressed (explicit VR little endian), where "decoding" is little
more than a copy: ``--compress j2k`` (or ``rle``) re-encodes them first, as many archives
store CT.

Prints a table and one ``RESULT {json}`` line; ``--output_json`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

_START_MAXRSS_KB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before heavy imports
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/prep.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from common import child_result, emit_result, print_child  # noqa: E402 (bench/common.py)
from pydicom.uid import JPEG2000Lossless, RLELossless  # noqa: E402

from covid_keras.core import schema  # noqa: E402
from data_prep import dicom_io, phantom  # noqa: E402
from data_prep.preprocess import PrepConfig, prepare_slice, sample_indices  # noqa: E402
from data_prep.study import (  # noqa: E402
    ScanConfig,
    StudyTask,
    encode_png,
    list_files,
    process_study,
    scan_study,
)

KIND = "covid"
PIXEL_SPACING_MM = 0.7
SLICE_THICKNESS_MM = 1.0
SPLIT = "val"
SCAN_CFG = ScanConfig(salt=b"x" * 32)
WARMUP_SLICES, WARMUP_MATRIX = 16, 64


# ------------------------------------------------------------------------------------------
# The two methods
# ------------------------------------------------------------------------------------------


def run_ours(study_dir: str) -> dict:
    """scan_study + process_study; returns timings and the records' images."""
    task = StudyTask(study_id=os.path.basename(study_dir), path=study_dir, label=KIND)
    t0 = time.perf_counter()
    scan = scan_study(task, SCAN_CFG)
    t1 = time.perf_counter()
    result = process_study(scan, SPLIT, 0, SCAN_CFG, PrepConfig(), seed=0)
    t2 = time.perf_counter()
    error = result.error or scan.error
    if error is not None:
        raise RuntimeError(f"pipeline failed on {study_dir}: {error}")
    return {"total_s": t2 - t0, "read_s": t1 - t0, "prep_s": t2 - t1,
            "slice_count": scan.slice_count,
            "kept": [int(r[schema.SLICE_INDEX]) for r in result.records],
            "images": [r[schema.IMAGE] for r in result.records],
            "dropped": dict(result.dropped)}


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    hu = ds.pixel_array.astype(np.float32) * np.float32(float(ds.RescaleSlope))
    hu += np.float32(float(ds.RescaleIntercept))
    np.clip(hu, dicom_io.HU_MIN, dicom_io.HU_MAX, out=hu)
    return hu


def run_naive(study_dir: str) -> dict:
    """Decode every slice, then the same sampling and preprocessing."""
    t0 = time.perf_counter()
    slices = [pydicom.dcmread(f) for f in list_files(study_dir)]
    normal = dicom_io.slice_normal(tuple(float(v) for v in slices[0].ImageOrientationPatient))
    slices.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in
                                                      ds.ImagePositionPatient])))
    volume = np.stack([_hu(ds) for ds in slices])
    spacing = float(slices[0].PixelSpacing[0])
    t1 = time.perf_counter()
    prep = PrepConfig()
    kept, images, dropped = [], [], {}
    for i in sample_indices(len(volume), SCAN_CFG.num_slices, SCAN_CFG.sampling):
        p = prepare_slice(volume[i], prep, pixel_spacing_mm=spacing, is_train=False)
        if isinstance(p, str):
            dropped[p] = dropped.get(p, 0) + 1
            continue
        images.append(encode_png(p.image))
        encode_png(p.mask)
        kept.append(i)
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "read_s": t1 - t0, "prep_s": t2 - t1,
            "slice_count": len(volume), "kept": kept, "images": images, "dropped": dropped}


METHODS = {"ours": run_ours, "naive": run_naive}


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


# --compress: the phantom writes explicit VR little endian (no compression); archives often
# hold JPEG 2000 or RLE, where decoding every slice costs much more.
COMPRESSION = {"none": None, "j2k": JPEG2000Lossless, "rle": RLELossless}


def make_study(path: Path, num_slices: int, matrix: int, seed: int, compress: str) -> str:
    """Writes the phantom series unless a complete one is already there (--work_dir reuse)."""
    marker = path / ".complete"
    stamp = f"{num_slices}/{matrix}/{seed}/{compress}"
    if marker.exists() and marker.read_text() == stamp:
        return str(path)
    if path.exists():
        shutil.rmtree(path)
    paths = phantom.write_series(path, kind=KIND, num_slices=num_slices, matrix=matrix,
                                 pixel_spacing_mm=PIXEL_SPACING_MM,
                                 slice_thickness_mm=SLICE_THICKNESS_MM, seed=seed,
                                 patient_id=f"BENCH-{num_slices}-{seed}")
    uid = COMPRESSION[compress]
    if uid is not None:
        for f in paths:
            ds = pydicom.dcmread(f)
            ds.compress(uid)
            ds.save_as(f, enforce_file_format=True)
    marker.write_text(stamp)
    return str(path)


def warm_page_cache(dirs: list[str]) -> int:
    total = 0
    for d in dirs:
        for f in list_files(d):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    return total


# ------------------------------------------------------------------------------------------
# Memory (fresh process per measurement)
# ------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_memory(method: str, study_dir: str, warmup_dir: str) -> None:
    run = METHODS[method]
    run(warmup_dir)  # lazy imports (pixel handlers, cv2 paths) belong to the baseline
    gc.collect()
    base = _maxrss_mb()
    out = run(study_dir)
    peak = _maxrss_mb()
    print_child({"start_mb": _START_MAXRSS_KB / 1024.0, "baseline_mb": base, "peak_mb": peak,
                 "delta_mb": peak - base, "kept": len(out["kept"])})


# Linux carries ru_maxrss into a child: a forked child starts at the parent's current RSS,
# and a vfork+exec child (what subprocess and posix_spawn do) inherits the parent's *peak*,
# which here is the phantom volumes and the naive runs (about 1 GB). So the child is
# started by a small launcher process: its own peak is all the child inherits.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def measure_memory(method: str, study_dir: str, warmup_dir: str) -> dict:
    cmd = [sys.executable, "-S", "-c", _LAUNCHER, sys.executable, os.path.abspath(__file__),
           "--_child", method, study_dir, warmup_dir]
    return child_result(cmd, "memory child")


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds and peak memory per study: data_prep (decode only the sampled "
                    "slices) vs decoding the whole series. Synthetic phantom DICOM studies.")
    p.add_argument("--studies", type=int, default=2, help="phantom studies per length")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over every study")
    p.add_argument("--slices", type=int, nargs=2, default=[100, 300], metavar=("SHORT", "LONG"),
                   help="series lengths (memory ratio is LONG/SHORT)")
    p.add_argument("--matrix", type=int, default=512, help="rows = columns of each slice")
    p.add_argument("--compress", choices=sorted(COMPRESSION), default="none",
                   help="re-encode the phantom files: none (explicit VR little endian, as "
                        "written), j2k (JPEG 2000 lossless), rle (RLE lossless)")
    p.add_argument("--work_dir", default=None,
                   help="where the studies go (kept and reused); default: a temp dir, removed")
    p.add_argument("--output_json", default=None, help="also write the RESULT JSON here")
    p.add_argument("--skip_memory", action="store_true", help="timings only")
    p.add_argument("--_child", nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def bench(args: argparse.Namespace, root: Path) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    lengths = list(args.slices)
    studies: dict[int, list[str]] = {}
    for n in lengths:
        studies[n] = [make_study(root / f"s{n}x{args.matrix}_{args.compress}_{k}", n,
                                 args.matrix, seed=k, compress=args.compress)
                      for k in range(args.studies)]
    warmup = make_study(root / f"warmup{WARMUP_SLICES}x{WARMUP_MATRIX}_{args.compress}",
                        WARMUP_SLICES, WARMUP_MATRIX, seed=0, compress=args.compress)
    t_gen = time.perf_counter() - t_start
    all_dirs = [d for n in lengths for d in studies[n]]
    cached = warm_page_cache(all_dirs + [warmup])
    print(f"studies ready in {t_gen:.1f} s ({cached / 2**20:.0f} MiB, page cache warmed)",
          flush=True)

    # Untimed warm-up, and the check that both methods produce the same images.
    identical = True
    for n in lengths:
        a, b = run_ours(studies[n][0]), run_naive(studies[n][0])
        if a["images"] != b["images"]:
            identical = False
            print(f"WARNING: {n} slices: ours and naive images differ "
                  f"(ours kept {len(a['images'])}, naive kept {len(b['images'])}; "
                  f"dropped ours {a['dropped']} naive {b['dropped']})")
    samples = {n: {m: {"total_s": [], "read_s": [], "prep_s": []} for m in METHODS}
               for n in lengths}
    kept: dict[int, dict] = {}
    for r in range(args.repeats):
        order = list(METHODS) if r % 2 == 0 else list(METHODS)[::-1]
        for n in lengths:
            for d in studies[n]:
                for m in order:
                    gc.collect()
                    out = METHODS[m](d)
                    for k in ("total_s", "read_s", "prep_s"):
                        samples[n][m][k].append(out[k])
                    kept[n] = {"kept": len(out["kept"]), "dropped": out["dropped"]}
                    del out
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    timing = {}
    for n in lengths:
        row = {}
        for m in METHODS:
            row[m] = {k: _median(v) for k, v in samples[n][m].items()}
            row[m]["min_total_s"] = min(samples[n][m]["total_s"])
            row[m]["samples_s"] = [round(v, 4) for v in samples[n][m]["total_s"]]
        row["ratio_naive_over_ours"] = row["naive"]["total_s"] / row["ours"]["total_s"]
        row["ratio_of_mins"] = row["naive"]["min_total_s"] / row["ours"]["min_total_s"]
        row.update(kept[n])
        timing[str(n)] = row

    memory = {}
    if not args.skip_memory:
        for m in METHODS:
            memory[m] = {}
            for n in lengths:
                memory[m][str(n)] = measure_memory(m, studies[n][0], warmup)
                print(f"memory {m} {n} slices: {memory[m][str(n)]['delta_mb']:.1f} MB",
                      flush=True)
            short, long_ = (memory[m][str(n)]["delta_mb"] for n in lengths)
            memory[m]["ratio_long_over_short"] = long_ / short if short > 0 else None

    return {
        "config": {"studies_per_length": args.studies, "repeats": args.repeats,
                   "slices": lengths, "matrix": args.matrix, "kind": KIND,
                   "compress": args.compress,
                   "pixel_spacing_mm": PIXEL_SPACING_MM,
                   "slice_thickness_mm": SLICE_THICKNESS_MM, "split": SPLIT,
                   "num_slices_sampled": SCAN_CFG.num_slices, "sampling": SCAN_CFG.sampling,
                   "cpus": os.cpu_count(), "python": sys.version.split()[0],
                   "pydicom": pydicom.__version__, "numpy": np.__version__,
                   "opencv": cv2.__version__},
        "identical_outputs": identical,
        "time_per_study": timing,
        "peak_memory": memory,
        "runtime_s": time.perf_counter() - t_start,
        # Other processes on the machine make the timings noisy: look at the load.
        "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }


def print_table(res: dict) -> None:
    cfg = res["config"]
    lengths = cfg["slices"]
    print()
    print(f"Study preprocessing, {cfg['matrix']}x{cfg['matrix']} phantom DICOM "
          f"({cfg['kind']}, {cfg['pixel_spacing_mm']} mm pixels, "
          f"{cfg['slice_thickness_mm']} mm slices, compression {cfg['compress']}), "
          f"{cfg['num_slices_sampled']} sampled, split {cfg['split']}")
    print(f"{cfg['studies_per_length']} studies per length x {cfg['repeats']} repeats, "
          f"warm page cache, {cfg['cpus']} CPUs; median seconds per study "
          "(read = headers/decode/HU, prep = prepare_slice + PNG)")
    print()
    head = (f"{'slices':>6}  {'ours s':>7} {'(read':>6} {'+ prep)':>7}  "
            f"{'naive s':>7} {'(read':>6} {'+ prep)':>7}  {'naive/ours':>10}  "
            f"{'min: ours':>9} {'naive':>6} {'ratio':>6}  kept")
    print(head)
    print("-" * len(head))
    for n in lengths:
        t = res["time_per_study"][str(n)]
        o, v = t["ours"], t["naive"]
        print(f"{n:>6}  {o['total_s']:>7.3f} {o['read_s']:>6.3f} {o['prep_s']:>7.3f}  "
              f"{v['total_s']:>7.3f} {v['read_s']:>6.3f} {v['prep_s']:>7.3f}  "
              f"{t['ratio_naive_over_ours']:>9.1f}x  "
              f"{o['min_total_s']:>9.3f} {v['min_total_s']:>6.3f} {t['ratio_of_mins']:>5.1f}x  "
              f"{t['kept']}/{cfg['num_slices_sampled']}")
    print(f"outputs identical (ours vs naive images): {res['identical_outputs']}")
    if res["peak_memory"]:
        print()
        print("Peak memory of one study above the post-import baseline (ru_maxrss, fresh "
              "process), MB")
        short, long_ = lengths
        head = f"{'method':>6}  {short:>8}  {long_:>8}  {f'{long_}/{short}':>8}"
        print(head)
        print("-" * len(head))
        for m, row in res["peak_memory"].items():
            ratio = row["ratio_long_over_short"]
            print(f"{m:>6}  {row[str(short)]['delta_mb']:>8.1f}  "
                  f"{row[str(long_)]['delta_mb']:>8.1f}  "
                  f"{'n/a' if ratio is None else f'{ratio:.2f}':>8}")
        base = [row[str(n)]["baseline_mb"] for row in res["peak_memory"].values()
                for n in lengths]
        print(f"(post-import baselines {min(base):.0f}-{max(base):.0f} MB, not included)")
    long_t = res["time_per_study"][str(lengths[1])]["ratio_naive_over_ours"]
    print()
    print(f"target naive/ours >= 5x at {lengths[1]} slices: "
          f"{'met' if long_t >= 5 else 'NOT met'} ({long_t:.1f}x)")
    if res["peak_memory"]:
        r = res["peak_memory"]["ours"]["ratio_long_over_short"]
        print(f"target ours memory {lengths[1]}/{lengths[0]} ~ 1.0: "
              f"{'n/a' if r is None else f'{r:.2f}'}")
    load = res["loadavg_1min"]
    print(f"total runtime {res['runtime_s']:.0f} s; 1-min load average {load['start']:.1f} "
          f"at start, {load['end']:.1f} at end ({cfg['cpus']} CPUs)")
    if max(load.values()) > 0.5 * (cfg["cpus"] or 1):
        print("NOTE: other processes were busy on this machine; the timings are noisy "
              "(the min columns are the least disturbed)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child:
        child_memory(*args._child)
        return
    if args.work_dir:
        root = Path(args.work_dir)
        root.mkdir(parents=True, exist_ok=True)
        res = bench(args, root)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_prep_") as tmp:
            res = bench(args, Path(tmp))
    emit_result(res, print_table, args.output_json)


if __name__ == "__main__":
    main()
