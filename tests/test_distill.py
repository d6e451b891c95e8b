"""``covid_keras.train --distill_from`` (issue 31's cost item): the teacher's cached targets,
the mixed loss, a student that learns its teacher, the cache's reuse, the refusals."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["normal", "covid"]


@pytest.fixture(scope="module")
def data_dir(tiny_dataset):
    return str(tiny_dataset(kinds=("normal", "covid"), patients_per_kind=4, num_slices=20,
                            matrix=64, seed=2,
                            flags=("--classes=normal,covid",
                                   "--split_fractions=0.5,0.25,0.25")))


def _pipeline():
    from covid_keras.io import data

    return data.PipelineConfig.for_model({"input_size": 64, "backbone": "tiny",
                                          "include_preprocessing": True})


def _predict(model, data_dir, split):
    from covid_keras.evaluation.evaluation import SplitPredictor

    return SplitPredictor(data_dir, split, 8, _pipeline()).predictions(model, CLASSES)


def _finished_run(folder: Path, model, data_dir: str, classes=CLASSES, **info) -> Path:
    """A finished run folder around ``model`` (best.keras, final.keras, run_info.json with
    the data's manifest SHA-256 and the classes)."""
    from covid_keras.core import files
    from covid_keras.io import data
    from covid_keras.model.saving import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "best.keras"), classes)
    shutil.copy(folder / "best.keras", folder / "final.keras")
    files.write_json(str(folder / "run_info.json"), {
        "flags": {"data_dir": data_dir, "model": "classifier"}, "classes": classes,
        "dataset_manifest_sha256": files.sha256(data.manifest_path(data_dir)), **info})
    return folder


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    """A genuine teacher that predicts the inverted class: a tiny classifier trained (here,
    with Keras's fit) on the train split with every label flipped, saved as a finished run
    folder of this data. Its train-split predictions disagree with every label."""
    import keras

    from covid_keras import build_classifier
    from covid_keras.io import data
    from covid_keras.model.optimizers import build_optimizer

    keras.utils.set_random_seed(0)
    model = build_classifier("tiny", 2, input_size=64)
    ds = data.make_dataset(data_dir, "train", 8, training=True, repeat=True,
                           cfg=data.PipelineConfig(input_size=64, backbone="tiny",
                                                   normalize=False, seed=0,
                                                   shuffle_buffer=64, deterministic=True))
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss={"logits": keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True)})
    build_optimizer(model)
    model.fit(ds.map(lambda x, y: (x, 1 - y)), epochs=1, steps_per_epoch=60, verbose=0,
              shuffle=False)
    preds = _predict(model, data_dir, "train")
    assert np.mean(preds.probs.argmax(1) != preds.labels) >= 0.9  # the inverted class
    return _finished_run(tmp_path_factory.mktemp("teacher") / "run", model, data_dir)


def _cfg(data_dir, run_dir, teacher, **kw):
    from covid_keras.training.trainer import TrainConfig

    base = dict(data_dir=data_dir, run_dir=str(run_dir), model="classifier", backbone="tiny",
                input_size=64, batch_size=4, epochs=1, steps_per_epoch=40, optimizer="adam",
                learning_rate=3e-3, lr_decay_epochs=(), verbose=0, num_display_images=0,
                shuffle_buffer=64, distill_from=str(teacher), distill_weight=1.0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def student(data_dir, teacher, tmp_path_factory):
    """A student trained with w = 1 through the trainer (in this process)."""
    import keras

    from covid_keras.training import trainer

    keras.utils.set_random_seed(0)
    cfg = _cfg(data_dir, tmp_path_factory.mktemp("student") / "run", teacher)
    trainer.train(cfg, command=["test"])
    return cfg


# ------------------------------------------------------------------ the loss
@pytest.mark.model
def test_soft_ce_matches_numpy_and_w0_is_exactly_the_plain_loss():
    import keras

    from covid_keras.model import losses

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32) * 3
    p = rng.dirichlet([1, 1, 1], size=6).astype(np.float32)
    p[0] = [1.0, 0.0, 0.0]  # a zero probability stays finite
    labels = np.array([0, 1, 2, 1, 0, 2])
    for t in (1.0, 2.5):
        got = keras.ops.convert_to_numpy(losses.soft_ce(p, logits, t))
        q = np.maximum(p.astype(np.float64), losses.PROB_FLOOR)
        target = np.exp(np.log(q) / t)
        target /= target.sum(1, keepdims=True)
        z = logits.astype(np.float64) / t
        log_s = z - z.max(1, keepdims=True)
        log_s -= np.log(np.exp(log_s).sum(1, keepdims=True))
        np.testing.assert_allclose(got, -(target * log_s).sum(1), rtol=1e-5, atol=1e-6)
    y = np.concatenate([labels[:, None].astype(np.float32), p], axis=1)
    sw = rng.uniform(0.5, 2, size=6).astype(np.float32)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for w, t in ((0.0, 1.0), (0.0, 3.0)):
        mixed = losses.DistillationLoss(w, t)
        assert float(mixed(y, logits, sw)) == float(plain(labels, logits, sw))
        assert float(mixed(y, logits)) == float(plain(labels, logits))
    w, t = 0.3, 2.0  # and the mix itself
    hard = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))
    soft = keras.ops.convert_to_numpy(losses.soft_ce(p, logits, t))
    np.testing.assert_allclose(float(losses.DistillationLoss(w, t)(y, logits)),
                               np.mean((1 - w) * hard + w * t * t * soft), rtol=1e-6)


