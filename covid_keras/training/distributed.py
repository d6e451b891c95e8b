"""A custom distributed training loop for MultiWorkerMirroredStrategy.

Keras 3 ``Model.fit`` fails under MultiWorkerMirroredStrategy on TF 2.21
(keras-team/keras#20585, "Attempt to convert a value (PerReplica...)"), so the multi-worker
path steps the model itself: per replica, forward + ``model.compute_loss`` (which already
scales the loss by 1 / replicas, as Keras does for compiled losses) + gradients; the
optimizer's ``apply_gradients`` all-reduces them across workers. Keras callbacks get the
usual hooks, so validation, checkpoints, backup, CSV and TensorBoard behave as with fit.

Batch-norm moving statistics are updated by each worker from its own batches and are not
all-reduced (Keras creates them with aggregation "none"): the workers' copies drift apart
(with momentum 0.9 within a few steps). Every float non-trainable variable is therefore
averaged across the replicas at each epoch end, before validation and checkpoints, so that
every worker holds, and the chief saves, the same model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from covid_keras.model import keras_private


def fit_custom_loop(model, optimizer, strategy, dataset_fn, steps_per_epoch: int,
                    initial_epoch: int, epochs: int, callbacks: list,
                    class_weight: dict | None = None) -> None:
    """``dataset_fn(input_context)`` returns this input pipeline's per-replica batches
    (``tf.distribute.Strategy.distribute_datasets_from_function``: explicit sharding)."""
    import keras

    with strategy.scope():
        model.optimizer = optimizer  # callbacks (TensorBoard lr, backup) read it here
        optimizer.build(model.trainable_variables)
        loss_mean = keras.metrics.Mean(name="loss")
    weights = None
    if class_weight:
        weights = tf.constant([class_weight[i] for i in range(len(class_weight))], tf.float32)

    def replica_step(x, y):
        sample_weight = tf.gather(weights, y) if weights is not None else None
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        loss_mean.update_state(loss * strategy.num_replicas_in_sync)

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        strategy.run(replica_step, args=(x, y))

    stats = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    def replica_means():
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.MEAN,
                              [tf.identity(v.value) for v in stats])

    @tf.function
    def sync_statistics():
        means = strategy.run(replica_means)
        for v, m in zip(stats, means):  # cross-replica context: every local copy
            v.assign(strategy.experimental_local_results(m)[0])

    dist_ds = strategy.distribute_datasets_from_function(dataset_fn)
    iterator = iter(dist_ds)
    cb = keras.callbacks.CallbackList(callbacks, model=model, add_progbar=False,
                                      epochs=epochs, steps=steps_per_epoch)
    model.stop_training = False
    cb.on_train_begin()
    epoch = keras_private.initial_epoch(model, initial_epoch)  # set by BackupAndRestore
    while epoch < epochs and not model.stop_training:
        loss_mean.reset_state()
        for m in model.metrics:
            m.reset_state()
        cb.on_epoch_begin(epoch)
        for step in range(steps_per_epoch):
            cb.on_train_batch_begin(step)
            train_step(iterator)
            cb.on_train_batch_end(step, {"loss": float(loss_mean.result())})
        if stats:
            sync_statistics()
        logs = {"loss": float(loss_mean.result())}
        for m in model.metrics:
            result = m.result()
            if np.ndim(result) == 0:
                logs[m.name] = float(result)
        cb.on_epoch_end(epoch, logs)
        epoch += 1
    with strategy.scope():  # as Keras's fit: the weights' moving average, if kept, stays
        optimizer.finalize_variable_values(model.trainable_variables)
    cb.on_train_end()


_MULTI_WORKER = None


def make_strategy(name: str):
    """The tf.distribute strategy named by ``--strategy`` (train and pretrain):
    ``multi_worker`` (TF_CONFIG), ``one_device`` (the first GPU, else the CPU), or
    ``mirrored``: every visible GPU, several logical CPUs (tests), else one device."""
    global _MULTI_WORKER
    if name == "multi_worker":
        # One per process, made before any other TensorFlow op (collective ops are set up
        # at start-up): --folds makes it first, then the fold's training takes the same.
        if _MULTI_WORKER is None:
            _MULTI_WORKER = tf.distribute.MultiWorkerMirroredStrategy()
        return _MULTI_WORKER
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(cpus) if len(cpus) > 1 else \
        tf.distribute.OneDeviceStrategy(cpus[0])
