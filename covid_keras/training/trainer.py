"""The trainer of ``python -m covid_keras.train`` (whose docstring describes the run
folder and the strategies): :class:`TrainConfig` (every flag, built from the flags once
by the command), the run folder (new, resumed, reused), the stages before training
(pretraining, classifier), ``start_run``, ``make_model``, ``run_stages``, ``finish_run``
and :func:`train`, one run start to end; the summaries the command prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys

from covid_keras.core import cli, files, provenance, schema
from covid_keras.io.run_dir import BEST, DISTILL_INFO, RunDir

log = logging.getLogger("covid_keras.train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: every flag of ``covid_keras.train`` under the same name, with the
    flags' defaults. Built from the flags once (:meth:`from_flags`); everything below takes
    it as an argument. Lists are tuples (a frozen config)."""
    data_dir: str | None = None
    run_dir: str | None = None
    model: str = "drenet"
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    variant: str = "paper"
    head_hidden_units: int | None = None
    trainable: str = "all"
    init_from: str | None = None
    pretrain_flagfile: str | None = None
    pretrain_dir: str | None = None
    classifier_flagfile: str | None = None
    classifier_dir: str | None = None
    classifier_data_dir: str | None = None
    distill_from: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    input_size: int = 448
    epochs: int = 120
    batch_size: int = 4
    optimizer: str = "sgd"
    learning_rate: float = 8e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_type: str = "coupled"
    ema_momentum: float = 0.0
    lr_decay_epochs: tuple = ("60", "100")
    lr_decay_factor: float = 0.1
    stages: tuple = ()
    early_stopping_patience: int = 0
    checkpoint_monitor: str = "smoothed_patient_auc"
    decision_criterion: str = "youden"
    target_sensitivity: float = 0.9
    class_balanced: bool = False
    class_weights: bool = False
    rotation_degrees: float = 0.0
    zoom_jitter: float = 0.0
    gamma_jitter: float = 0.0
    brightness_jitter: str = "multiplicative"
    input_norm: str = "none"
    navigator_anchors: str = "all"
    bn_momentum: float = 0.9
    bn_stats: str = "moving"
    deterministic: bool = True
    seed: int = 0
    steps_per_epoch: int = 0
    val_split: str = "val"
    report_splits: tuple = ()
    strategy: str = "mirrored"
    backup_every_steps: int = 0
    mixed_precision: bool = False
    jit_compile: bool = False
    num_display_images: int = 4
    shuffle_buffer: int = 512
    verbose: int = 1
    overwrite: bool = False
    cpu_devices: int = 0
    folds: int = 0
    fold: int = -1
    ensemble_only: bool = False
    reuse: bool = False

    @classmethod
    def from_flags(cls, values) -> "TrainConfig":
        """The config of the parsed flags (``values``: absl's FlagValues, the command's)."""
        out = {}
        for field in dataclasses.fields(cls):
            v = values[field.name].value
            out[field.name] = tuple(v) if isinstance(v, list) else v
        return cls(**out)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def items(self):
        """(name, value) of every setting, lists as lists (as absl gives them)."""
        for field in dataclasses.fields(self):
            v = getattr(self, field.name)
            yield field.name, list(v) if isinstance(v, tuple) else v


PATH_FLAGS = ("data_dir", "run_dir", "init_from", "backbone_weights", "pretrain_flagfile",
              "pretrain_dir", "classifier_flagfile", "classifier_dir", "classifier_data_dir",
              "distill_from")
#: One-shot actions, not what the run was: never written to flags.cfg (a reused flags.cfg
#: must not replace the finished run it came from).
NOT_RECORDED = ("overwrite", "fold", "ensemble_only", "reuse")


def recorded_value(name: str, value):
    """A flag's value as a run records it: a local path flag made absolute."""
    if name in PATH_FLAGS and isinstance(value, str) and value not in ("", "imagenet"):
        return files.absolute(value)
    return value


def resolved_flags(cfg: TrainConfig) -> dict:
    """The run's settings by flag name (run_info.json, the resume check, hparams)."""
    return {k: recorded_value(k, v) for k, v in cfg.items()}


def write_run_info(cfg: TrainConfig, run_dir: str, extra: dict,
                   command: list[str] | None = None) -> None:
    from covid_keras.io import data

    manifest_sha = files.sha256(data.manifest_path(cfg.data_dir))
    info = {"flags": resolved_flags(cfg), "versions": provenance.package_versions(),
            "git_sha": provenance.git_sha(),
            "dataset_manifest_sha256": manifest_sha, "seed": cfg.seed,
            "command": " ".join(sys.argv if command is None else command), **extra}
    run = RunDir(run_dir)
    files.write_json(run.run_info_path, info)
    files.atomic_write_text(run.flags_path, program_flagfile(cfg))


