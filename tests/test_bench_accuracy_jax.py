"""bench/accuracy_jax.py: the NumPy input pipeline mirrors the trainer's augmentation, and a
flagfile's model and augmentation flags reach the JAX runs (a run on a small .npz). The
command runs in-process (its runs are processes of their own, under JAX, as for a user);
the jitted population pass is checked in-process in make test's JAX pass."""

import json
import os
from pathlib import Path

import numpy as np
import pytest


def quick_xla(monkeypatch) -> None:
    """The runs' XLA compiles without LLVM's optimisations: compiling is most of a tiny
    run's time (DRENet here: 46 -> 38 CPU s a run); what the tests check is what the runs
    record, not how fast XLA's code is."""
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())


@pytest.fixture(scope="module")
def jx(bench_script):
    return bench_script("accuracy_jax")


def _smooth(h: int, w: int) -> np.ndarray:
    i, j = np.mgrid[0:h, 0:w].astype(np.float32)
    return (0.5 + 0.25 * np.sin(i / 5.0) + 0.2 * np.cos(j / 7.0))[..., None]


def test_zoom_and_rotation_sample_as_the_tf_pipeline(jx):
    import tensorflow as tf

    from covid_keras.io.data import _rotate

    x = _smooth(40, 56)  # not square: a swapped height and width shows
    for side, y0, x0 in ((0.75, 0.1, 0.2), (0.9, 0.0, 0.1), (1.0, 0.0, 0.0)):
        want = tf.image.crop_and_resize(x[None], [[y0, x0, y0 + side, x0 + side]], [0],
                                        [40, 56])[0].numpy()
        got = jx.zoom_image(x, side, y0, x0)
        assert got.shape == x.shape
        np.testing.assert_allclose(got, want, atol=0.01)
    for angle in (0.3, -0.2):
        want = _rotate(tf.constant(x), tf.constant(angle, tf.float32)).numpy()
        got = jx.rotate_image(x, angle)
        np.testing.assert_allclose(got, want, atol=0.01)


def test_augment_options_act_and_defaults_keep_black_black(jx):
    flat = np.full((200, 16, 16, 1), 128, np.uint8)
    base = jx.augment(flat, np.random.default_rng(0)) / 255.0
    assert base.min() > 0.43 and base.max() < 0.57  # x U(0.874, 1.126) only
    gam = jx.augment(flat, np.random.default_rng(0), gamma=0.4) / 255.0
    # (0.5 b) ** exp(U(-ln 1.4, ln 1.4)): a wider spread than brightness alone
    assert gam.min() < 0.40 and gam.max() > 0.60 and 0.31 < gam.min() and gam.max() < 0.67
    img = np.zeros((50, 32, 32, 1), np.uint8)
    img[:, 12:20, 12:20] = 200
    assert not jx.augment(img, np.random.default_rng(1))[:, :4, :4].any()
    zoomed = jx.augment(img, np.random.default_rng(1), zoom=0.5)
    lit = (zoomed > 20).reshape(len(img), -1).mean(1)
    assert lit.max() > 1.5 * (img > 20).reshape(len(img), -1).mean(1).max()  # zoomed in
    turned = jx.augment(img, np.random.default_rng(1), rotation_degrees=45)
    assert (turned > 20).any() and not np.array_equal(turned > 20, img > 20)
    for kw in ({"zoom": 1.0}, {"gamma": -0.1}, {"brightness": "bogus"}):
        with pytest.raises(ValueError):
            jx.augment(img, np.random.default_rng(0), **kw)


