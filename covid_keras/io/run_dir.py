"""A training run's folder: the one owner of its file names and of how they are read.

    run = RunDir("runs/covid_ct")
    run.state()                      # "new", "resumed" (interrupted) or "finished"
    run.flags()                      # the trainer's flags: run_info.json, else flags.cfg
    path = run.checkpoint()          # best.keras, else final.keras (or --checkpoint)
    model = run.load_model()         # saving.load_model of that checkpoint
    run.model_spec()                 # backbone, input size, classes, input_norm

What ``python -m covid_keras.train --run_dir=R`` writes (every other tool reads these
names from here):

==================  ===========================================================
``run_info.json``   resolved flags, versions, git sha, dataset manifest SHA-256
``flags.cfg``       a flagfile that repeats the run
``best.keras``      the epoch chosen on validation (``best.keras.json``: which)
``final.keras``     the last epoch
``log.csv``         one row per epoch
``metrics.json``    validation metrics of the best and final models
``decision.json``   the patient rule and threshold chosen on validation
``tensorboard/``    TensorBoard events
``backup/``         the training state while running (gone once finished)
``pretrain/``       ``--pretrain_flagfile``'s pretraining stage (its own folder)
``classifier/``     ``--classifier_flagfile``'s classifier stage (an ordinary run)
``eval_<split>/``   ``python -m covid_keras.evaluate``'s output (its metrics.json)
``folds.json``      ``--folds``: the folds by patient (then best.keras is their ensemble)
``fold_<k>/``       ``--folds``: fold k's run folder (an ordinary run)
``folds_data/``     ``--folds``: each fold's data folder (``fold_<k>/``)
``out_of_fold_slices.csv``  ``--folds``: each training slice's out-of-fold prediction
``distill_targets.npz``  ``--distill_from``: the teacher's probabilities of each train
                    slice, with the teacher file's and the data manifest's SHA-256 (reused
                    only while both match, so --overwrite keeps it)
==================  ===========================================================

``covid_keras.pretrain`` keeps its own, smaller folder (``backbone.weights.h5``...).
"""

from __future__ import annotations

import json
import os

from covid_keras.core import files

RUN_INFO = "run_info.json"
FLAGS_CFG = "flags.cfg"
BEST = "best.keras"
BEST_INFO = "best.keras.json"
FINAL = "final.keras"
LOG = "log.csv"
METRICS = "metrics.json"
DECISION = "decision.json"
TENSORBOARD = "tensorboard"
BACKUP = "backup"
PRETRAIN = "pretrain"
CLASSIFIER = "classifier"
EVAL_PREFIX = "eval_"
FOLDS = "folds.json"
FOLD_PREFIX = "fold_"
FOLDS_DATA = "folds_data"
OUT_OF_FOLD = "out_of_fold_slices.csv"
DISTILL_TARGETS = "distill_targets.npz"
#: run_info.json's entry of a ``--distill_from`` run (the teacher, its SHA-256, w, T).
DISTILL_INFO = "distill"

#: The files a run writes (removed by --overwrite, with :data:`RUN_FOLDERS`).
RUN_FILES = (RUN_INFO, FLAGS_CFG, BEST, BEST_INFO, FINAL, LOG, METRICS, DECISION, FOLDS,
             OUT_OF_FOLD)
RUN_FOLDERS = (TENSORBOARD, BACKUP, FOLDS_DATA)
#: The checkpoints a tool takes when none is named, in order.
CHECKPOINTS = (BEST, FINAL)


def read_flagfile(path: str) -> dict:
    """A flagfile's flags, read through absl's flagfile reader: name -> value (a string;
    ``--flag`` / ``--noflag`` are True / False)."""
    from absl import flags as absl_flags

    argv = absl_flags.FlagValues().read_flags_from_files([f"--flagfile={path}"],
                                                          force_gnu=False)
    out: dict = {}
    for arg in argv:
        name, sep, value = arg.lstrip("-").partition("=")
        if sep:
            out[name] = value
        elif name.startswith("no"):
            out[name[2:]] = False
        else:
            out[name] = True
    return out


