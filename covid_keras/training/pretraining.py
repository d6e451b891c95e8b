"""SimCLR pretraining of the image backbone: the library of ``python -m covid_keras.pretrain``
(whose docstring describes the method and the run folder): :class:`PretrainConfig`, the
run folder (:func:`prepare_run_dir`, :func:`weights_file`, which the trainer reads),
the resumable :class:`Checkpoint`, the k-NN and linear probes, and :func:`pretrain`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

from covid_keras.core import cli, files, provenance, schema

log = logging.getLogger("covid_keras.pretrain")

BACKBONE_FILE = "backbone.weights.h5"
PROBE_KEYS = ("knn_slice_auc", "knn_patient_auc", "linear_slice_auc", "linear_patient_auc")
RUN_FILES = ("run_info.json", "flags.cfg", BACKBONE_FILE, "metrics.json", "log.csv")
HELD_OUT_SPLITS = ("test",)
PATH_FLAGS = ("data_dir", "run_dir", "extra_data_dir", "backbone_weights")
# Flags that do not change what a run computes (a resumed run may change them).
RESUMABLE_CHANGES = ("overwrite", "reuse", "verbose", "data_dir", "run_dir", "extra_data_dir",
                     "probe_split", "probe_every", "knn_k")


@dataclass(frozen=True)
class PretrainConfig:
    data_dir: str
    run_dir: str
    splits: tuple[str, ...] = ("train",)
    allow_test: bool = False
    extra_data_dir: str | None = None
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    input_size: int = 224
    batch_size: int = 32
    epochs: int = 100
    steps_per_epoch: int = 0
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    temperature: float = 0.2
    projection_dim: int = 128
    projection_hidden_units: int = 512
    zoom_jitter: float = 0.5
    rotation_degrees: float = 10.0
    gamma_jitter: float = 0.4
    bn_momentum: float = 0.9
    shuffle_buffer: int = 1024
    seed: int = 0
    strategy: str = "mirrored"
    probe_split: str = "val"
    probe_every: int = 1
    knn_k: int = 20
    overwrite: bool = False
    reuse: bool = False
    verbose: int = 2

    def sources(self) -> list[tuple[str, str]]:
        """(data_dir, split) of every split the pretraining reads."""
        out = [(self.data_dir, s) for s in self.splits]
        if self.extra_data_dir:
            out += [(self.extra_data_dir, s) for s in self.splits]
        return out

    def defining(self) -> dict:
        """The settings that change what the run computes (the resume check)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()
                if k not in RESUMABLE_CHANGES}

    def flagfile(self) -> str:
        """``flags.cfg``: the flags that repeat this run (paths absolute; never the
        one-shot ``--overwrite``)."""
        lines = []
        for name, v in asdict(self).items():
            if name in ("overwrite", "reuse") or v is None:
                continue
            if name in PATH_FLAGS and v and v != "imagenet":
                v = files.absolute(v)
            v = ",".join(v) if isinstance(v, tuple) else v
            lines.append(f"--{name}={str(v).lower() if isinstance(v, bool) else v}\n")
        return "".join(lines)


def check_config(cfg: PretrainConfig) -> None:
    """Refuses, in one line, what the run must not do: read a held-out split, or a split
    or data folder that is not there. Cheap (no TensorFlow)."""
    if not cfg.splits:
        raise ValueError("--splits is empty: name the splits to pretrain on (e.g. train)")
    held = [s for s in cfg.splits if s in HELD_OUT_SPLITS]
    if held and not cfg.allow_test:
        raise ValueError(f"--splits={','.join(cfg.splits)} includes the held-out split "
                         f"{held[0]!r}: pretraining on it is transductive use of a split "
                         "kept for the final report (pass --allow_test to do it anyway)")
    for d in [cfg.data_dir] + ([cfg.extra_data_dir] if cfg.extra_data_dir else []):
        if not files.exists(os.path.join(d, schema.MANIFEST)):
            raise FileNotFoundError(f"{d} is not a data_prep output (no manifest.json): "
                                    "build it with python -m data_prep.build_tfrecords")
    for name in ("input_size", "batch_size", "epochs", "knn_k", "probe_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1. Received: {getattr(cfg, name)}")
    if cfg.batch_size < 2:
        raise ValueError(f"--batch_size must be >= 2 (contrastive negatives). Received: "
                         f"{cfg.batch_size}")
    if cfg.backbone_weights not in (None, "", "imagenet") and not files.exists(
            cfg.backbone_weights):
        raise FileNotFoundError(f"--backbone_weights={cfg.backbone_weights}: no such file")
    if not 0.0 <= cfg.bn_momentum < 1.0:
        raise ValueError(f"--bn_momentum must be in [0, 1). Received: {cfg.bn_momentum}")
    cli.import_keras_quietly()  # the cheap checks first; then Keras without its notices
    from covid_keras.model.backbones import BACKBONES

    if cfg.backbone not in BACKBONES:
        raise ValueError(f"--backbone must be one of {', '.join(BACKBONES)}. Received: "
                         f"{cfg.backbone}")


