"""Benchmark: what a model could score without looking at the lungs (shortcut baseline).

Not a test. Public COVID-CT collections gather their classes from different sources
(figures from papers, hospital exports), and a source leaves traces in whole-image
statistics that have nothing to do with disease: brightness, contrast, saturated pixels,
black borders, sharpness. A model that scores no better than these statistics has not
shown that it reads the lungs. For each split of ``--data_dir`` (the records' images at
``--input_size``, before augmentation) this prints:

* the slice AUC of each statistic alone (above 0.5: higher in the positive class);
* a logistic regression on all the statistics, fitted on the train split, scored on every
  split (slice and patient AUC, patient = mean of its slices' probabilities).

Read the held-out rows beside the model's own held-out AUC (``bench/accuracy.py``): the
shortcut's val rows are what a checkpoint chosen on val could be rewarded for. Ends with a
table and a ``RESULT {json}`` line.

    .venv/bin/python bench/shortcuts.py --data_dir=tfrecords/covid_ct_holdout
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit_result, parser  # noqa: E402

STATISTICS = ("mean", "std", "black", "saturated", "center_mean", "sharpness")


def statistics(images) -> dict:
    """Whole-image statistics of uint8 images (N, S, S) or (N, S, S, C): one value each."""
    import numpy as np

    x = np.asarray(images, np.float32)
    if x.ndim == 4:
        x = x.mean(axis=-1)
    s = x.shape[1]
    c = slice(s // 4, s - s // 4)
    return {"mean": x.mean((1, 2)), "std": x.std((1, 2)), "black": (x < 5).mean((1, 2)),
            "saturated": (x > 250).mean((1, 2)), "center_mean": x[:, c, c].mean((1, 2)),
            "sharpness": np.abs(np.diff(x, axis=2)).mean((1, 2))}


def split_table(data_dir: str, input_size: int) -> dict:
    """split -> (features (N, F), labels (N,), patient keys); every split the folder has.
    One pass over each split's shards, a batch of images in memory at a time."""
    import numpy as np
    import tensorflow as tf

    from covid_keras.core import schema
    from covid_keras.io import data

    keys = (schema.IMAGE, schema.LABEL_INDEX, schema.PATIENT_KEY)
    spec = {k: v for k, v in schema.parse_spec().items() if k in keys}

    def parse(record):
        r = tf.io.parse_single_example(record, spec)
        return (data.decode_image(r[schema.IMAGE], input_size, rgb=False),
                r[schema.LABEL_INDEX], r[schema.PATIENT_KEY])

    manifest = data.read_manifest(data_dir)
    empty = set(manifest.get("empty_splits", []))
    order = {"train": 0, "val": 1, "test": 2}
    out = {}
    for split in sorted(manifest["counts"], key=lambda k: (order.get(k, 3), k)):
        if split in empty:
            continue
        files = data.shard_files(data_dir, split)
        feats, labels, patients = [], [], []
        for images, y, key in tf.data.TFRecordDataset(files, "GZIP").map(parse).batch(256):
            stats = statistics(images.numpy())
            feats.append(np.stack([stats[k] for k in STATISTICS], axis=1))
            labels.extend(y.numpy().tolist())
            patients.extend(k.decode() for k in key.numpy())
        out[split] = (np.concatenate(feats), np.asarray(labels, np.int64), patients)
    return out


def shortcut_aucs(table: dict, positive: int = 1) -> dict:
    """Per split: each statistic's slice AUC, and the train-fitted logistic regression's
    slice and patient AUC (one-vs-rest for ``positive``)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from covid_keras.evaluation import evaluation

    if "train" not in table:
        raise ValueError("The data folder has no train split to fit the shortcut model on")
    x_tr, y_tr, _ = table["train"]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    clf.fit(x_tr, (y_tr == positive).astype(int))
    res = {}
    for split, (x, y, keys) in table.items():
        yb = (np.asarray(y) == positive).astype(int)
        prob = clf.predict_proba(x)[:, 1]
        pats = evaluation.aggregate(np.stack([1 - prob, prob], 1), yb, keys, "mean", 1)
        res[split] = {
            "slices": int(len(yb)), "patients": int(len(pats.labels)),
            "statistic_slice_auc": {k: evaluation.auc_score(yb, x[:, i])
                                    for i, k in enumerate(STATISTICS)},
            "logistic_slice_auc": evaluation.auc_score(yb, prob),
            "logistic_patient_auc": evaluation.auc_score(pats.labels, pats.score)}
    return res


def print_table(res: dict) -> None:
    print(f"\n{res['data_dir']} at {res['input_size']} px: AUC of whole-image statistics "
          f"(positive class {res['positive']})")
    head = "".join(f"{k:>12}" for k in STATISTICS)
    print(f"{'split':<8}{'slices':>7}{head}{'logit slice':>13}{'logit pat.':>12}")
    for split, r in res["splits"].items():
        vals = "".join(f"{r['statistic_slice_auc'][k]:>12.3f}" for k in STATISTICS)
        print(f"{split:<8}{r['slices']:>7}{vals}{r['logistic_slice_auc']:>13.3f}"
              f"{r['logistic_patient_auc']:>12.3f}")


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--data_dir", required=True, help="A data_prep output folder.")
    p.add_argument("--input_size", type=int, default=128, help="Side the images are read at.")
    p.add_argument("--positive", type=int, default=1, help="Positive class index.")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    from covid_keras.core.cli import import_tensorflow_quietly

    import_tensorflow_quietly()  # TensorFlow's start-up notices off stderr
    res = {"data_dir": args.data_dir, "input_size": args.input_size,
           "positive": args.positive,
           "splits": shortcut_aucs(split_table(args.data_dir, args.input_size), args.positive)}
    emit_result(res, print_table, args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
