"""Benchmark: a trained model's accuracy on its training split, inference vs training mode.

Not a test: it reads trained runs. Batch norm normalises by the batch's statistics in
training and by moving averages at inference; when the two disagree (stale moving
statistics, or one set of statistics blended from DRENet's three unlike inputs: the image,
the region crops, the almost-blank generated image) the model users get is not the model
that trained. For each ``--run_dirs`` entry this loads ``--model_file`` (default
``final.keras``), reads the ``--split`` (default train) without augmentation, and computes
the slice accuracy of ``logits``:

* inference mode: ``model.predict`` (moving statistics; dropout off);
* training mode: ``model(batch, training=True)`` over shuffled batches of
  ``--batch_size`` (the batch's statistics, as in training) with dropout set to 0, so that
  only batch norm differs.

The target (issue "DRENet that learns"): inference within 2 points of training mode.
Ends with a table and a ``RESULT {json}`` line (``--output_json`` writes it too).

    .venv/bin/python bench/bn_modes.py --data_dir=tfrecords/covid_ct_holdout \\
        --run_dirs=runs/accuracy/covid_ct_drenet/seed0,runs/accuracy/covid_ct_resnet50/seed0
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit_result, parser  # noqa: E402


def accuracies(run_dir: str, data_dir: str, split: str, batch_size: int,
               model_file: str) -> dict:
    import keras
    import numpy as np

    from covid_keras.io import data
    from covid_keras.io.run_dir import RunDir

    run = RunDir(run_dir)
    model = run.load_model(model_file, compile=True)
    # the model's input size and backbone, normalised input only for an old model
    cfg = data.PipelineConfig.for_model(run.model_spec(model_file))
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    # Shuffled as in training (records are stored patient by patient: an ordered batch
    # normalised by its own statistics would lose the label it shares), not augmented.
    ds = data.make_dataset(data_dir, split, 256, training=False, cfg=cfg).unbatch().shuffle(
        100_000, seed=0).batch(batch_size)
    right_inf = right_train = n = 0
    for images, labels in ds:
        y = labels.numpy()
        inf = model.predict_on_batch(images)
        inf = inf["logits"] if isinstance(inf, dict) else inf
        tr = model(images, training=True)
        tr = tr["logits"] if isinstance(tr, dict) else tr
        right_inf += int((np.argmax(np.asarray(inf), -1) == y).sum())
        right_train += int((np.argmax(np.asarray(tr), -1) == y).sum())
        n += len(y)
    return {"run_dir": run_dir, "slices": n, "inference_accuracy": right_inf / n,
            "training_mode_accuracy": right_train / n,
            "gap_points": 100.0 * (right_train - right_inf) / n}


def print_table(res: dict) -> None:
    print(f"\n{res['split']} split, batch {res['batch_size']}: slice accuracy of `logits`")
    print(f"{'run':<60} {'inference':>10} {'training':>10} {'gap (pts)':>10}")
    for r in res["runs"]:
        print(f"{r['run_dir'][-60:]:<60} {r['inference_accuracy']:>10.3f} "
              f"{r['training_mode_accuracy']:>10.3f} {r['gap_points']:>10.1f}")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--data_dir", required=True, help="The runs' data_prep output.")
    p.add_argument("--run_dirs", required=True, help="Comma-separated training run folders.")
    p.add_argument("--split", default="train")
    p.add_argument("--batch_size", type=int, default=8, help="The runs' training batch.")
    p.add_argument("--model_file", default="final.keras")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    runs = [accuracies(r, args.data_dir, args.split, args.batch_size, args.model_file)
            for r in args.run_dirs.split(",") if r]
    emit_result({"split": args.split, "batch_size": args.batch_size, "runs": runs},
                print_table, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