# ------------------------------------------------------------------ run folder
def is_finished(run_dir: str) -> bool:
    return files.exists(os.path.join(run_dir, BACKBONE_FILE)) and files.exists(
        os.path.join(run_dir, "metrics.json")) and not files.isdir(
        os.path.join(run_dir, "checkpoint"))


def weights_file(path: str) -> str:
    """``path`` itself (a ``.weights.h5`` file) or a finished pretraining run folder's
    ``backbone.weights.h5``; a one-line error otherwise."""
    if path.endswith(".weights.h5"):
        if not files.exists(path):
            raise FileNotFoundError(f"{path}: no such backbone weights file")
        return path
    if is_finished(path):
        return os.path.join(path, BACKBONE_FILE)
    if files.isdir(os.path.join(path, "checkpoint")):
        raise ValueError(f"{path} holds an unfinished pretraining run: run its command "
                         f"again to finish it (--flagfile={os.path.join(path, 'flags.cfg')})")
    raise FileNotFoundError(f"{path} is neither a .weights.h5 file nor a finished "
                            f"pretraining run folder (no {BACKBONE_FILE})")


def prepare_run_dir(cfg: PretrainConfig) -> str:
    """``"new"``, ``"resume"`` (an interrupted run with the same settings on the same build
    of the data), ``"finished"`` (--reuse: a finished one with the same settings and data)
    or ``"overwrite"``; a finished run without --overwrite or --reuse, or a run with other
    settings or data, is a one-line error. --reuse --overwrite replaces a finished run only
    when it differs (as train does)."""
    run_dir = cfg.run_dir
    ckpt = os.path.join(run_dir, "checkpoint")
    started = files.isdir(ckpt) or files.exists(os.path.join(run_dir, "run_info.json"))
    finished = is_finished(run_dir)
    diff = changed_settings(cfg) if started or finished else []
    if cfg.overwrite and (started or finished) and not (cfg.reuse and finished and not diff):
        for name in RUN_FILES:
            files.remove(os.path.join(run_dir, name))
        for name in ("checkpoint", "tensorboard"):
            files.rmtree(os.path.join(run_dir, name))
        log.info("--overwrite: %s starts again from scratch", run_dir)
        return "overwrite"
    if finished and not cfg.reuse:
        raise ValueError(f"{run_dir} holds a finished pretraining run: use it (covid_keras."
                         f"train --init_from={run_dir}), or pass --overwrite to replace it")
    if started or finished:
        if diff:
            state = "a finished" if finished else "an interrupted"
            raise ValueError(f"{run_dir} holds {state} pretraining run with other flags ("
                             f"{'; '.join(diff)}): rerun it with its --flagfile="
                             f"{os.path.join(run_dir, 'flags.cfg')}, choose another "
                             "folder, or pass --overwrite")
        return "finished" if finished else "resume"
    files.makedirs(run_dir)
    return "new"


def changed_settings(cfg: PretrainConfig) -> list[str]:
    """``--name: old -> new`` for every run-defining setting of the run in --run_dir
    (its run_info.json) that differs from ``cfg``, and ``--data_dir: other data ...`` when
    it trained on another build of the data (its manifest.json's SHA-256); [] without a
    run_info.json."""
    path = os.path.join(cfg.run_dir, "run_info.json")
    if not files.exists(path):
        return []
    info = json.loads(files.read_text(path))
    stored, now = info.get("config", {}), cfg.defining()
    diff = [f"--{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(now)
            if stored.get(k) != now.get(k)]
    built = info.get("dataset_manifest_sha256")
    if built is not None and built != files.sha256(os.path.join(cfg.data_dir,
                                                                schema.MANIFEST)):
        diff.append(f"--data_dir: other data than the run's ({cfg.data_dir})")
    return diff


