"""Export data_prep's TFRecords to one ``.npz`` for machines without TensorFlow (the GPU
machine runs JAX only): ``bench/accuracy_jax.py`` reads it.

Per split ``<s>`` (every split the folder has): ``<s>_images`` uint8 (N, S, S, C), the
record's own decoded PNG (windowed slice, C = windows, before any augmentation or
normalisation; resized to ``--image_size`` when given), ``<s>_labels`` int32 (N,),
``<s>_patients`` int32 (N,): a patient number, unique within the file, in order of first
appearance (the records' pseudonymous keys are not copied). Plus ``classes`` and
``image_size``, and per patient number (index) what ``train --folds`` makes its folds
from: ``patient_label`` and ``patient_site`` (the stratum) and ``patient_order`` (the
digest of its records' salt-free content, the order within a stratum), so that
``bench/accuracy_jax.py --folds`` trains the same folds. Written compressed, atomically.

    .venv/bin/python bench/export_npz.py --data_dir=tfrecords/covid_ct_holdout \\
        --output=covid_ct_holdout.npz
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", required=True, help="data_prep output folder (TFRecords)")
    p.add_argument("--output", required=True, help=".npz file to write")
    p.add_argument("--image_size", type=int, default=0,
                   help="resize every slice to this side (0: keep the records' size)")
    return p.parse_args(argv)


def export(data_dir: str, output: str, image_size: int = 0) -> dict:
    from covid_keras.core import cli

    tf = cli.import_tensorflow_quietly()  # no start-up notices on stderr
    from covid_keras.core import schema
    from covid_keras.io import data
    from covid_keras.training import folds

    manifest = data.read_manifest(data_dir)
    arrays: dict[str, np.ndarray] = {"classes": np.asarray(manifest["classes"]),}
    patient_numbers: dict[bytes, int] = {}
    counts = {}
    for split in schema.SPLITS:
        try:
            files = data.shard_files(data_dir, split)
        except FileNotFoundError:
            continue
        images, labels, patients = [], [], []
        ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
        for raw in ds:
            r = tf.io.parse_single_example(raw, schema.parse_spec())
            img = tf.io.decode_png(r[schema.IMAGE], channels=0)
            if image_size and img.shape[0] != image_size:
                img = tf.cast(tf.image.resize(img, [image_size, image_size], antialias=True)
                              + 0.5, tf.uint8)
            images.append(img.numpy())
            labels.append(int(r[schema.LABEL_INDEX]))
            key = r[schema.PATIENT_KEY].numpy()
            patients.append(patient_numbers.setdefault(key, len(patient_numbers)))
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.asarray(labels, np.int32)
        arrays[f"{split}_patients"] = np.asarray(patients, np.int32)
        counts[split] = {"slices": len(labels), "patients": len(set(patients))}
    if not counts:
        raise SystemExit(f"{data_dir}: no TFRecord shards")
    # train --folds's table (label, site) and order (content digest) of every patient
    table, order = folds.patients_and_order(data_dir, list(counts))
    by_number = sorted(patient_numbers.items(), key=lambda kv: kv[1])
    arrays["patient_label"] = np.asarray([table[k.decode()][0] for k, _ in by_number])
    arrays["patient_site"] = np.asarray([table[k.decode()][1] for k, _ in by_number])
    arrays["patient_order"] = np.asarray([order[k.decode()] for k, _ in by_number])
    arrays["image_size"] = np.asarray(next(a for k, a in arrays.items()
                                           if k.endswith("_images")).shape[1])
    tmp = output + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, output)
    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = export(args.data_dir, args.output, args.image_size)
    size = os.path.getsize(args.output) / 2**20
    print(f"{args.output}: {counts}, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