def flag_line(name: str, value) -> str:
    """``--name=value`` as absl writes it (``--name`` / ``--noname`` for a bool, a list
    comma-separated); '' for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        return f"--{name}={','.join(str(v) for v in value)}"
    return f"--{name}={value}"


def program_flagfile(cfg: TrainConfig) -> str:
    """The run's flags (the trainer's own, not absl's, TensorFlow's or a test runner's),
    one per line: ``--flagfile=<run>/flags.cfg`` repeats the run."""
    lines = [flag_line(k, v) for k, v in resolved_flags(cfg).items() if k not in NOT_RECORDED]
    return "".join(line + "\n" for line in lines if line)


RUN_FILES = RunDir.RUN_FILES
# Flags that do not change what a run computes: a resumed run may change them.
RESUMABLE_CHANGES = ("overwrite", "verbose", "report_splits", "num_display_images",
                     "cpu_devices", "backup_every_steps", "data_dir", "run_dir", "fold",
                     "ensemble_only", "reuse", "classifier_dir")


def changed_flags(stored: dict, current: dict) -> list[str]:
    """``--name: old -> new`` for every run-defining flag that differs (a flag the stored
    run did not know yet counts as its default)."""
    defaults = dict(TrainConfig().items())
    out = []
    for name in sorted(set(stored) | set(current)):
        if name in RESUMABLE_CHANGES:
            continue
        old, new = stored.get(name, defaults.get(name)), current.get(name)
        if old != new and not (isinstance(old, list) and list(old) == list(new or [])):
            out.append(f"--{name}: {old!r} -> {new!r}")
    return out


def changed_data(cfg: TrainConfig, info: dict) -> list[str]:
    """``["--data_dir: other data than the run's (...)"]`` when the run (its run_info.json)
    was trained on another build of the data than --data_dir holds now: its manifest.json
    differs (a build into a new or emptied folder draws a new salt, so other keys and
    another record order), unless both are the same fold of the same --folds data; else
    []."""
    from covid_keras.io import data
    from covid_keras.training import folds

    sha = files.sha256(data.manifest_path(cfg.data_dir))
    trained_on = info.get("dataset_manifest_sha256", sha)
    if trained_on == sha or folds.same_fold_data(info.get("flags", {}).get("data_dir", ""),
                                                 trained_on, cfg.data_dir):
        return []
    return [f"--data_dir: other data than the run's ({cfg.data_dir})"]


def prepare_run_dir(cfg: TrainConfig, run_dir: str, teacher: dict | None = None) -> str:
    """Creates the run folder and says what the run will do: ``"new"``, ``"resume"`` (an
    interrupted run with the same run-defining flags) or ``"overwrite"`` (the folder's run
    files are removed first, for a finished and for an interrupted run alike). A finished
    run without ``cfg.overwrite``, or an interrupted one whose flags changed (or whose
    --distill_from teacher file did: ``teacher``, :func:`distill.teacher`), is an error."""
    from covid_keras.training import distill

    run = RunDir(run_dir)
    finished, started = run.is_finished(), run.is_started()
    if cfg.overwrite and (finished or started):
        run.clear()
        log.info("--overwrite: %s starts again from scratch", run_dir)
        return "overwrite"
    if finished:
        raise ValueError(f"{run_dir} holds a finished run: evaluate it with python -m "
                         f"covid_keras.evaluate --run_dir={run_dir}, repeat it into another "
                         f"folder with --flagfile={run.flags_path} "
                         "--run_dir=<new folder>, or pass --overwrite to replace it")
    if started:
        info = run.run_info()
        if info is not None:
            if changed_data(cfg, info):
                raise ValueError(f"{run_dir} holds an interrupted run that trained on another "
                                 f"build of {cfg.data_dir} (its manifest.json has changed "
                                 "since: a build into a new folder draws a new salt, so "
                                 "another record order): rebuild it with the run's salt "
                                 "(build_tfrecords --salt_file), or pass --overwrite to "
                                 "start again")
            diff = changed_flags(info.get("flags", {}), resolved_flags(cfg)) + \
                distill.changed_teacher(info, teacher)
            if diff:
                raise ValueError(f"{run_dir} holds an interrupted run with other flags ("
                                 f"{'; '.join(diff)}): rerun with its flags "
                                 f"(--flagfile={run.flags_path}) to "
                                 "resume, or pass --overwrite to start again")
        return "resume"
    files.makedirs(run_dir)
    return "new"


def reused_run(cfg: TrainConfig) -> dict | None:
    """--reuse: the metrics of the finished run in --run_dir when it was run with the same
    run-defining flags on the same data; None when there is no finished run, or (with
    --overwrite) when it differs, so that it is replaced; an error naming what differs
    otherwise."""
    from covid_keras.io import data
    from covid_keras.training import distill

    run = RunDir(cfg.run_dir)
    if not (cfg.reuse and run.is_finished()):
        return None
    manifest = data.read_manifest(cfg.data_dir)
    current = resolved_flags(apply_init_from_spec(cfg, manifest["classes"]))
    info = run.run_info() or {}
    diff = changed_flags(info["flags"] if "flags" in info else run.flags(), current)
    sha = files.sha256(data.manifest_path(cfg.data_dir))
    if distill.enabled(cfg):
        diff += distill.changed_teacher(info, distill.teacher(cfg, manifest, sha))
    diff += changed_data(cfg, info)
    if not reuse_verdict(cfg, diff):
        return None
    return json.loads(files.read_text(run.metrics_path)) if files.exists(run.metrics_path) \
        else {}


def reuse_verdict(cfg: TrainConfig, diff: list[str], what: str = "run") -> bool:
    """--reuse of the finished ``what`` in --run_dir, which differs from these flags by
    ``diff``: True (the same: reused), False (with --overwrite: replaced), or an error
    naming the differences."""
    if diff and cfg.overwrite:
        log.info("--reuse --overwrite: %s holds a finished %s with other flags (%s): "
                 "replaced", cfg.run_dir, what, "; ".join(diff))
        return False
    if diff:
        raise ValueError(f"--reuse: {cfg.run_dir} holds a finished {what} with other flags "
                         f"({'; '.join(diff)}): pass another --run_dir, or --overwrite to "
                         "replace it")
    log.info("--reuse: %s holds a finished %s with these flags: reused", cfg.run_dir, what)
    return True


#: The classifier stage's backbone file, beside its best.keras.
CLASSIFIER_BACKBONE = "classifier_backbone.weights.h5"

#: ``"module:function"`` that runs a stage's ``python -m ...`` command in place of a
#: subprocess and returns its exit status (the tests: a fork of an interpreter that has
#: TensorFlow imported already); unset, as for users: a subprocess.
STAGE_RUNNER_ENV = "COVID_KERAS_STAGE_RUNNER"


def run_stage(cmd: list[str]) -> int:
    """The exit status of a stage's command ``[python, -m, module, args...]``: run as a
    subprocess, or by what $COVID_KERAS_STAGE_RUNNER names."""
    runner = os.environ.get(STAGE_RUNNER_ENV)
    if runner:
        import importlib

        module, _, name = runner.partition(":")
        return getattr(importlib.import_module(module), name)(cmd)
    return subprocess.run(cmd).returncode


def classifier_stage(cfg: TrainConfig, run_dir: str) -> str:
    """--classifier_flagfile: trains (or resumes, or reuses) the classifier stage in its
    own run folder, a subprocess of this command with the same seed and the same data,
    validation and held-out splits (or --classifier_data_dir's, with its own val split and
    nothing held out), and returns its image backbone as a weights file (written from its
    best.keras, again whenever best.keras is newer)."""
    from covid_keras.model import saving
    from covid_keras.training.transfer import write_image_backbone

    folder = cfg.classifier_dir or RunDir(run_dir).classifier_dir
    cmd = [sys.executable, "-m", "covid_keras.train",
           f"--flagfile={cfg.classifier_flagfile}", f"--run_dir={folder}",
           f"--seed={cfg.seed}", f"--verbose={cfg.verbose}", "--reuse"]
    if cfg.overwrite and not cfg.classifier_dir:  # the run's own stage starts again too,
        cmd.append("--overwrite")                 # unless it is the same (then reused)
    if cfg.classifier_data_dir:  # other data: its own val split, nothing held out reported
        cmd += [f"--data_dir={cfg.classifier_data_dir}", "--report_splits="]
    else:
        cmd += [f"--data_dir={cfg.data_dir}", f"--val_split={cfg.val_split}",
                f"--report_splits={','.join(cfg.report_splits)}"]
    log.info("stage 0, the classifier: %s", " ".join(cmd[1:]))
    code = run_stage(cmd)
    if code:
        raise RuntimeError(f"the classifier stage failed (exit {code}; its error is the "
                           "line above): rerun to resume it, or run it alone to see why: "
                           f"python {' '.join(cmd[1:])} --verbosity=1")
    stage = RunDir(folder)
    out = stage.file(CLASSIFIER_BACKBONE)
    chosen = stage.checkpoint()
    arch = saving.saved_model_spec(chosen)["backbone"]  # a reused stage too
    if arch != cfg.backbone:
        raise ValueError(f"--classifier_flagfile trains a {arch} backbone, this run a "
                         f"{cfg.backbone} one: give both the same --backbone")
    if not files.exists(out) or os.path.getmtime(out) < os.path.getmtime(chosen):
        write_image_backbone(saving.load_model(chosen, compile=False), out)
    log.info("stage 0 done: starting from the classifier's backbone (%s)", out)
    return out


def init_from_backbone(cfg: TrainConfig) -> bool:
    """--init_from names a pretraining run folder or a backbone weights file (not a
    .keras model)."""
    return bool(cfg.init_from) and not cfg.init_from.endswith(".keras")


def backbone_weights(cfg: TrainConfig, run_dir: str) -> str | None:
    """The backbone's starting weights: the pretraining stage's (--pretrain_flagfile, run
    or reused here), the classifier stage's (--classifier_flagfile, likewise), --init_from's
    pretraining run or file, else --backbone_weights."""
    from covid_keras.training import pretraining

    if cfg.pretrain_flagfile:
        folder = cfg.pretrain_dir or RunDir(run_dir).pretrain_dir
        cmd = [sys.executable, "-m", "covid_keras.pretrain",
               f"--flagfile={cfg.pretrain_flagfile}", f"--data_dir={cfg.data_dir}",
               f"--run_dir={folder}", "--reuse"]
        if cfg.overwrite and not cfg.pretrain_dir:  # the run's own stage: replaced when it
            cmd.append("--overwrite")               # differs (flags, data), else reused
        log.info("stage 0, pretraining: %s", " ".join(cmd[1:]))
        code = run_stage(cmd)
        if code:
            raise RuntimeError(f"the pretraining stage failed (exit {code}): rerun to resume "
                               f"it, or run python -m covid_keras.pretrain "
                               f"--flagfile={cfg.pretrain_flagfile} --run_dir={folder} "
                               "alone to see why")
        return pretraining.weights_file(folder)
    if cfg.classifier_flagfile:
        return classifier_stage(cfg, run_dir)
    if init_from_backbone(cfg):
        return pretraining.weights_file(cfg.init_from)
    return cfg.backbone_weights or None


def apply_init_from_spec(cfg: TrainConfig, classes: list[str]) -> TrainConfig:
    """--init_from: the loaded model's backbone, input size and input normalisation replace
    the flags' (and are what run_info.json records), with a log line when they differ."""
    if not cfg.init_from or init_from_backbone(cfg):
        return cfg
    from covid_keras.model.saving import saved_model_spec

    try:
        spec = saved_model_spec(cfg.init_from)
    except ValueError as exc:
        raise ValueError(f"--init_from: {exc}") from None
    if spec["num_classes"] != len(classes):
        raise ValueError(f"--init_from has {spec['num_classes']} classes, the dataset "
                         f"{len(classes)} ({classes}). Received: {cfg.init_from}")
    changes = {}
    spec = {"navigator_anchors": "all", **spec}  # the spec names only "lung"
    if cfg.navigator_anchors == "lung" and spec["model"] == "drenet":
        # the flag wins over an unrestricted model: build_model rebuilds it with the option
        # (the lung mask's layer has no weights; every weight is copied)
        spec["navigator_anchors"] = "lung"
    for name in ("backbone", "input_size", "model", "input_norm", "navigator_anchors"):
        if getattr(cfg, name) != spec[name]:
            log.info("--init_from: %s %s (from the model; the flag said %s)", name,
                     spec[name], getattr(cfg, name))
            changes[name] = spec[name]
    return cfg.replace(**changes)