class Checkpoint:
    """The state of a running pretraining (weights, optimizer, epoch, history) in
    ``<run_dir>/checkpoint``. The weights alternate between two files; ``state.json``,
    which names the file, is renamed into place last: it is the commit, so a kill at any
    moment leaves the last finished epoch readable."""

    def __init__(self, run_dir: str):
        self.dir = os.path.join(run_dir, "checkpoint")
        self.state_path = os.path.join(self.dir, "state.json")

    def load(self, model) -> dict | None:
        if not files.exists(self.state_path):
            return None
        state = json.loads(files.read_text(self.state_path))
        from covid_keras.model.optimizers import build_optimizer

        build_optimizer(model)
        model.load_weights(os.path.join(self.dir, state["weights"]))
        return state

    def save(self, model, epoch: int, history: list[dict], previous: dict | None) -> dict:
        files.makedirs(self.dir)
        slot = 1 - int((previous or {}).get("slot", 1))
        name = f"slot{slot}.weights.h5"
        model.save_weights(os.path.join(self.dir, name), overwrite=True)
        state = {"epoch": epoch, "slot": slot, "weights": name, "history": history}
        files.atomic_write_text(self.state_path, json.dumps(state))
        return state


# ------------------------------------------------------------------ probe
def knn_probe(train_x, train_y, query_x, k: int = 20, tau: float = 0.1):
    """A k-nearest-neighbour classifier on L2-normalised features (cosine similarity,
    neighbours weighted by exp(sim / tau), as in the self-supervised literature): the
    weighted share of positive neighbours of each query row. ``train_y``: 0/1."""
    import numpy as np

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(query_x) @ unit(train_x).T
    k = min(k, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, axis=1) / tau)
    votes = np.asarray(train_y, np.float64)[top]
    return (w * votes).sum(axis=1) / w.sum(axis=1)


#: The linear probe's inverse L2 penalty (on standardised features), fixed: the probe
#: chooses nothing, so nothing is tuned on the split it scores.
LINEAR_C = 1.0


