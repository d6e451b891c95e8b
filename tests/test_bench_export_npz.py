"""bench/export_npz.py: data_prep's records to the .npz that bench/accuracy_jax.py reads."""

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_every_split_exported_with_patient_numbers_and_no_keys(tmp_path):
    import tensorflow as tf

    from covid_keras.core import schema
    from covid_keras.io import data
    from tests.helpers import assert_no_tf_notices, user_env, write_dataset

    folder = write_dataset(tmp_path / "tfrecords", {"train": 3, "val": 2, "test": 2})
    out = tmp_path / "d.npz"
    proc = subprocess.run([sys.executable, "bench/export_npz.py", f"--data_dir={folder}",
                           f"--output={out}", "--image_size=32"], cwd=REPO, env=user_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_no_tf_notices(proc.stderr)
    d = np.load(out)
    assert list(d["classes"]) == data.read_manifest(str(folder))["classes"]
    numbers = set()
    for split in ("train", "val", "test"):
        want_labels, want_keys = [], []
        for raw in tf.data.TFRecordDataset(data.shard_files(str(folder), split), "GZIP"):
            r = tf.io.parse_single_example(raw, schema.parse_spec())
            want_labels.append(int(r[schema.LABEL_INDEX]))
            want_keys.append(r[schema.PATIENT_KEY].numpy())
        images, labels, pats = (d[f"{split}_{k}"] for k in ("images", "labels", "patients"))
        assert images.dtype == np.uint8 and images.shape[1:3] == (32, 32)
        assert len(images) == len(want_keys) and list(labels) == want_labels
        # one number per patient key, the same grouping as the keys, never the key itself
        assert len(set(zip(pats, want_keys))) == len(set(want_keys)) == len(set(pats))
        assert pats.dtype == np.int32
        numbers |= set(pats.tolist())
    assert numbers == set(range(len(numbers)))  # unique within the file, numbered from 0
    # train --folds's table and order, per patient number: no key, a label, a site, a digest
    assert len(d["patient_label"]) == len(d["patient_site"]) == len(d["patient_order"]) \
        == len(numbers)
    assert set(d["patient_label"].tolist()) <= set(d["classes"].tolist())
    assert all(len(str(o)) == 64 for o in d["patient_order"])
    assert int(d["image_size"]) == 32