class RunDir:
    """A training run's folder (local or any file system ``covid_keras.core.files`` knows)."""

    RUN_FILES = RUN_FILES
    RUN_FOLDERS = RUN_FOLDERS

    def __init__(self, path: str):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __fspath__(self) -> str:
        return self.path

    # ------------------------------------------------------------ names
    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    run_info_path = property(lambda self: self.file(RUN_INFO))
    flags_path = property(lambda self: self.file(FLAGS_CFG))
    best_path = property(lambda self: self.file(BEST))
    best_info_path = property(lambda self: self.file(BEST_INFO))
    final_path = property(lambda self: self.file(FINAL))
    log_path = property(lambda self: self.file(LOG))
    metrics_path = property(lambda self: self.file(METRICS))
    decision_path = property(lambda self: self.file(DECISION))
    tensorboard_dir = property(lambda self: self.file(TENSORBOARD))
    backup_dir = property(lambda self: self.file(BACKUP))
    #: ``--pretrain_flagfile``'s stage (a covid_keras.pretrain folder) unless --pretrain_dir
    pretrain_dir = property(lambda self: self.file(PRETRAIN))
    #: ``--classifier_flagfile``'s stage (a covid_keras.train run) unless --classifier_dir
    classifier_dir = property(lambda self: self.file(CLASSIFIER))

    folds_path = property(lambda self: self.file(FOLDS))
    out_of_fold_path = property(lambda self: self.file(OUT_OF_FOLD))
    #: ``--distill_from``: the teacher's targets (not a run file: --overwrite keeps it, and
    #: it is reused only for the same teacher file and data)
    distill_targets_path = property(lambda self: self.file(DISTILL_TARGETS))

    def fold_dir(self, k: int) -> str:
        """``--folds``: fold ``k``'s run folder."""
        return self.file(f"{FOLD_PREFIX}{int(k)}")

    def fold_data_dir(self, k: int) -> str:
        """``--folds``: fold ``k``'s data folder."""
        return os.path.join(self.file(FOLDS_DATA), f"{FOLD_PREFIX}{int(k)}")

    def folds(self) -> dict | None:
        """``--folds``: folds.json (the folds by patient key, the source data folder and
        the splits they were drawn from); None for any other run."""
        if not self.has(FOLDS):
            return None
        return json.loads(files.read_text(self.folds_path))

    def is_cross_validation(self) -> bool:
        """Whether the folder holds a ``--folds`` run (its folds.json)."""
        return self.has(FOLDS)

    def eval_dir(self, split: str) -> str:
        """``python -m covid_keras.evaluate``'s default output folder for ``split``."""
        return self.file(f"{EVAL_PREFIX}{split}")

    def evaluation_metrics(self) -> str | None:
        """The metrics.json of the run's evaluation: ``eval_val/`` first, else the first
        ``eval_*/`` that has one; None without."""
        if not os.path.isdir(self.path):
            return None
        names = sorted(n for n in os.listdir(self.path) if n.startswith(EVAL_PREFIX))
        for n in (["eval_val"] if "eval_val" in names else []) + names:
            path = os.path.join(self.path, n, METRICS)
            if os.path.isfile(path):
                return path
        return None

    # ------------------------------------------------------------ state
    def has(self, name: str) -> bool:
        return files.exists(self.file(name))

    def is_run(self) -> bool:
        """Whether the folder holds a training run (its run_info.json)."""
        return self.has(RUN_INFO)

    def is_finished(self) -> bool:
        """final.keras and no backup; a ``--folds`` run: its ensemble's metrics.json."""
        if self.has(FOLDS):
            return self.has(BEST) and self.has(METRICS)
        return self.has(FINAL) and not files.isdir(self.backup_dir)

    def is_started(self) -> bool:
        return any(self.has(n) for n in (RUN_INFO, BACKUP, BEST, FOLDS))

    def state(self) -> str:
        """``"finished"`` (final.keras and no backup), ``"resumed"`` (an interrupted run:
        run_info.json, backup/ or best.keras) or ``"new"``."""
        if self.is_finished():
            return "finished"
        return "resumed" if self.is_started() else "new"

    def clear(self) -> None:
        """Removes the run's files and folders (--overwrite), nothing else of the folder."""
        for name in RUN_FILES:
            files.remove(self.file(name))
        for name in RUN_FOLDERS:
            files.rmtree(self.file(name))
        if files.isdir(self.path):  # --folds: the fold runs
            for name in files.listdir(self.path):
                if name.startswith(FOLD_PREFIX) and name[len(FOLD_PREFIX):].isdigit():
                    files.rmtree(self.file(name))

    # ------------------------------------------------------------ what was run
    def run_info(self) -> dict | None:
        """run_info.json, or None when the run has none."""
        if not self.has(RUN_INFO):
            return None
        try:
            return json.loads(files.read_text(self.run_info_path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.run_info_path} is not JSON ({exc})") from None

    def distill_teacher(self) -> str | None:
        """``--distill_from``: the teacher's run folder the run recorded (run_info.json's
        ``"distill"`` entry); None for any other run."""
        entry = (self.run_info() or {}).get(DISTILL_INFO) or {}
        return entry.get("teacher_run")

    def flags(self) -> dict:
        """The trainer's flags of the run: run_info.json's (typed), else flags.cfg's (read
        through absl, values as text); {} with neither."""
        info = self.run_info()
        if info is not None:
            return dict(info.get("flags", {}))
        if self.has(FLAGS_CFG):
            return read_flagfile(self.flags_path)
        return {}

    def checkpoint(self, checkpoint: str | None = None) -> str:
        """``checkpoint`` (a path, or a file name in the run), else the run's best.keras,
        else final.keras."""
        if checkpoint:
            if files.exists(checkpoint) and not files.isdir(checkpoint):
                return checkpoint
            if self.has(checkpoint):
                return self.file(checkpoint)
            raise FileNotFoundError(f"--checkpoint {checkpoint} is neither a file nor a file "
                                    f"of {self.path}")
        if not files.isdir(self.path):
            raise FileNotFoundError(f"{self.path} is not a run folder: no such folder")
        for name in CHECKPOINTS:
            if self.has(name):
                return self.file(name)
        raise FileNotFoundError(f"{self.path} is not a training run: it has no best.keras or "
                                "final.keras (pass the folder given to covid_keras.train as "
                                "--run_dir)")

    def model_spec(self, checkpoint: str | None = None) -> dict:
        """:func:`covid_keras.model.saving.model_spec` of the run's checkpoint (no weights
        loaded)."""
        from covid_keras.model import saving

        return saving.model_spec(self.checkpoint(checkpoint))

    def load_model(self, checkpoint: str | None = None, compile: bool = False):
        """The run's checkpoint through :func:`covid_keras.model.saving.load_model`."""
        from covid_keras.model import saving

        return saving.load_model(self.checkpoint(checkpoint), compile=compile)