def check_splits(cfg: TrainConfig, manifest: dict) -> None:
    """Every split the run will read exists and is not empty, and no held-out split is the
    one that chooses the checkpoint: checked before anything is written or trained."""
    from covid_keras.io import data

    report = [s for s in cfg.report_splits if s]
    if cfg.val_split in report:
        raise ValueError(f"--report_splits must not include the val split "
                         f"{cfg.val_split!r}: it chooses the checkpoint. Received: "
                         f"--report_splits={','.join(report)}")
    for flag, split in [("train", "train"), ("--val_split", cfg.val_split)] + [
            ("--report_splits", s) for s in report]:
        slices = sum(data.split_counts(manifest, split).values())
        if slices == 0:
            known = sorted(s for s in manifest.get("counts", {})
                           if sum(data.split_counts(manifest, s).values()))
            why = manifest.get("empty_splits", {}).get(split) or (
                "data_prep assigned it no patients: too few patients for "
                "--split_fractions, or a manifest without that split"
                if split in ("train", "val", "test") else "no such split")
            raise ValueError(f"{flag}: the split {split!r} has no slices in "
                             f"{cfg.data_dir} ({why}; its splits with slices: {known}).")
        data.shard_files(cfg.data_dir, split)


# ------------------------------------------------------------------ strategy
def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                    "chief" not in resolver.cluster_spec().as_dict())