@pytest.mark.model
def test_a_loaded_students_compiled_loss_takes_ordinary_labels(tmp_path):
    """A distilled classifier's .keras file compiles DistillationLoss: a user's
    ``covid_keras.load_model(path)`` then ``evaluate`` (or ``fit``) with ordinary labels gets
    the ordinary loss, as with an ordinary run's file (it failed: y[:, 0] of a label
    vector)."""
    import keras

    from covid_keras import build_classifier, load_model
    from covid_keras.model import losses, saving
    from covid_keras.model.optimizers import build_optimizer

    keras.utils.set_random_seed(0)
    model = build_classifier("tiny", 2, input_size=64)
    model.compile(optimizer="adam", loss={"logits": losses.DistillationLoss(0.5, 2.0)})
    build_optimizer(model)  # as a trained model's
    saving.save_model(model, str(tmp_path / "student.keras"), CLASSES)
    loaded = load_model(str(tmp_path / "student.keras"))
    assert isinstance(loaded.loss["logits"], losses.DistillationLoss)
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 64, 64, 3)).astype(np.float32)
    labels = np.array([0, 1, 1, 0])
    logits = loaded(x, training=False)["logits"]
    plain = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels,
                                                                               logits))
    for y in (labels, labels[:, None]):
        assert float(losses.DistillationLoss(0.5, 2.0)(y, logits)) == plain
    np.testing.assert_allclose(loaded.evaluate(x, labels, verbose=0), plain, rtol=1e-5)


def test_drenet_w0_is_exactly_its_plain_loss_and_w1_mixes_raw_and_concat_only():
    import keras

    from covid_keras import build_drenet
    from covid_keras.model import losses

    keras.utils.set_random_seed(0)
    model = build_drenet(2, input_size=64, backbone="tiny")
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 64, 3)).astype(np.float32)
    out = model(x, training=False)
    labels = np.array([0, 1])
    p = np.array([[0.2, 0.8], [0.9, 0.1]], np.float32)
    y = np.concatenate([labels[:, None].astype(np.float32), p], axis=1)
    plain = {k: keras.ops.convert_to_numpy(v)
             for k, v in losses.drenet_loss_terms(labels, out).items()}
    for w, t in ((0.0, 1.0), (0.0, 2.0), (1.0, 2.0)):
        mixed = {k: keras.ops.convert_to_numpy(v) for k, v in
                 losses.drenet_loss_terms(y, out, distill=(w, t)).items()}
        for name in losses.TERMS:
            if w == 0.0 or name not in losses.DISTILLED_TERMS:
                np.testing.assert_array_equal(mixed[name], plain[name])
        if w == 1.0:
            for name, key in (("raw", "raw_logits"), ("concat", "logits")):
                np.testing.assert_allclose(mixed[name], t * t * keras.ops.convert_to_numpy(
                    losses.soft_ce(p, out[key], t)), rtol=1e-6)
    # the model's own compute_loss: with w = 0 the distilled y gives the plain loss
    ref = float(model.compute_loss(x, labels, out))
    model.distill = (0.0, 2.0)
    assert float(model.compute_loss(x, y, out)) == ref
    model.distill = None


