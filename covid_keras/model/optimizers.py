"""The optimisers a compiled ``.keras`` file of the project names, registered with Keras
under ``covid_keras>`` (Keras 3; no TensorFlow import). Here, in the model wing, so that
loading a model (:func:`covid_keras.model.saving.register`) needs nothing from training;
:func:`covid_keras.training.recipes.make_optimizer` chooses among them.

Weight decay is *coupled*, as in the authors' PyTorch optimisers
(``torch.optim.SGD(weight_decay=1e-4)``): ``coupled_decay x w`` is added to the gradient
before momentum (see :mod:`covid_keras.training.recipes`).
"""

from __future__ import annotations

import keras
from keras import ops


def build_optimizer(model) -> None:
    """Creates ``model``'s optimizer variables now, eagerly, if they are not there yet.

    For a model compiled outside a distribution strategy on the TensorFlow backend, Keras
    defers this to the first trace of the train step, and TensorFlow traces the step a
    second time because the first created variables (``tf.function``'s rule). Built here,
    the step is traced once: a ResNet-50 DRENet's first step at 64 px took 31 s instead of
    55 s, a tiny one's 5.9 s instead of 12.3 s (bench/README.md, "Test suite"). The trainer
    and pretrain need no call before training: their models have a strategy, and Keras then
    builds the optimizer itself (``_symbolic_build``, the same call as here), as it does on
    JAX. The variables are the same either way. Also called before a checkpoint that holds
    optimizer state is loaded (a resumed run: :mod:`covid_keras.model.keras_private`,
    pretraining's checkpoint).
    """
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


class _CoupledDecay:
    """Mixin: adds ``coupled_decay x variable`` to each (already aggregated) gradient in
    ``update_step``, which every backend calls once per variable."""

    def update_step(self, gradient, variable, learning_rate):
        if self.coupled_decay:
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.coupled_decay,
                                                               gradient.dtype),
                                                      ops.cast(variable, gradient.dtype)))
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["coupled_decay"] = self.coupled_decay
        return config


@keras.saving.register_keras_serializable(package="covid_keras")
class CoupledSGD(_CoupledDecay, keras.optimizers.SGD):
    """SGD with PyTorch's (coupled) weight decay."""

    def __init__(self, *args, coupled_decay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.coupled_decay = float(coupled_decay)


@keras.saving.register_keras_serializable(package="covid_keras")
class CoupledAdam(_CoupledDecay, keras.optimizers.Adam):
    """Adam with PyTorch's (coupled, L2) weight decay."""

    def __init__(self, *args, coupled_decay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.coupled_decay = float(coupled_decay)