# ------------------------------------------------------------------ model
def run_preprocessing(cfg: TrainConfig, run: RunDir) -> bool:
    """Whether the run's model normalises its own input (``include_preprocessing``: its
    first layer is the backbone's ``BackboneNormalization`` and the input pipeline feeds it
    the raw pixel values). A model loaded with --init_from keeps its own; a resumed run
    whose best checkpoint was saved without the layer (by a trainer before it: every run
    folder made then) goes on without it, so that the checkpoint, the model it continues
    and the one input pipeline that validates both agree (the backup's weights load either
    way: the layer has none); every new model has it."""
    from covid_keras.model.saving import saved_model_spec

    if cfg.init_from and not init_from_backbone(cfg):
        return saved_model_spec(cfg.init_from)["include_preprocessing"]
    if run.has(BEST):
        return saved_model_spec(run.best_path)["include_preprocessing"]
    return True


def build_model(cfg: TrainConfig, num_classes: int, weights: str | None = None,
                include_preprocessing: bool = True):
    """The model the config describes; ``weights``: the backbone's starting weights
    (:func:`backbone_weights`); ``include_preprocessing``: the backbone's normalisation is
    its first layer (:func:`run_preprocessing`; a model loaded with --init_from is as it
    was saved)."""

    from covid_keras.model.backbones import set_bn_momentum
    from covid_keras.model.baselines import apply_trainable, build_classifier
    from covid_keras.model.drenet import build_drenet

    if cfg.init_from and not init_from_backbone(cfg):  # checked at start-up
        from covid_keras.model import saving

        model = saving.load_model(cfg.init_from)
        build = getattr(model, "build_config", None)
        if (cfg.navigator_anchors == "lung" and isinstance(build, dict)
                and build.get("navigator_anchors", "all") != "lung"):
            from covid_keras.model.drenet import rebuild_drenet

            log.info("--init_from: rebuilt with --navigator_anchors=lung (weights copied)")
            model = rebuild_drenet(model, navigator_anchors="lung")
    elif cfg.model == "drenet":
        model = build_drenet(num_classes, input_size=cfg.input_size,
                             backbone=cfg.backbone, weights=weights,
                             variant=cfg.variant, trainable=cfg.trainable,
                             head_hidden_units=cfg.head_hidden_units,
                             bn_momentum=cfg.bn_momentum, input_norm=cfg.input_norm,
                             include_preprocessing=include_preprocessing,
                             navigator_anchors=cfg.navigator_anchors)
    else:
        model = build_classifier(cfg.backbone, num_classes, cfg.input_size,
                                 weights, trainable=cfg.trainable,
                                 input_norm=cfg.input_norm,
                                 include_preprocessing=include_preprocessing)
    apply_trainable(model, cfg.trainable)
    set_bn_momentum(model, cfg.bn_momentum)  # the classifier's, a loaded model's
    if hasattr(model, "build_config"):  # DRENet: saved files rebuild with the same freezing
        model.build_config.update({"trainable": cfg.trainable,  # and momentum
                                   "bn_momentum": float(cfg.bn_momentum)})
    return model