def linear_probe(train_x, train_y, query_x, c: float = LINEAR_C):
    """A logistic regression on the features standardised with the train rows' mean and
    standard deviation (L2 penalty ``1 / c``, scikit-learn's lbfgs): the probability of the
    positive class for each query row. ``train_y``: 0/1, both present."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    train_x = np.asarray(train_x, np.float64)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    clf = LogisticRegression(C=c, max_iter=10_000)
    clf.fit((train_x - mean) / std, np.asarray(train_y))
    return clf.predict_proba((np.asarray(query_x, np.float64) - mean) / std)[:, 1]


class Probe:
    """Probes of the backbone's pooled features, fitted on the train split's slices (labels
    read here only) and scored on the ``split``'s: the k-NN probe (the train slices are the
    neighbours) and the linear probe (:func:`linear_probe`); slice AUC and patient AUC (the
    mean of each patient's slice scores) of each. Chooses nothing."""

    def __init__(self, data_dir: str, split: str, input_size: int, backbone: str,
                 batch_size: int, k: int):
        import numpy as np

        from covid_keras.evaluation.decision import positive_index
        from covid_keras.io import data

        manifest = data.read_manifest(data_dir)
        self.positive = positive_index(manifest["classes"])
        self.k = k
        cfg = data.PipelineConfig(input_size=input_size, backbone=backbone)
        self.sets = {}
        for name in ("train", split):
            ds = data.make_dataset(data_dir, name, batch_size, training=False, cfg=cfg,
                                   with_meta=True)
            images, labels, patients = [], [], []
            for x, meta in ds:
                images.append(x.numpy())
                labels.append(meta["label"].numpy())
                patients += [p.decode() for p in meta["patient_key"].numpy()]
            self.sets[name] = (np.concatenate(images), np.concatenate(labels), patients)
        self.split = split

    def __call__(self, backbone_model) -> dict:
        import numpy as np

        from covid_keras.evaluation.decision import aggregate
        from covid_keras.evaluation.metrics import auc_score

        feats = {name: np.asarray(backbone_model.predict(x, batch_size=32, verbose=0)["pool"])
                 for name, (x, _, _) in self.sets.items()}
        train_y = (self.sets["train"][1] == self.positive).astype(int)
        _, labels, patients = self.sets[self.split]
        y = (labels == self.positive).astype(int)
        scores = {"knn": knn_probe(feats["train"], train_y, feats[self.split], self.k)}
        if len(set(train_y.tolist())) == 2:  # a logistic regression needs both classes
            scores["linear"] = linear_probe(feats["train"], train_y, feats[self.split])
        out = {}
        for name, score in scores.items():
            pats = aggregate(np.stack([1 - score, score], axis=1), y, patients, "mean",
                             positive=1)
            out[f"{name}_slice_auc"] = auc_score(y, score)
            out[f"{name}_patient_auc"] = auc_score(pats.labels, pats.score)
        return {k: v for k, v in out.items() if not math.isnan(v)}


# ------------------------------------------------------------------ the run
def pretrain(cfg: PretrainConfig) -> dict:
    """Runs (or resumes) the pretraining described by ``cfg``; returns metrics.json."""
    check_config(cfg)
    keras = cli.import_keras_quietly()
    from covid_keras.io import data
    from covid_keras.model.backbones import save_backbone_weights
    from covid_keras.training import ssl

    mode = prepare_run_dir(cfg)
    if mode == "finished":  # --reuse, same flags
        log.info("%s holds a finished pretraining run with the same flags: reused",
                 cfg.run_dir)
        return json.loads(files.read_text(os.path.join(cfg.run_dir, "metrics.json")))
    if mode == "resume":
        log.info("%s holds an interrupted pretraining run with the same flags: resuming it",
                 cfg.run_dir)
    sources = cfg.sources()
    records = data.pretrain_record_count(sources)
    if records < cfg.batch_size:
        raise ValueError(f"--splits {','.join(cfg.splits)} hold {records} slices, fewer "
                         f"than one batch ({cfg.batch_size})")
    steps = cfg.steps_per_epoch or max(1, records // cfg.batch_size)
    manifest_sha = files.sha256(os.path.join(cfg.data_dir, schema.MANIFEST))
    if mode != "resume" or not files.exists(os.path.join(cfg.run_dir, "run_info.json")):
        files.write_json(os.path.join(cfg.run_dir, "run_info.json"), {
            "config": cfg.defining(), "sources": [list(s) for s in sources],
            "records": records, "steps_per_epoch": steps, "method": "simclr",
            "dataset_manifest_sha256": manifest_sha, "seed": cfg.seed,
            "versions": provenance.package_versions(), "git_sha": provenance.git_sha(),
            "backend": keras.backend.backend(), "command": " ".join(sys.argv)})
    files.atomic_write_text(os.path.join(cfg.run_dir, "flags.cfg"), cfg.flagfile())
    keras.utils.set_random_seed(cfg.seed)
    strategy = _strategy(cfg.strategy, keras)
    with strategy.scope():
        model = ssl.build_pretrain_model(cfg.backbone, cfg.input_size, cfg.projection_dim,
                                         cfg.projection_hidden_units,
                                         weights=cfg.backbone_weights or None,
                                         bn_momentum=cfg.bn_momentum)
        total = steps * cfg.epochs
        warmup = min(steps * cfg.warmup_epochs, total - 1)
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else cfg.learning_rate, max(total - warmup, 1), alpha=0.0,
            warmup_target=cfg.learning_rate if warmup else None, warmup_steps=warmup)
        model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay),
                      loss=ssl.NTXentLoss(cfg.temperature))
    backbone = ssl.pretrained_backbone(model)
    ckpt = Checkpoint(cfg.run_dir)
    with strategy.scope():
        state = ckpt.load(model)
    history = list(state["history"]) if state else []
    start = int(state["epoch"]) if state else 0
    if state:
        log.info("resuming at epoch %d of %d (epochs 1-%d restored from %s)", start + 1,
                 cfg.epochs, start, ckpt.dir)
    probe = None
    if cfg.probe_split and sum(data.split_counts(data.read_manifest(cfg.data_dir),
                                                 cfg.probe_split).values()):
        probe = Probe(cfg.data_dir, cfg.probe_split, cfg.input_size, cfg.backbone,
                      cfg.batch_size, cfg.knn_k)
    writer = _summary_writer(os.path.join(cfg.run_dir, "tensorboard"))
    pcfg = data.PipelineConfig(input_size=cfg.input_size, backbone=cfg.backbone,
                               shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
    views = data.ViewConfig(zoom=cfg.zoom_jitter, rotation_degrees=cfg.rotation_degrees,
                            gamma=cfg.gamma_jitter)
    log.info("SimCLR pretraining of %s at %d px: %d slices from %s, batch %d (x2 views), "
             "%d steps/epoch, epochs %d-%d", cfg.backbone, cfg.input_size, records,
             ", ".join(f"{d}:{s}" for d, s in sources), cfg.batch_size, steps, start + 1,
             cfg.epochs)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        ds = data.make_pretrain_dataset(sources, cfg.batch_size, epoch, pcfg, views)
        fit = model.fit(ds, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps,
                        verbose=1 if cfg.verbose == 1 else 0, shuffle=False)
        loss = float(fit.history["loss"][-1])
        if not math.isfinite(loss):
            raise FloatingPointError(f"the pretraining loss is {loss} at epoch {epoch + 1}: "
                                     "lower --learning_rate")
        row = {"epoch": epoch + 1, "loss": loss,
               "learning_rate": float(keras.ops.convert_to_numpy(
                   model.optimizer.learning_rate)), "seconds": round(time.time() - t0, 1)}
        if probe is not None and ((epoch + 1) % cfg.probe_every == 0 or
                                  epoch + 1 == cfg.epochs):
            row.update(probe(backbone))
        history.append(row)
        _write_scalars(writer, row)
        state = ckpt.save(model, epoch + 1, history, state)
        _write_log(cfg.run_dir, history)
        if cfg.verbose >= 1:
            extra = "".join(f", {k} {row[k]:.3f}" for k in PROBE_KEYS if k in row)
            print(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}{extra} "
                  f"({row['seconds']:.0f} s)", flush=True)
    out = os.path.join(cfg.run_dir, BACKBONE_FILE)
    save_backbone_weights(backbone, cfg.backbone, out)
    results = {"method": "simclr", "backbone": cfg.backbone, "input_size": cfg.input_size,
               "epochs": cfg.epochs, "records": records, "history": history,
               "final": history[-1] if history else {}}
    files.write_json(os.path.join(cfg.run_dir, "metrics.json"), results)
    files.rmtree(ckpt.dir)
    print(f"backbone weights: {out} (covid_keras.train --init_from={cfg.run_dir} or "
          f"--backbone_weights={out})")
    return results


