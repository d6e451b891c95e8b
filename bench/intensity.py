"""Benchmark: how much trained models' AUC depends on the images' overall brightness.

Not a test. A source that windows or exports its slices a little brighter or darker should
not change a diagnosis. For each run folder in ``--runs`` this scores its chosen checkpoint
(``best.keras``) on ``--split`` of ``--data_dir`` several times, with every image changed
the same way:

* ``x<f>`` for each of ``--factors``: the pixel values times f, clipped to 0-255 (black
  stays black; a brighter or darker export of the same slice);
* ``matched``: each image scaled so that its mean is the split's mean (the brightness cue
  taken away, the pattern kept).

It prints slice and patient AUC (patient = mean of its slices' probabilities) per run and
change, and the largest move from ``x1``. A model that reads the lungs moves little; a
model with ``--input_norm=per_image`` moves only through clipping and rounding. Ends with a
table and a ``RESULT {json}`` line. The split's images are held in memory.

    .venv/bin/python bench/intensity.py --data_dir=tfrecords/covid_ct_holdout \\
        --runs=runs/acc/ref/covid_ct_drenet/seed0,runs/acc/ref/covid_ct_drenet/seed2
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit_result, parser  # noqa: E402


def changed_images(images_u8, factors) -> dict:
    """name -> uint8 images: ``x<f>`` per factor, and ``matched`` (each image's mean moved
    to the mean over all images by scaling)."""
    import numpy as np

    x = np.asarray(images_u8, np.float32)
    out = {f"x{f:g}": np.clip(np.rint(x * f), 0, 255).astype(np.uint8) for f in factors}
    means = x.mean(axis=tuple(range(1, x.ndim)), keepdims=True)
    scale = x.mean() / np.maximum(means, 1e-6)
    out["matched"] = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    return out


def aucs(probs, labels, patient_keys, positive: int) -> dict:
    """Slice and patient (mean rule) AUC of the positive class."""
    import numpy as np

    from covid_keras.evaluation.decision import aggregate
    from covid_keras.evaluation.metrics import auc_score

    probs = np.asarray(probs, np.float64)
    patients = aggregate(probs, labels, patient_keys, "mean", positive)
    return {"slice_auc": auc_score(labels == positive, probs[:, positive]),
            "patient_auc": auc_score(patients.labels == positive, patients.score)}


def sensitivity(predict, images_u8, labels, patient_keys, positive: int, factors) -> dict:
    """change -> AUCs, plus ``max_move``: the largest |AUC - AUC at x1| over the changes.
    ``predict``: uint8 images (N, S, S, 3) -> class probabilities (N, C)."""
    rows = {name: aucs(predict(imgs), labels, patient_keys, positive)
            for name, imgs in changed_images(images_u8, sorted(set(factors) | {1.0})).items()}
    base = rows["x1"]
    moves = [abs(r[k] - base[k]) for r in rows.values() for k in base]
    return {"changes": rows, "max_move": max(moves)}


def model_predictor(run_dir: str, batch_size: int):
    """(predict function, run's flags, its classes) for ``run_dir/best.keras``."""
    import numpy as np

    from covid_keras.evaluation import evaluation
    from covid_keras.io import data
    from covid_keras.io.run_dir import BEST, RunDir

    run = RunDir(run_dir)
    info = run.run_info()
    flags = info["flags"]
    model = run.load_model(BEST, compile=True)
    # normalised input only for a model without its own normalisation layer (old runs)
    cfg = data.PipelineConfig.for_model(run.model_spec(BEST))

    def predict(images_u8, masks=None):
        # masks: a lung model's (navigator_anchors=lung) records' lung masks, which the
        # brightness change leaves as they are
        x = np.asarray(data.model_input(images_u8, cfg))
        if cfg.lung_mask:
            x = {data.IMAGE_INPUT: x, data.LUNG_MASK_INPUT: masks}
        out = model.predict(x, batch_size=batch_size, verbose=0)
        logits = out["logits"] if isinstance(out, dict) else out
        return evaluation.softmax(np.asarray(logits, np.float64))

    return predict, flags, info["classes"], cfg.lung_mask


def run(data_dir: str, runs: list[str], split: str, factors, batch_size: int) -> dict:
    import numpy as np

    from covid_keras.evaluation import evaluation
    from covid_keras.io import data

    res = {"data_dir": data_dir, "split": split, "runs": {}}
    cache: dict = {}
    for run_dir in runs:
        predict, flags, classes, lung = model_predictor(run_dir, batch_size)
        size = int(flags["input_size"])
        if size not in cache:
            cfg = data.PipelineConfig(input_size=size, backbone=flags["backbone"])
            sp = evaluation.SplitPredictor(data_dir, split, batch_size, cfg)
            shown = sp.images_u8(range(len(sp)))
            cache[size] = (np.stack([shown[i] for i in range(len(sp))]), sp.labels,
                           sp.patient_keys, sp)
        images, labels, keys, sp = cache[size]
        if lung:  # the records' masks, aligned with the images
            found = sp.model_masks(range(len(sp)))
            masks = np.stack([found[i] for i in range(len(sp))])
            predict = functools.partial(predict, masks=masks)
        res["runs"][run_dir] = sensitivity(predict, images, labels, keys,
                                           evaluation.positive_index(classes), factors)
        res["runs"][run_dir]["input_norm"] = flags.get("input_norm", "none")
    return res


def print_table(res: dict) -> None:
    for run_dir, r in res["runs"].items():
        print(f"\n{run_dir} (input_norm {r['input_norm']}), {res['split']} split: "
              f"largest move {r['max_move']:.3f}")
        print(f"  {'change':<9} {'slice AUC':>9} {'patient AUC':>11}")
        for name, a in r["changes"].items():
            print(f"  {name:<9} {a['slice_auc']:>9.3f} {a['patient_auc']:>11.3f}")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--data_dir", required=True, help="TFRecord folder (data_prep output)")
    p.add_argument("--runs", required=True,
                   help="comma-separated run folders, each with best.keras and run_info.json")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--factors", default="0.8,0.9,1.1,1.2",
                   help="comma-separated brightness factors (1 is always added)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--output_json", help="also write the RESULT json here")
    args = p.parse_args(argv)
    factors = [float(f) for f in args.factors.split(",") if f.strip()]
    if any(f <= 0 for f in factors):
        p.error(f"--factors must be > 0. Received: {args.factors}")
    runs = [r for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if not (Path(r) / "best.keras").is_file():
            p.error(f"{r}: no best.keras (not a finished run folder)")
    from covid_keras.core.cli import import_keras_quietly

    import_keras_quietly()  # TensorFlow's start-up notices off stderr
    emit_result(run(args.data_dir, runs, args.split, factors, args.batch_size), print_table,
                args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