def compile_model(model, optimizer, jit_compile: bool, distill: tuple | None = None):
    """``distill=(w, T)``: a --distill_from run (y carries the teacher's probabilities:
    covid_keras.model.losses.DISTILL_Y)."""
    import keras

    from covid_keras.model import losses

    if type(model).__name__ == "DRENet":
        model.distill = None if distill is None else tuple(float(v) for v in distill)
        model.compile(optimizer=optimizer, jit_compile=jit_compile)
    elif distill is not None:
        model.compile(optimizer=optimizer, jit_compile=jit_compile,
                      loss={"logits": losses.DistillationLoss(*distill)})
    else:
        model.compile(optimizer=optimizer, jit_compile=jit_compile,
                      loss={"logits": keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True)})


# ------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    """What one training run works with once it has started (:func:`start_run`)."""
    cfg: TrainConfig
    run: RunDir
    manifest: dict
    classes: list
    strategy: object
    chief: bool
    global_batch: int
    steps: int
    pipeline: object            # data.PipelineConfig
    stages: list
    decay_epochs: list
    targets: object = None      # data.TeacherTargets of --distill_from, else None


def setup_runtime(cfg: TrainConfig, debug: bool = False):
    """Process-wide settings of a run (seed, op determinism, precision, logical CPUs);
    returns keras."""
    keras = cli.import_keras_quietly(debug)
    import tensorflow as tf

    if not debug:
        cli.tensorflow_info_off()
    if cfg.cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_devices)
        except RuntimeError:  # the runtime is up already (a second run in this process)
            log.info("--cpu_devices: the devices of this process are set already")
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.mixed_precision:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    return keras


