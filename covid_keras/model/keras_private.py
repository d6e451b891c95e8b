"""Every use of Keras internals in the project, fenced in one module (no TensorFlow).

Keras's public API has no hook for these, so they are used here and nowhere else:

* ``keras.src.losses.loss.scale_loss_for_distribution``: a custom ``compute_loss`` scales
  its loss for the distribution strategy as Keras's own losses do (DRENet);
* ``Model._initial_epoch``: where ``fit`` (and our multi-worker loop) starts after a
  restore; ``BackupAndRestore`` sets it the same way;
* ``Layer._flatten_layers``: every layer nested in a model, through subclassed layers
  that ``Model.layers`` does not enter (:func:`all_layers`);
* ``BackupAndRestore``'s private members (``_save_model``, ``_load_model``,
  ``_training_metadata_path``, ``_current_epoch``, ``_last_batch_seen``,
  ``backup_dir``): :class:`AtomicBackupAndRestore` overrides the two methods;
* ``SwapEMAWeights._swap_variables``: exchanges a model's trainable weights with its
  optimizer's moving averages (``use_ema=True``), in place and across the replicas of a
  distribution strategy (:func:`swap_ema_weights`).

``tests/test_keras_private.py`` checks each of them on the installed Keras and pins the
Keras version they were read from (:data:`KERAS_CHECKED`): a new Keras fails that test
until this module is checked against it.
"""

from __future__ import annotations

import json
import logging
import os

import keras
from keras.src.losses.loss import scale_loss_for_distribution  # noqa: F401 (re-exported)

from covid_keras.model.optimizers import build_optimizer

KERAS_CHECKED = "3.15"  # major.minor of the Keras these internals were read from
BACKUP_PRIVATE_MEMBERS = ("_save_model", "_load_model", "_training_metadata_path",
                          "_current_epoch", "_last_batch_seen", "backup_dir")


def initial_epoch(model: keras.Model, default: int = 0) -> int:
    """The epoch a restored model resumes at (``Model._initial_epoch``), else ``default``
    (as Keras's ``fit``: ``self._initial_epoch or initial_epoch``)."""
    return int(getattr(model, "_initial_epoch", None) or default)


def set_initial_epoch(model: keras.Model, epoch: int) -> None:
    model._initial_epoch = int(epoch)


def all_layers(model: keras.layers.Layer) -> list:
    """Every layer inside ``model`` (itself excluded), recursively, each once: also those
    held by subclassed layers (DRENet's head, its branch views), which ``Model.layers`` and
    ``Model.submodules`` do not list."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def swap_ema_weights(model: keras.Model) -> None:
    """Exchange ``model``'s trainable weights with the moving averages its optimizer keeps
    (``use_ema=True``); a second call swaps them back. Keras's public ``SwapEMAWeights``
    does this only around ``evaluate``/``predict`` or at every epoch's edges; its swap
    itself (per backend, distribution strategies included) is what we call."""
    swapper = keras.callbacks.SwapEMAWeights()
    swapper.set_model(model)
    swapper._swap_variables()


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore with an atomic commit, so that a run killed at any moment
    resumes. Keras writes ``latest.weights.h5`` in place and then the epoch metadata: a kill
    mid-write leaves weights that cannot be read, and a kill between the two files pairs
    new weights with an old epoch. Here the weights alternate between two files and the
    metadata, which names the file, is renamed into place last: it is the commit."""

    _slot = 0

    def _save_model(self):
        from covid_keras.core import files

        files.makedirs(self.backup_dir)
        self._slot = 1 - self._slot
        name = f"slot{self._slot}.weights.h5"
        self.model.save_weights(os.path.join(self.backup_dir, name), overwrite=True)
        files.atomic_write_text(self._training_metadata_path, json.dumps(
            {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}))

    def _load_model(self):
        from covid_keras.core import files

        if not files.exists(self._training_metadata_path):
            return
        meta = json.loads(files.read_text(self._training_metadata_path))
        build_optimizer(self.model)
        self.model.load_weights(os.path.join(self.backup_dir, meta["weights"]))
        self._slot = int(meta["weights"][len("slot")])
        set_initial_epoch(self.model, meta["epoch"])
        logging.getLogger("covid_keras.train").info(
            "resuming from epoch %d: epochs 1-%d restored from %s", meta["epoch"] + 1,
            meta["epoch"], self.backup_dir)
