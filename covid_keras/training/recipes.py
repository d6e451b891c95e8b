"""Optimisers and learning-rate schedules of the recipes (Keras 3; no TensorFlow import).

DRENet (paper and code): SGD lr 8e-4, momentum 0.9, weight decay 1e-4, lr x 0.1 at epochs
60 and 100, batch 4. Seed 004: Adam 1e-4, then SGD 1e-3 (two stages), early stopping.
A stage is written ``OPTIMIZER@LR:EPOCHS`` (``adam@1e-4:25``).

Weight decay is *coupled* by default, as in the authors' PyTorch optimisers
(``torch.optim.SGD(weight_decay=1e-4)``): ``wd x w`` is added to the gradient before
momentum, so with momentum 0.9 it acts ~10x as strongly as Keras's decoupled
``weight_decay`` of the same number (``w -= lr x wd x w``), and with Adam at lr 1e-4 the
decoupled form is nil. ``decoupled`` keeps Keras's (AdamW / SGDW) form.

``ema_momentum`` > 0 makes the optimiser keep an exponential moving average of the
weights (Keras's ``use_ema``, updated inside each training step); the trainer validates,
checkpoints and exports that average (:class:`covid_keras.training.callbacks.SwapEMA`), while
training itself follows the raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from covid_keras.model.optimizers import CoupledAdam, CoupledSGD

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Stage:
    optimizer: str
    learning_rate: float
    epochs: int

    @classmethod
    def parse(cls, text: str) -> "Stage":
        try:
            name, rest = text.split("@")
            lr, epochs = rest.split(":")
            stage = cls(name.strip().lower(), float(lr), int(epochs))
        except ValueError:
            raise ValueError(f"A stage is OPTIMIZER@LR:EPOCHS (e.g. adam@1e-4:25). "
                             f"Received: {text!r}") from None
        if stage.optimizer not in OPTIMIZERS or stage.epochs < 1 or stage.learning_rate <= 0:
            raise ValueError(f"Stage optimizer in {OPTIMIZERS}, lr > 0, epochs >= 1. "
                             f"Received: {text!r}")
        return stage


def schedule(learning_rate: float, steps_per_epoch: int, decay_epochs: list[int],
             decay_factor: float, first_epoch: int = 0):
    """Piecewise-constant lr: x ``decay_factor`` at each epoch in ``decay_epochs`` (counted
    from the run's first epoch, so a later stage keeps the global epoch numbers)."""
    boundaries = [max(0, (e - first_epoch)) * steps_per_epoch for e in sorted(decay_epochs)
                  if e > first_epoch]
    if not boundaries:
        return learning_rate
    values = [learning_rate * decay_factor ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


WEIGHT_DECAY_TYPES = ("coupled", "decoupled")


def make_optimizer(name: str, learning_rate, momentum: float = 0.9,
                   weight_decay: float = 0.0, weight_decay_type: str = "coupled",
                   ema_momentum: float = 0.0) -> keras.optimizers.Optimizer:
    """SGD (with momentum) or Adam; weight decay coupled (PyTorch's, the authors') or
    decoupled (Keras's ``weight_decay``); with ``ema_momentum`` in (0, 1) a moving average
    of the weights besides."""
    if not 0.0 <= ema_momentum < 1.0:
        raise ValueError(f"ema_momentum must be in [0, 1). Received: {ema_momentum}")
    ema = {"use_ema": True, "ema_momentum": float(ema_momentum)} if ema_momentum else {}
    if weight_decay_type not in WEIGHT_DECAY_TYPES:
        raise ValueError(f"weight_decay_type must be one of {WEIGHT_DECAY_TYPES}. Received: "
                         f"{weight_decay_type!r}")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}. Received: {name!r}")
    if weight_decay_type == "coupled":
        if name == "sgd":
            return CoupledSGD(learning_rate, momentum=momentum, coupled_decay=weight_decay,
                              **ema)
        return CoupledAdam(learning_rate, coupled_decay=weight_decay, **ema)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=momentum,
                                    weight_decay=weight_decay or None, **ema)
    return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay or None, **ema)