def _strategy(name: str, keras):
    import contextlib

    class _NoStrategy:
        def scope(self):
            return contextlib.nullcontext()

    if keras.backend.backend() != "tensorflow":
        return _NoStrategy()
    from covid_keras.training.distributed import make_strategy

    if name == "multi_worker":
        raise ValueError("--strategy=multi_worker is not supported by pretrain (use "
                         "mirrored: every GPU of one machine)")
    return make_strategy(name)


def _summary_writer(log_dir: str):
    try:
        import tensorflow as tf
    except ImportError:  # the JAX machine: no TensorBoard files
        log.info("TensorFlow is not installed: no TensorBoard scalars")
        return None
    return tf.summary.create_file_writer(log_dir)


def _write_scalars(writer, row: dict) -> None:
    if writer is None:
        return
    import tensorflow as tf

    with writer.as_default():
        for key, value in row.items():
            if key not in ("epoch", "seconds"):
                group = "probe" if key in PROBE_KEYS else "pretrain"
                tf.summary.scalar(f"{group}/{key}", value, step=row["epoch"])
    writer.flush()


def _write_log(run_dir: str, history: list[dict]) -> None:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    files.atomic_write_text(os.path.join(run_dir, "log.csv"), buf.getvalue())


# ------------------------------------------------------------------ command line