def _npz(path: Path) -> None:
    """Two slices a patient, patient numbers unique within the file (as export_npz's);
    no fold table (a file exported before it)."""
    rng = np.random.default_rng(0)
    arrays = {"classes": np.asarray(["covid", "non_covid"])}
    first = 0
    for split, n in (("train", 24), ("val", 12), ("test", 12)):
        labels = (np.arange(n) // 2) % 2  # two slices a patient, one label each
        images = rng.integers(0, 60, (n, 64, 64, 1)).astype(np.uint8)
        images[labels == 0, 20:44, 20:44] += 150  # a learnable bright square
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.astype(np.int32)
        arrays[f"{split}_patients"] = (first + np.arange(n) // 2).astype(np.int32)
        first += n // 2
    np.savez_compressed(path, **arrays)


def test_flagfile_flags_reach_the_jax_runs(jx, tmp_path, monkeypatch, capsys):
    """The command in-process (its runs are processes of their own, under JAX, as always)."""
    _npz(tmp_path / "d.npz")
    common = ["--backbone=tiny", "--input_size=64", "--batch_size=4", "--epochs=2",
              "--optimizer=adam", "--learning_rate=1e-3", "--lr_decay_epochs=",
              "--input_norm=per_image", "--zoom_jitter=0.2", "--gamma_jitter=0.3",
              "--rotation_degrees=10"]
    (tmp_path / "d.cfg").write_text("\n".join(["--model=drenet", *common]) + "\n")
    (tmp_path / "c.cfg").write_text("\n".join(["--model=classifier", "--ema_momentum=0.9",
                                               *common]) + "\n")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the runs' environment is this one's
    quick_xla(monkeypatch)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # as a user runs it
    code = jx.main([f"--data={tmp_path / 'd.npz'}",
                    f"--flagfiles={tmp_path / 'd.cfg'},{tmp_path / 'c.cfg'}", "--seeds=0",
                    "--jobs=2",  # the two runs at once
                    f"--work_dir={tmp_path / 'w'}", f"--output_json={tmp_path / 'r.json'}",
                    "--bn_stats=both", "--track_held_out"])
    out = capsys.readouterr()
    logs = "".join(p.read_text() for p in (tmp_path / "w").glob("*.log"))
    assert code == 0, out.out[-2000:] + out.err[-2000:] + logs[-3000:]
    assert "RESULT {" in out.out
    assert "oneDNN" not in logs, logs[:2000]  # TF's start-up notices stay out of the logs
    res = json.loads((tmp_path / "r.json").read_text())
    for name, kind in (("d", "drenet"), ("c", "classifier")):
        run = res["models"][name]["runs"][0]
        assert run["backend"] == "jax"
        # read off the model: the backbone's normalisation is its first layer
        assert run["model"] == {"backbone": "tiny", "input_size": 64, "num_classes": 2,
                                "model": kind, "input_norm": "per_image",
                                "include_preprocessing": True}
        assert run["augment"] == {"brightness": "multiplicative", "zoom": 0.2,
                                  "gamma": 0.3, "rotation_degrees": 10.0}
        assert len(run["history"]) == 2 and 0.0 <= run["test"]["patient_auc"] <= 1.0
        # --bn_stats=both: each epoch also scored with population statistics (paired)
        assert run["bn_stats"] == "both"
        for row in run["history"]:
            for key in ("val_patient_auc_pop", "val_prediction_loss_pop", "test_patient_auc",
                        "test_patient_auc_pop"):
                assert 0.0 <= row[key] < 10.0, (key, row)
            # DRENet's global branch alone, scored beside its prediction (diagnostics)
            raw = {"val_patient_auc_raw", "test_patient_auc_raw", "val_prediction_loss_raw"}
            if kind == "drenet":
                assert all(0.0 <= row[k] < 10.0 for k in raw), row
            else:
                assert not raw & set(row), row
            # --ema_momentum (the classifier here): the trained weights without the
            # average, scored beside it
            noavg = {"val_patient_auc_noavg", "val_prediction_loss_noavg",
                     "test_patient_auc_noavg"}
            if kind == "classifier":
                assert all(0.0 <= row[k] < 10.0 for k in noavg), row
            else:
                assert not noavg & set(row), row
        if kind == "classifier":  # two sets of weights, two sets of figures
            assert any(h["val_prediction_loss_noavg"] != h["val_prediction_loss"]
                       for h in run["history"])


@pytest.mark.model  # run by make test's second pass, under JAX (in-process)
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "jax",
                    reason="jax.jit of a JAX model: runs in the JAX pass (KERAS_BACKEND=jax)")
def test_compiled_population_pass_gives_the_eager_statistics(jx):
    """accuracy_jax's jitted forward (``compiled_forward``) in the population pass: the same
    statistics as eager calls, twice in a row (the traces are reused)."""
    import keras

    from covid_keras.model.drenet import build_drenet
    from covid_keras.training.bn_stats import population_statistics

    keras.utils.set_random_seed(0)
    model = build_drenet(2, input_size=64, backbone="tiny", weights=None)
    rng = np.random.default_rng(0)
    # pixel values: the model's first layer (tiny's normalisation) maps them to [0, 1]
    batches = [((rng.uniform(0, 1, (n, 64, 64, 3)) + 1.0) * 127.5).astype("float32")
               for n in (4, 4, 4, 2)]
    model(batches[0], training=False)
    eager, _ = population_statistics(model, batches)
    forward = jx.compiled_forward(model)
    gaps = []
    for _ in range(2):  # the second pass reuses the first one's traces
        got, n = population_statistics(model, batches, forward=forward)
        gaps.append(max(float(np.max(np.abs(a[1] - b[1])) + np.max(np.abs(a[2] - b[2])))
                        for a, b in zip(eager, got)))
    spread = max(float(np.max(np.abs(a[1]))) for a in eager)
    out = {"gaps": gaps, "n": n, "norms": len(eager), "spread": spread}
    assert out["n"] == 4 and out["norms"] > 10 and out["spread"] > 1e-3
    assert max(out["gaps"]) < 1e-4 * max(1.0, out["spread"]), out


def test_folds_make_one_ensemble_run_per_seed(jx, tmp_path, monkeypatch, capsys):
    """--folds=K: K fold runs per seed (the training patients re-dealt by patient), then
    one row of the table: val = out of fold (every training patient once), test = the
    mean of the folds' probabilities. The command in-process, its runs processes (2 folds:
    one round of --jobs=2)."""
    _npz(tmp_path / "d.npz")
    (tmp_path / "c.cfg").write_text("\n".join([
        "--model=classifier", "--backbone=tiny", "--input_size=64", "--batch_size=4",
        "--epochs=1", "--optimizer=adam", "--learning_rate=1e-3", "--lr_decay_epochs="]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    quick_xla(monkeypatch)
    code = jx.main([f"--data={tmp_path / 'd.npz'}", f"--flagfiles={tmp_path / 'c.cfg'}",
                    "--seeds=0", "--folds=2", "--jobs=2", f"--work_dir={tmp_path / 'w'}",
                    f"--output_json={tmp_path / 'r.json'}"])
    out = capsys.readouterr()
    logs = "".join(p.read_text() for p in (tmp_path / "w").glob("*.log"))
    assert code == 0, out.out[-2000:] + out.err[-2000:] + logs[-3000:]
    parts = [json.loads((tmp_path / "w" / f"c-seed0-fold{k}.json").read_text())
             for k in range(2)]
    val = [set(p["val_patients"]) for p in parts]
    every = set().union(*val)
    assert sum(len(v) for v in val) == len(every) == 18  # 12 + 6 training patients, once
    for p, v in zip(parts, val):  # a fold never trains on the patients it predicts
        assert p["fold"][1] == 2 and len(p["val_probs"]) == 2 * len(v)
        assert not v & set(p["train_patients"]) and v | set(p["train_patients"]) == every
    run = json.loads((tmp_path / "r.json").read_text())["models"]["c"]["runs"][0]
    finite = [p["val"]["patient_auc"] for p in parts if p["val"]["patient_auc"] is not None
              and p["val"]["patient_auc"] == p["val"]["patient_auc"]]
    assert run["folds"] == 2 and run["fold_val_patient_auc"]["n"] == len(finite) >= 1
    from covid_keras.evaluation import metrics

    mean = np.mean([np.asarray(p["test_probs"]) for p in parts], axis=0)
    expected = metrics.classification_metrics(mean, np.asarray(parts[0]["test_labels"]),
                                              parts[0]["test_patients"], parts[0]["classes"])
    assert run["test"]["patient_auc"] == pytest.approx(expected["patient_auc"])
    # each fold model alone on the held-out split, and what the average added
    alone = [metrics.classification_metrics(
        np.asarray(p["test_probs"]), np.asarray(p["test_labels"]), p["test_patients"],
        p["classes"])["patient_auc"] for p in parts]
    assert run["members"]["test"]["patient_auc"] == pytest.approx(alone)
    summary = json.loads((tmp_path / "r.json").read_text())["models"]["c"]["summary"]
    assert summary["ensemble_minus_members_test_patient_auc"]["mean"] == pytest.approx(
        expected["patient_auc"] - np.mean(alone))


def test_a_classifier_stage_runs_first_and_the_run_starts_from_its_backbone(jx, tmp_path,
                                                                           monkeypatch):
    """A flagfile with --classifier_flagfile (read beside it): the classifier trains first
    with the same seed (<run>.stage.json), its chosen weights' image backbone is written
    (<run>.stage.weights.h5) and DRENet is built from that file; the run's JSON carries the
    stage's figures (paired by seed); a second run reuses the finished stage. In-process,
    on whatever backend the suite runs: the code is backend-neutral Keras."""
    import covid_keras.model.drenet as drenet_mod

    _npz(tmp_path / "d.npz")
    common = ["--backbone=tiny", "--input_size=64", "--batch_size=4", "--epochs=1",
              "--optimizer=adam", "--learning_rate=1e-3", "--lr_decay_epochs="]
    (tmp_path / "c.cfg").write_text("\n".join(["--model=classifier", *common]) + "\n")
    (tmp_path / "d.cfg").write_text("\n".join(["--model=drenet", *common,
                                               "--classifier_flagfile=c.cfg"]) + "\n")
    built, real = [], drenet_mod.build_drenet
    monkeypatch.setattr(drenet_mod, "build_drenet",
                        lambda *a, **kw: built.append(kw["weights"]) or real(*a, **kw))
    out = tmp_path / "w" / "d-seed0.json"
    out.parent.mkdir()
    res = jx.run_one(str(tmp_path / "d.npz"), str(tmp_path / "d.cfg"), 0, None, {}, out)
    stage_json, weights = out.with_suffix(".stage.json"), out.with_suffix(".stage.weights.h5")
    stage = json.loads(stage_json.read_text())
    assert stage["model"]["model"] == "classifier" and stage["seed"] == 0
    assert built == [str(weights)]
    assert res["classifier_stage"]["test"] == stage["test"]
    assert res["classifier_stage"]["val"] == stage["val"]

    from covid_keras.model.backbones import build_backbone

    fresh = build_backbone("tiny")  # the file holds trained weights, not a fresh init
    loaded = build_backbone("tiny", weights=str(weights))
    assert any(not np.array_equal(a, b) for a, b in zip(fresh.get_weights(),
                                                        loaded.get_weights()))
    stamp = weights.stat().st_mtime_ns

    class Built(Exception):
        """The second run stops once its DRENet is built: the rest is the first run's."""

    def build_and_stop(*a, **kw):
        built.append(kw["weights"])
        raise Built

    monkeypatch.setattr(drenet_mod, "build_drenet", build_and_stop)
    with pytest.raises(Built):
        jx.run_one(str(tmp_path / "d.npz"), str(tmp_path / "d.cfg"), 0, None, {}, out)
    assert weights.stat().st_mtime_ns == stamp and built[-1] == str(weights)
    assert len(built) == 2
    # a stage made from other inputs (here another learning rate) is trained again
    again, path = jx.classifier_stage(str(tmp_path / "d.npz"), str(tmp_path / "c.cfg"), 0,
                                      None, {"learning_rate": "2e-3"}, out, False, "moving",
                                      None)
    assert path == weights and weights.stat().st_mtime_ns != stamp
    assert again["stage_inputs"]["overrides"] == {"learning_rate": "2e-3"}


def test_ensemble_run_scores_the_held_out_split_by_the_folds_mean(jx):
    """ensemble_run (one seed's K folds as one row): each held-out split is scored by the
    mean of the folds' probabilities, val by the out-of-fold predictions. Fold 0 alone
    ranks the held-out patients backwards (AUC 0), fold 1 strongly right: only the mean
    scores 1 (the tiny JAX runs of test_folds_make_one_ensemble_run_per_seed give every
    fold the same AUC, so they cannot tell)."""
    labels, patients = [0, 0, 1, 1], ["a", "b", "c", "d"]

    def probs(pos):
        return [[1 - p, p] for p in pos]

    def fold(k, test_pos, val_pos, val_labels, val_patients):
        return {"seed": 3, "classes": ["non_covid", "covid"], "best_epoch": 2 + 2 * k,
                "stability": {"max_dev": 0.1 * (k + 1)}, "val": {"patient_auc": 0.5 + k / 4},
                "test_probs": probs(test_pos), "test_labels": labels, "test_patients": patients,
                "val_probs": probs(val_pos), "val_labels": val_labels,
                "val_patients": val_patients}

    parts = [fold(0, [0.9, 0.8, 0.2, 0.1], [0.1, 0.9], [0, 1], ["e", "f"]),
             fold(1, [0.0, 0.0, 1.0, 1.0], [0.8, 0.3], [0, 1], ["g", "h"])]
    out = jx.ensemble_run(parts)
    assert out["test"]["patient_auc"] == pytest.approx(1.0)  # fold 0 alone: 0.0
    assert out["members"]["test"]["patient_auc"] == pytest.approx([0.0, 1.0])
    # val: e (0, 0.1), f (1, 0.9), g (0, 0.8), h (1, 0.3): 3 of 4 pairs ranked right
    assert out["val"]["patient_auc"] == pytest.approx(0.75)
    assert out["seed"] == 3 and out["folds"] == 2 and out["best_epoch"] == 3.0
    assert out["stability"]["max_dev"] == pytest.approx(0.15)
    assert out["fold_val_patient_auc"]["mean"] == pytest.approx(0.625)


def test_folds_are_those_of_train_folds_on_the_records(jx, bench_script, tmp_path, capsys):
    """export_npz writes train --folds's table (label, site) and order (content digests) per
    patient number: fold_pool deals the same patients into the same folds as train --folds
    on the records the file came from, for any seed; a file without them is said so."""
    from covid_keras.core import schema
    from covid_keras.io import data
    from covid_keras.training import folds
    from tests.helpers import write_dataset

    folder = write_dataset(tmp_path / "tfrecords", {"train": 4, "val": 2, "test": 1})
    bench_script("export_npz").export(str(folder), str(tmp_path / "d.npz"))
    d = dict(np.load(tmp_path / "d.npz"))
    import tensorflow as tf

    numbers: dict = {}  # the records' keys -> the file's patient numbers, as it numbered
    for split in ("train", "val", "test"):
        for raw in tf.data.TFRecordDataset(data.shard_files(str(folder), split), "GZIP"):
            key = tf.io.parse_single_example(raw, schema.parse_spec())[schema.PATIENT_KEY]
            numbers.setdefault(key.numpy().decode(), len(numbers))
    table, order = folds.patients_and_order(str(folder), ["train", "val"])
    assert len({site for _, site in table.values()}) == 2  # strata of label and site
    for seed in (0, 1, 2):
        want = folds.assign_folds(table, 3, seed, order)
        for k in range(3):
            pool = jx.fold_pool(d, 3, seed, k)
            assert set(pool["val"][2].tolist()) == {numbers[p] for p, f in want.items()
                                                    if f == k}, (seed, k)
            assert not set(pool["val"][2].tolist()) & set(pool["train"][2].tolist())
    capsys.readouterr()
    for name in ("patient_order", "patient_label", "patient_site"):
        d.pop(name)
    assert any(set(jx.fold_pool(d, 3, seed, k)["val"][2].tolist()) != {
        numbers[p] for p, f in folds.assign_folds(table, 3, seed, order).items() if f == k}
        for seed in (0, 1, 2) for k in range(3))  # by label alone: other folds
    assert "no patient_order" in capsys.readouterr().err