# ------------------------------------------------------------------ targets, student
def test_each_training_record_gets_its_own_slices_target(data_dir):
    """The join itself (no model): targets unique to each train slice come back beside
    that slice's own label, through shuffling, repetition, augmentation, class-balanced
    sampling and --class_weights' sample weights; a record without a target stops the
    pipeline. (The student test alone would not see two same-class slices' targets
    swapped.)"""
    import tensorflow as tf

    from covid_keras.core import schema
    from covid_keras.io import data
    from covid_keras.training import distill

    spec = {k: v for k, v in schema.parse_spec().items()
            if k in (*data.TARGET_KEY_FIELDS, schema.LABEL_INDEX)}
    label = {}
    for raw in tf.data.TFRecordDataset(data.shard_files(data_dir, "train"), "GZIP"):
        r = tf.io.parse_single_example(raw, spec)
        label[data.target_key(r[schema.STUDY_KEY].numpy(), r[schema.SOP_KEY].numpy())] = \
            int(r[schema.LABEL_INDEX])
    keys = sorted(label)
    p0 = (np.random.default_rng(0).permutation(len(keys)) + 1) / (len(keys) + 2)
    targets = data.TeacherTargets(tuple(keys), np.stack([p0, 1 - p0], 1).astype(np.float32))
    key_of = {round(float(p), 6): k for k, p in zip(keys, p0)}
    for balanced in (False, True):
        cfg = data.PipelineConfig(input_size=64, backbone="tiny", normalize=False, seed=0,
                                  shuffle_buffer=16, class_balanced=balanced, num_classes=2)
        ds = distill.with_class_weights(data.make_dataset(
            data_dir, "train", 4, training=True, repeat=True, cfg=cfg, targets=targets),
            {0: 2.0, 1: 0.5})
        seen = set()
        for _, y, w in ds.take(3 * len(keys) // 4):
            for row, weight in zip(y.numpy(), w.numpy()):
                k = key_of[round(float(row[1]), 6)]
                assert int(row[0]) == label[k] and row[1] + row[2] == pytest.approx(1.0)
                assert weight == (2.0 if label[k] == 0 else 0.5)
                seen.add(k)
        assert len(seen) >= len(keys) // 2
    partial = data.TeacherTargets(tuple(keys[1:]), targets.probs[1:])
    ds = data.make_dataset(data_dir, "train", 4, training=True, cfg=cfg, targets=partial)
    with pytest.raises(tf.errors.InvalidArgumentError, match="no teacher target"):
        for _ in ds:
            pass


def test_cached_targets_are_the_teachers_predictions_of_the_train_split_only(
        student, teacher, data_dir):
    from covid_keras.core import files
    from covid_keras.io import data
    from covid_keras.model import saving

    cache = Path(student.run_dir) / "distill_targets.npz"
    with np.load(cache) as z:
        keys, probs = [str(k) for k in z["keys"]], z["probs"]
        assert str(z["teacher_sha256"]) == files.sha256(str(teacher / "best.keras"))
        assert str(z["dataset_manifest_sha256"]) == files.sha256(
            data.manifest_path(data_dir))
    model = saving.load_model(str(teacher / "best.keras"), compile=False)
    train = _predict(model, data_dir, "train")
    from covid_keras.evaluation.evaluation import SplitPredictor

    split = SplitPredictor(data_dir, "train", 8, _pipeline())
    expected = {data.target_key(s, k): train.probs[i]
                for i, (s, k) in enumerate(zip(split.study_keys, split.sop_keys))}
    assert sorted(keys) == sorted(expected) and len(keys) == len(train.labels)
    for k, row in zip(keys, probs):
        np.testing.assert_allclose(row, expected[k], atol=1e-6)
    for held in ("val", "test"):  # never a target of another split's slice
        assert not set(keys) & set(data.split_target_keys(data_dir, held))
    info = json.loads((Path(student.run_dir) / "run_info.json").read_text())
    assert info["distill"]["teacher"] == str(teacher / "best.keras")
    assert info["distill"]["teacher_sha256"] == files.sha256(str(teacher / "best.keras"))
    assert (info["distill"]["weight"], info["distill"]["temperature"]) == (1.0, 1.0)
    assert info["flags"]["distill_from"] == str(teacher)
    flags_cfg = (Path(student.run_dir) / "flags.cfg").read_text()
    assert f"--distill_from={teacher}\n" in flags_cfg and "--distill_weight=1.0\n" in flags_cfg


def test_a_student_with_w1_learns_the_teacher_not_the_labels(student, teacher, data_dir):
    """The teacher predicts the inverted class on every train slice: a student trained
    on its targets alone agrees with it, not with the labels (without the distillation
    term it would learn the labels)."""
    from covid_keras.model import saving

    model = saving.load_model(str(Path(student.run_dir) / "final.keras"), compile=False)
    mine = _predict(model, data_dir, "train")
    theirs = _predict(saving.load_model(str(teacher / "best.keras"), compile=False),
                      data_dir, "train")
    with_teacher = np.mean(mine.probs.argmax(1) == theirs.probs.argmax(1))
    with_labels = np.mean(mine.probs.argmax(1) == mine.labels)
    assert with_teacher >= 0.8 and with_labels <= 0.3, (with_teacher, with_labels)


def test_the_cache_is_reused_only_for_the_same_teacher_file_and_data(student, teacher,
                                                                     data_dir, tmp_path):
    import keras

    from covid_keras.core import files
    from covid_keras.io import data
    from covid_keras.io.run_dir import RunDir
    from covid_keras.model import saving
    from covid_keras.model.saving import save_model
    from covid_keras.training import distill

    data_sha = files.sha256(data.manifest_path(data_dir))
    manifest = data.read_manifest(data_dir)
    shutil.copytree(student.run_dir, tmp_path / "student_run")  # the module's stays as is
    run = RunDir(str(tmp_path / "student_run"))
    cache = Path(run.distill_targets_path)
    copy = tmp_path / "teacher"  # the same file elsewhere: the same targets
    shutil.copytree(teacher, copy)
    cfg = student.replace(distill_from=str(copy), run_dir=run.path)
    found = distill.teacher(cfg, manifest, data_sha)
    stamp = cache.stat().st_mtime_ns
    before = distill.targets(cfg, run, found, data_sha, 8)
    assert cache.stat().st_mtime_ns == stamp  # reused
    # another teacher file at that path (the logits negated: the other class) -> predicted
    model = saving.load_model(str(copy / "best.keras"), compile=False)
    kernel, bias = model.get_layer("logits").get_weights()
    model.get_layer("logits").set_weights([-kernel, -bias])
    save_model(model, str(copy / "best.keras"), CLASSES)
    found = distill.teacher(cfg, manifest, data_sha)
    after = distill.targets(cfg, run, found, data_sha, 8)
    with np.load(cache) as z:
        assert str(z["teacher_sha256"]) == found["sha256"]
    order = [after.keys.index(k) for k in before.keys]
    np.testing.assert_allclose(after.probs[order], before.probs[:, ::-1], atol=1e-5)
    # a cache made on other data (its manifest's SHA-256) -> predicted again
    with np.load(cache) as z:
        doc = {k: z[k] for k in z.files}
    doc["dataset_manifest_sha256"] = np.asarray("0" * 64)
    buf = io.BytesIO()
    np.savez(buf, **doc)
    cache.write_bytes(buf.getvalue())
    distill.targets(cfg, run, found, data_sha, 8)
    with np.load(cache) as z:
        assert str(z["dataset_manifest_sha256"]) == data_sha
    # a resumed (interrupted) run whose teacher file changed is another run; --reuse too
    from covid_keras.training import trainer

    interrupted = tmp_path / "interrupted"
    icfg = cfg.replace(run_dir=str(interrupted))
    interrupted.mkdir()
    trainer.write_run_info(icfg, str(interrupted), {"distill": {
        **distill.run_info_entry(icfg, found), "teacher_sha256": "f" * 64}}, ["test"])
    (interrupted / "backup").mkdir()
    with pytest.raises(ValueError, match="interrupted run with other flags.*teacher file "
                                         "changed") as exc:
        trainer.train(icfg)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="--reuse: .*teacher file changed"):
        trainer.train(_reuse_with_changed_teacher(student, tmp_path))
    keras.backend.clear_session()