def start_run(cfg: TrainConfig, command: list[str] | None = None) -> Run:
    """Checks the data and the recipe, prepares the run folder (new, resumed or
    overwritten) and writes run_info.json and flags.cfg: everything before the model."""
    from covid_keras.io import data
    from covid_keras.training import callbacks as cbs
    from covid_keras.training import distill
    from covid_keras.training.distributed import make_strategy

    manifest = data.read_manifest(cfg.data_dir)
    check_splits(cfg, manifest)
    cfg = apply_init_from_spec(cfg, manifest["classes"])
    stages, decay_epochs = check_recipe(cfg)
    classes = manifest["classes"]
    data_sha = files.sha256(data.manifest_path(cfg.data_dir))
    teacher = distill.teacher(cfg, manifest, data_sha) if distill.enabled(cfg) else None
    strategy = make_strategy(cfg.strategy)
    chief = is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    run_dir = cfg.run_dir if chief else os.path.join(
        cfg.run_dir, f".worker-{strategy.cluster_resolver.task_id}")
    cbs.close_writers()
    mode = prepare_run_dir(cfg, run_dir, teacher)
    if mode == "resume":
        log.info("%s holds an interrupted run with the same flags: resuming it", run_dir)
    if chief:
        extra = {} if teacher is None else {
            DISTILL_INFO: distill.run_info_entry(cfg, teacher)}
        write_run_info(cfg, run_dir, {"strategy": cfg.strategy,
                                      "strategy_class": type(strategy).__name__,
                                      "replicas": replicas, "global_batch": global_batch,
                                      "classes": classes, **extra}, command)
    log.info("%s, %d replica(s), global batch %d, classes %s", type(strategy).__name__,
             replicas, global_batch, classes)
    # the model's input: raw pixel values for a model that normalises them itself
    normalize = not run_preprocessing(cfg, RunDir(cfg.run_dir))
    pipeline = data.PipelineConfig(input_size=cfg.input_size, backbone=cfg.backbone,
                                   normalize=normalize, rotation_degrees=cfg.rotation_degrees,
                                   brightness=cfg.brightness_jitter,
                                   zoom=cfg.zoom_jitter, gamma=cfg.gamma_jitter,
                                   shuffle_buffer=cfg.shuffle_buffer,
                                   deterministic=cfg.deterministic,
                                   class_balanced=cfg.class_balanced,
                                   num_classes=len(classes), seed=cfg.seed,
                                   lung_mask=cfg.navigator_anchors == "lung")
    train_slices = sum(data.split_counts(manifest, "train").values())
    if train_slices < global_batch:
        raise ValueError(f"The train split has {train_slices} slices, fewer than one global "
                         f"batch ({global_batch}).")
    steps = cfg.steps_per_epoch or max(1, train_slices // global_batch)
    # --distill_from: the teacher's probabilities of the train slices (cached in the run)
    targets = None
    if teacher is not None:
        targets = distill.targets(cfg, RunDir(run_dir), teacher, data_sha, global_batch)
        import keras

        # loading the teacher drew from Keras's seed generator: the student starts from
        # the same weights whether the teacher predicted now or its targets were cached
        keras.utils.set_random_seed(cfg.seed)
    return Run(cfg, RunDir(run_dir), manifest, classes, strategy, chief, global_batch, steps,
               pipeline, stages, decay_epochs, targets)


def make_model(r: Run):
    """The run's model, from its starting weights (recorded in run_info.json when they came
    from a pretraining stage or run)."""
    cfg = r.cfg
    # every worker resolves the same file (MultiWorkerMirroredStrategy copies only the
    # initial values; the file loads after them); a stage, which only the chief could run,
    # is refused under multi_worker (check_recipe, check_fold_flags)
    weights = backbone_weights(cfg, r.run.path)
    if weights and weights != cfg.backbone_weights and r.chief:
        info = r.run.run_info()
        info["backbone_weights"] = {"path": os.path.abspath(weights),
                                    "sha256": files.sha256(weights)}
        files.write_json(r.run.run_info_path, info)
    with r.strategy.scope():
        model = build_model(cfg, len(r.classes), weights,
                            include_preprocessing=not r.pipeline.normalize)
    from covid_keras.model.saving import model_spec

    if model_spec(model)["include_preprocessing"] == r.pipeline.normalize:  # never expected
        raise RuntimeError("the input pipeline does not feed the model what it expects "
                           f"(normalised input: {r.pipeline.normalize})")
    return model


def stage_callbacks(r: Run, i: int, validation, best_cb, population: list) -> list:
    """The callbacks of stage ``i``: validation and the best checkpoint (on the moving
    average with --ema_momentum), the atomic backup, log.csv, early stopping, TensorBoard
    and the console line."""
    import keras

    from covid_keras.training import callbacks as cbs

    cfg = r.cfg
    # With --ema_momentum, validation and the best checkpoint see the weights' moving
    # average; the backup (and training) the raw weights.
    ema = [cbs.SwapEMA()] if cfg.ema_momentum else []
    callbacks = ema + population + [validation, best_cb] + ema + [
        cbs.AtomicBackupAndRestore(
            os.path.join(r.run.backup_dir, f"stage{i}"),
            save_freq=cfg.backup_every_steps or "epoch", delete_checkpoint=True),
        cbs.CSVLogger(r.run.log_path, append=True),
    ]
    if cfg.early_stopping_patience:
        key, mode, _, _ = cbs.CHECKPOINT_MONITORS[cfg.checkpoint_monitor]
        callbacks.append(keras.callbacks.EarlyStopping(
            key, mode=mode, patience=cfg.early_stopping_patience))
    if r.chief:
        callbacks.append(cbs.GroupedTensorBoard(r.run.tensorboard_dir))
    callbacks.append(cbs.EpochLine(sum(st.epochs for st in r.stages), r.steps, cfg.verbose,
                                   best_cb))
    return callbacks


def run_stages(r: Run, model, validation, best_cb) -> None:
    """Trains every stage of the recipe (resuming a killed run where its backup stopped;
    a finished stage of a multi-stage recipe is restored, not repeated)."""
    from covid_keras.io import data
    from covid_keras.training import callbacks as cbs
    from covid_keras.training import recipes

    cfg = r.cfg
    # per-replica batches (the batch norms are not synchronised: each replica
    # normalises its own --batch_size), in a fixed shuffled order (batches that mix
    # studies and classes, as in training)
    population = [cbs.PopulationBatchNorm(data.make_dataset(
        cfg.data_dir, "train", cfg.batch_size, training=False, cfg=r.pipeline,
        order_seed=cfg.seed))] if cfg.bn_stats == "population" else []
    class_weight = data.class_weights(r.manifest) if cfg.class_weights else None
    distilling = None if r.targets is None else (cfg.distill_weight, cfg.distill_temperature)
    first_epoch = 0
    for i, stage in enumerate(r.stages):
        last_epoch = first_epoch + stage.epochs
        done_path = os.path.join(r.run.backup_dir, f"stage{i}.done.weights.h5")
        if files.exists(done_path):  # a resumed run: this stage finished before the kill
            model.load_weights(done_path)
            log.info("stage %d finished in an earlier run: its weights are restored", i)
            first_epoch = last_epoch
            continue
        with r.strategy.scope():
            lr = recipes.schedule(stage.learning_rate, r.steps, r.decay_epochs,
                                  cfg.lr_decay_factor, first_epoch)
            optimizer = recipes.make_optimizer(stage.optimizer, lr, cfg.momentum,
                                               cfg.weight_decay, cfg.weight_decay_type,
                                               cfg.ema_momentum)
        callbacks = stage_callbacks(r, i, validation, best_cb, population)
        log.info("stage %d: %s lr %g, epochs %d-%d, %d steps/epoch", i, stage.optimizer,
                 stage.learning_rate, first_epoch, last_epoch, r.steps)
        if cfg.strategy == "multi_worker":
            from covid_keras.training.distributed import fit_custom_loop

            def dataset_fn(ctx):
                return data.make_dataset(
                    cfg.data_dir, "train", ctx.get_per_replica_batch_size(r.global_batch),
                    training=True, cfg=r.pipeline, repeat=True,
                    shard=(ctx.input_pipeline_id, ctx.num_input_pipelines))

            fit_custom_loop(model, optimizer, r.strategy, dataset_fn, r.steps, first_epoch,
                            last_epoch, callbacks, class_weight)
        else:
            train_ds = data.make_dataset(cfg.data_dir, "train", r.global_batch,
                                         training=True, cfg=r.pipeline, repeat=True,
                                         targets=r.targets)
            weights = class_weight
            if distilling and class_weight:  # as sample weights: y is not a label
                from covid_keras.training.distill import with_class_weights

                train_ds, weights = with_class_weights(train_ds, class_weight), None
            compile_model(model, optimizer, cfg.jit_compile, distilling)
            model.fit(train_ds, epochs=last_epoch, initial_epoch=first_epoch,
                      steps_per_epoch=r.steps, callbacks=callbacks,
                      class_weight=weights, verbose=0, shuffle=False)
        first_epoch = last_epoch
        if len(r.stages) > 1:  # remembered, so a run killed in a later stage does not redo it
            files.makedirs(os.path.dirname(done_path))
            tmp = done_path.replace(".done.", ".tmp.")
            model.save_weights(tmp)
            files.rename(tmp, done_path)
        # Early stopping ends the current stage only: seed 004 runs its SGD stage after the
        # Adam stage whatever happened in it.
        model.stop_training = False


def finish_run(r: Run, model, validation) -> dict:
    """The end of a run: final.keras, the best checkpoint's validation metrics, the
    decision chosen on val, the held-out report splits, metrics.json. Returns the
    results (metrics.json's content)."""
    from covid_keras.evaluation import metrics
    from covid_keras.model import saving
    from covid_keras.training import callbacks as cbs

    cfg, run, classes = r.cfg, r.run, r.classes
    final = validation.evaluate(model)[0]
    results = {"val_split": cfg.val_split, "deterministic": bool(cfg.deterministic),
               "final": final}
    if r.chief:
        files.rmtree(run.backup_dir)  # the run finished
        saving.save_model(model, run.final_path, classes)
        if run.has(BEST):
            best = best_model(r, model)
            results["best"], best_out = validation.evaluate(best)
            decision = choose_decision(cfg, run.path, validation.evaluator, best, best_out,
                                       classes)
            if decision is not None:
                results["decision"] = {k: decision[k] for k in (
                    "rule", "threshold", "criterion", "positive_class", "split")}
            chosen = json.loads(files.read_text(run.best_info_path))
            results["best_epoch"] = chosen["epoch"]
            results["checkpoint_monitor"] = chosen["monitor"]
            for split in cfg.report_splits:
                held_out = cbs.PatientValidation(
                    cbs.Evaluator(cfg.data_dir, split, r.global_batch, r.pipeline, 0),
                    classes, None)
                results[f"best_on_{split}"], out = held_out.evaluate(best)
                print("best checkpoint on held-out " +
                      summary_line(results[f"best_on_{split}"], split))
                if decision is not None:
                    preds = held_out.evaluator.predictions(best, classes, outputs=_plain(out))
                    m = metrics.evaluate_predictions(preds, decision, n_bootstrap=0)
                    results[f"decision_on_{split}"] = metrics.public_result(m)
                    print("  at the decision: " + decision_line(m))
        files.write_json(run.metrics_path, results)
        validation.write_best(results.get("best"), results.get("best_epoch"))
    print(summary_line(final, cfg.val_split))
    if r.chief:
        print(final_summary(cfg, run.path, results, classes))
    return results


def best_model(r: Run, model):
    """best.keras for the end of a run. In one process, its weights go into the trained
    model, which is saved as final.keras by then: the validation predictions have traced
    that model's predict function already, and a second model would cost a load and a
    trace of its own (about 2.5 s a run). A multi-worker chief loads a model of its own:
    the trained one's variables and functions belong to every worker's strategy."""
    from covid_keras.model import saving

    if r.cfg.strategy == "multi_worker":
        return saving.load_model(r.run.best_path)
    model.load_weights(r.run.best_path)
    return model


def train(cfg: TrainConfig, command: list[str] | None = None) -> dict:
    """One training run, start to end (or resumed to its end): what ``python -m
    covid_keras.train`` does with these flags. Returns metrics.json's content."""
    from covid_keras.training import callbacks as cbs

    reused = reused_run(cfg)
    if reused is not None:
        return reused
    r = start_run(cfg, command)
    cfg = r.cfg
    evaluator = cbs.Evaluator(cfg.data_dir, cfg.val_split, r.global_batch, r.pipeline,
                              cfg.num_display_images)
    model = make_model(r)
    hparams = {k: v for k, v in resolved_flags(cfg).items()
               if k not in ("data_dir", "run_dir")}
    hparams["dataset"] = r.manifest.get("dataset", os.path.basename(
        os.path.normpath(cfg.data_dir)))
    validation = cbs.PatientValidation(evaluator, r.classes, r.run.tensorboard_dir,
                                       hparams=hparams, write=r.chief)
    best_cb = cbs.BestCheckpoint(r.run.best_path, monitor=cfg.checkpoint_monitor,
                                 write=r.chief, class_names=r.classes)
    run_stages(r, model, validation, best_cb)
    return finish_run(r, model, validation)


def summary_line(m: dict, split: str) -> str:
    """One line per split: accuracy, AUC (and the macro AUC over more than two classes),
    then COVID-vs-rest sensitivity / specificity of the argmax (labelled so: a perfect AUC
    with a zero argmax sensitivity is a threshold, not a ranking, problem)."""
    def f(v):
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    def level(name: str, count: str) -> str:
        macro = (f" macro AUC {f(m[name + '_macro_auc'])}" if name + "_macro_auc" in m
                 else "")
        return (f"{count} {m[count]} argmax accuracy {f(m[name + '_accuracy'])}{macro} | COVID AUC "
                f"{f(m[name + '_auc'])}, argmax sensitivity {f(m[name + '_sensitivity'])} "
                f"specificity {f(m[name + '_specificity'])}")

    return f"{split}: {level('patient', 'patients')} || {level('slice', 'slices')}"


def _plain(out: dict) -> dict:
    """A validation callback's outputs as the model gave them (no probabilities, no probe)."""
    return {k: v for k, v in out.items() if k not in ("probs", "head_input")}


def choose_decision(cfg: TrainConfig, run_dir: str, evaluator, best, best_out: dict,
                    classes: list[str]):
    """decision.json: the patient rule and threshold chosen on the val split's predictions
    of best.keras (--decision_criterion). None, with a warning, when val cannot choose one
    (e.g. a class missing from it)."""
    from covid_keras.evaluation import decision

    preds = evaluator.predictions(best, classes, outputs=_plain(best_out))
    try:
        return decision.write_decision(run_dir, preds, split=cfg.val_split,
                                       checkpoint=BEST, criterion=cfg.decision_criterion,
                                       target_sensitivity=cfg.target_sensitivity)
    except ValueError as exc:
        log.warning("no decision.json (predictions use the argmax): %s", exc)
        return None


def decision_line(m: dict) -> str:
    """Patient-level sensitivity / specificity / accuracy at the stored decision."""
    p = m["patient"]

    def f(key):
        v = p.get(key, {}).get("value")
        return "n/a" if v is None else f"{v:.3f}"

    return (f"patients {p['count']}: sensitivity {f('sensitivity')}, specificity "
            f"{f('specificity')}, accuracy {f('accuracy')} ({m['decision']['rule']} rule, "
            f"{m.get('positive_class', 'positive')} >= "
            f"{m['decision']['threshold']:.4g})")


def final_summary(cfg: TrainConfig, run_dir: str, results: dict, classes: list[str]) -> str:
    """Where the models are, which epoch was chosen and how, the positive class and the
    decision rule (``decision.json`` when evaluation wrote one, else the argmax)."""
    from covid_keras.evaluation import decision, metrics

    run = RunDir(run_dir)
    lines = []
    if "best_epoch" in results:
        lines.append(f"best checkpoint: epoch {results['best_epoch']} (chosen by "
                     f"{cfg.checkpoint_monitor} on {cfg.val_split!r}): "
                     f"{run.best_path}")
    lines.append(f"last epoch: {run.final_path}")
    lines.append(f"positive class: {classes[metrics.positive_index(classes)]!r} of {classes}")
    if files.exists(run.decision_path):
        d = json.loads(files.read_text(run.decision_path))
        rule = decision.rule_text(d.get("rule"), d.get("positive_class"),
                                  d.get("threshold"), d.get("normal_class"))
        lines.append(f"decision: {rule} ({d.get('criterion')}, chosen on "
                     f"{d.get('split', cfg.val_split)!r})")
    else:
        lines.append("decision: argmax of the class probabilities (no decision.json)")
    lines.append(f"metrics: {run.metrics_path}, TensorBoard: "
                 f"tensorboard --logdir {run.tensorboard_dir}")
    return "\n".join(lines)


def check_recipe(cfg: TrainConfig):
    """--stages, --lr_decay_epochs and --backbone_weights, checked before anything is
    written. Returns (stages, decay epochs)."""
    from covid_keras.training import recipes

    stages = [recipes.Stage.parse(s) for s in cfg.stages if s] or [
        recipes.Stage(cfg.optimizer, cfg.learning_rate, cfg.epochs)]
    try:
        decay_epochs = [int(e) for e in cfg.lr_decay_epochs if str(e).strip()]
    except ValueError:
        raise ValueError("--lr_decay_epochs must be whole epochs, comma-separated. "
                         f"Received: {','.join(cfg.lr_decay_epochs)}") from None
    if cfg.classifier_flagfile:
        if cfg.pretrain_flagfile or cfg.init_from or cfg.backbone_weights:
            raise ValueError("--classifier_flagfile makes the backbone's starting weights: it "
                             "takes no --pretrain_flagfile (put that in the classifier's "
                             "flagfile), --init_from or --backbone_weights")
        if cfg.strategy == "multi_worker":
            raise ValueError("--classifier_flagfile is not supported with --strategy="
                             "multi_worker: train the classifier first, then pass "
                             "--backbone_weights=<its backbone>")
        if not os.path.isfile(cfg.classifier_flagfile):
            raise FileNotFoundError(f"--classifier_flagfile={cfg.classifier_flagfile}: no "
                                    "such file")
    elif cfg.classifier_data_dir:
        raise ValueError("--classifier_data_dir needs --classifier_flagfile")
    if cfg.navigator_anchors != "all" and cfg.model != "drenet":
        raise ValueError("--navigator_anchors=lung is DRENet's: a classifier has no navigator "
                         f"(Received: --model={cfg.model})")
    if cfg.classifier_data_dir and not files.exists(
            os.path.join(cfg.classifier_data_dir, schema.MANIFEST)):
        raise FileNotFoundError(f"--classifier_data_dir={cfg.classifier_data_dir} is not a "
                                f"data_prep output (no {schema.MANIFEST})")
    if cfg.pretrain_flagfile and (cfg.init_from or cfg.backbone_weights):
        raise ValueError("--pretrain_flagfile makes the backbone's starting weights: it "
                         "takes neither --init_from nor --backbone_weights")
    if cfg.pretrain_flagfile and cfg.strategy == "multi_worker":
        raise ValueError("--pretrain_flagfile is not supported with --strategy=multi_worker: "
                         "pretrain first (python -m covid_keras.pretrain), then pass "
                         "--init_from=<its run folder>")
    if cfg.pretrain_flagfile and not os.path.isfile(cfg.pretrain_flagfile):
        raise FileNotFoundError(f"--pretrain_flagfile={cfg.pretrain_flagfile}: no such file")
    if init_from_backbone(cfg):
        from covid_keras.training import pretraining

        pretraining.weights_file(cfg.init_from)  # a one-line error before anything runs
    weights = cfg.backbone_weights
    if weights not in (None, "", "imagenet") and not files.exists(weights):
        raise FileNotFoundError(f"--backbone_weights={weights}: no such file (use "
                                "'imagenet' or a local weights file)")
    from covid_keras.training import distill

    distill.check_flags(cfg)
    for name in ("bn_momentum", "ema_momentum"):
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{name} must be in [0, 1). Received: {value}")
    if cfg.epochs < 1 and not cfg.stages:
        raise ValueError(f"--epochs must be >= 1. Received: {cfg.epochs}")
    if cfg.bn_stats == "population" and cfg.strategy == "multi_worker":
        raise ValueError("--bn_stats=population runs the model outside the replicas "
                         "(one device, or --strategy=mirrored); it is not supported with "
                         "--strategy=multi_worker")
    return stages, decay_epochs