def _reuse_with_changed_teacher(student, tmp_path):
    """The student's config with --reuse, after its teacher file changed in place (a copy
    of the student's run folder, so that the module's folders stay as they were)."""
    info_path = Path(student.run_dir) / "run_info.json"
    copy = tmp_path / "reused_student"
    shutil.copytree(student.run_dir, copy)
    info = json.loads(info_path.read_text())
    info["distill"]["teacher_sha256"] = "e" * 64
    (copy / "run_info.json").write_text(json.dumps(info))
    return student.replace(run_dir=str(copy), reuse=True)


@pytest.mark.slow  # a DRENet training run: 18-37 s on 2 loaded cores (make test runs it)
def test_a_drenet_student_trains_on_a_classifier_teacher_with_class_weights(
        teacher, data_dir, tmp_path):
    """DRENet's distilled terms (raw, concat) through the trainer, with --class_weights
    (sample weights then: y is not a label), the teacher fed by its own spec's pipeline."""
    import csv

    import keras

    from covid_keras.training import trainer

    keras.utils.set_random_seed(0)
    cfg = _cfg(data_dir, tmp_path / "drenet", teacher, model="drenet", batch_size=2,
               steps_per_epoch=3, optimizer="sgd", learning_rate=0.01, distill_weight=0.5,
               distill_temperature=2.0, class_weights=True)
    trainer.train(cfg, command=["test"])
    with open(tmp_path / "drenet" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(np.isfinite(float(rows[-1][k])) for k in
                        ("loss", "raw_loss", "concat_loss", "region_loss", "rank_loss"))
    info = json.loads((tmp_path / "drenet" / "run_info.json").read_text())
    assert (info["distill"]["weight"], info["distill"]["temperature"]) == (0.5, 2.0)
    assert (tmp_path / "drenet" / "distill_targets.npz").exists()
    keras.backend.clear_session()


def test_evaluate_warns_on_a_split_that_trained_the_teachers_folds(student, teacher,
                                                                   data_dir, tmp_path):
    from covid_keras.core import files
    from covid_keras.evaluation.evaluation import evaluate_run
    from covid_keras.io import data

    folds_teacher = tmp_path / "cv"  # the teacher as a --folds run of this data's train+val
    shutil.copytree(teacher, folds_teacher)
    files.write_json(str(folds_teacher / "folds.json"), {
        "folds": 2, "seed": 0, "splits": ["train", "val"], "data_dir": data_dir,
        "dataset_manifest_sha256": files.sha256(data.manifest_path(data_dir))})
    (folds_teacher / "metrics.json").write_text("{}")
    run = tmp_path / "student"
    shutil.copytree(student.run_dir, run)
    info = json.loads((run / "run_info.json").read_text())
    info["distill"]["teacher_run"] = str(folds_teacher)
    (run / "run_info.json").write_text(json.dumps(info))
    said = {}
    for split in ("val", "test"):
        result = evaluate_run(str(run), split=split, output_dir=str(tmp_path / split),
                              n_bootstrap=0, max_explained=0, report=False, log=lambda m: None)
        said[split] = any("distilled from" in w for w in result["warnings"])
    assert said == {"val": True, "test": False}


# ------------------------------------------------------------------ refusals
def _refused(cfg, message, folds=False):
    from covid_keras.training import cross_validation, trainer

    with pytest.raises(ValueError, match=message) as exc:
        if folds:
            cross_validation.cross_validate(cfg, trainer)
        else:
            trainer.train(cfg)
    assert "\n" not in str(exc.value), str(exc.value)


def test_each_refusal_is_one_line(teacher, data_dir, tmp_path):
    import keras

    from covid_keras.core import files
    from covid_keras.model import saving

    run = tmp_path / "run"
    cfg = _cfg(data_dir, run, teacher)
    _refused(cfg.replace(folds=2), "takes no --folds", folds=True)
    _refused(cfg.replace(distill_from=str(run)), "is --run_dir itself")
    _refused(cfg.replace(distill_weight=1.5), r"--distill_weight must be in \[0, 1\]")
    _refused(cfg.replace(distill_weight=-0.1), r"--distill_weight must be in \[0, 1\]")
    _refused(cfg.replace(distill_temperature=0.0), "--distill_temperature must be > 0")
    _refused(cfg.replace(distill_from=None, distill_weight=0.2), "need --distill_from")
    _refused(cfg.replace(distill_from=str(tmp_path / "nowhere")), "no such run folder")

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(teacher, folder)
        change(folder)
        return cfg.replace(distill_from=str(folder))

    _refused(variant("unfinished", lambda f: (f / "final.keras").unlink()),
             "is not a finished run")
    _refused(variant("training", lambda f: (f / "backup").mkdir()), "is not a finished run")

    def other_classes(f):
        model = saving.load_model(str(f / "best.keras"), compile=False)
        saving.save_model(model, str(f / "best.keras"), ["covid", "normal"])

    _refused(variant("classes", other_classes), r"classes \['covid', 'normal'\] differ")

    def edit_info(**changes):
        def change(f):
            info = json.loads((f / "run_info.json").read_text())
            info.update(changes)
            info = {k: v for k, v in info.items() if v is not None}
            (f / "run_info.json").write_text(json.dumps(info))
        return change

    _refused(variant("other_data", edit_info(dataset_manifest_sha256="0" * 64)),
             "was trained on another data folder")
    _refused(variant("unverified", edit_info(dataset_manifest_sha256=None)),
             "data cannot be verified")

    def folds_run(sha):  # a --folds teacher: its data is folds.json's source
        def change(f):
            files.write_json(str(f / "folds.json"), {"folds": 2, "seed": 0,
                                                    "dataset_manifest_sha256": sha})
            (f / "metrics.json").write_text("{}")
            edit_info(dataset_manifest_sha256=None)(f)
        return change

    from covid_keras.io import data
    from covid_keras.training import distill

    sha = files.sha256(data.manifest_path(data_dir))
    ok = variant("folds_ok", folds_run(sha))
    assert distill.teacher(ok, data.read_manifest(data_dir), sha)["sha256"]
    _refused(variant("folds_other", folds_run("1" * 64)), "was trained on another data")
    _refused(variant("folds_unverified", folds_run(None)), "folds.json records no")
    assert not run.exists()  # refused before anything was written
    keras.backend.clear_session()


def test_a_teacher_that_trained_on_a_split_held_out_here_is_refused(teacher, data_dir,
                                                                    tmp_path):
    """The same data folder (its manifest), other split roles: a --folds teacher dealt
    from train + test (its --val_split=test), or a run that chose its checkpoint on test,
    saw patients the student holds out; so does a teacher of train + val for a student whose
    val split is test. Refused (the manifest check alone let them through); the student's
    own val split is the documented exception."""
    from covid_keras.core import files
    from covid_keras.io import data
    from covid_keras.training import distill

    sha = files.sha256(data.manifest_path(data_dir))
    manifest = data.read_manifest(data_dir)
    cfg = _cfg(data_dir, tmp_path / "run", teacher)

    def folds_teacher(name, splits):
        folder = tmp_path / name
        shutil.copytree(teacher, folder)
        files.write_json(str(folder / "folds.json"), {
            "folds": 2, "seed": 0, "splits": splits, "data_dir": data_dir,
            "dataset_manifest_sha256": sha})
        (folder / "metrics.json").write_text("{}")
        return folder

    def val_on(name, split):
        folder = tmp_path / name
        shutil.copytree(teacher, folder)
        info = json.loads((folder / "run_info.json").read_text())
        info["flags"]["val_split"] = split
        (folder / "run_info.json").write_text(json.dumps(info))
        return folder

    _refused(cfg.replace(distill_from=str(folds_teacher("cv_test", ["train", "test"]))),
             r"trained on the split 'test' of .*--val_split=val")
    _refused(cfg.replace(distill_from=str(val_on("val_test", "test"))),
             r"trained on the split 'test' of ")
    _refused(cfg.replace(distill_from=str(folds_teacher("cv", ["train", "val"])),
                         val_split="test", report_splits=("val",)),
             r"trained on the split 'val' of .*--val_split=test")
    for ok in (folds_teacher("cv_val", ["train", "val"]), teacher):
        assert distill.teacher(cfg.replace(distill_from=str(ok)), manifest, sha)["sha256"]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bench_accuracy_passes_the_seeds_teacher_to_each_run(bench_script, tmp_path,
                                                             monkeypatch):
    """``bench/accuracy.py ... -- --distill_from=runs/acc/cv/covid_ct_resnet50/seed{seed}``:
    each seed's run distils that seed's ensemble (the command it runs, captured)."""
    import subprocess
    import types

    accuracy = bench_script("accuracy")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("--run_dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"best_epoch": 1, "best": {}}))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(accuracy, "stability", lambda path: {"max_dev": None})
    # the stamps and digests (they list git's files with subprocess.run, captured here)
    monkeypatch.setattr(accuracy, "trained_with", lambda root=None: {"code_sha256": "c"})
    monkeypatch.setattr(accuracy, "read_with_sha256", lambda root=None: "r")
    accuracy.main([f"--data_dir={data}", "--flagfiles=configs/covid_ct_resnet50.cfg",
                   "--seeds=0,1", f"--work_dir={tmp_path / 'w'}", "--",
                   "--distill_from=runs/acc/cv/covid_ct_resnet50/seed{seed}"])
    assert [[a for a in c if a.startswith("--distill_from")] for c in commands] == [
        ["--distill_from=runs/acc/cv/covid_ct_resnet50/seed0"],
        ["--distill_from=runs/acc/cv/covid_ct_resnet50/seed1"]]
    assert all("--overwrite" in c and not any(a.startswith("--folds") for a in c)
               for c in commands)
