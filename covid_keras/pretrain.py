r"""Self-supervised pretraining of the image backbone on unlabelled slices (no ImageNet).

    python -m covid_keras.pretrain --flagfile=configs/pretrain_covid_ct.cfg \
        --data_dir=tfrecords/covid_ct_holdout --run_dir=runs/pretrain_covid_ct

SimCLR (:mod:`covid_keras.training.ssl`): two augmented views of each slice (crop / zoom, flip,
rotation, gamma and brightness that keep black black; no colour jitter on an HU window),
the backbone and a projection MLP, the NT-Xent loss. It reads the TFRecords of
``--splits`` (default ``train``; a split named ``test`` only with ``--allow_test``) through
the trainer's tf.data code, parsing the image alone: labels are never read.

The run folder receives ``backbone.weights.h5`` (what ``covid_keras.train
--backbone_weights=FILE`` and ``--init_from=<this run folder>`` read), ``metrics.json``
(the per-epoch history), ``log.csv``, ``run_info.json``, ``flags.cfg`` (repeats the run)
and ``tensorboard/`` (the loss, the learning rate and, where the data folder has a
labelled ``--probe_split``, a k-nearest-neighbour probe's and a linear probe's slice and
patient AUC on it from the backbone's features and the train split's labels: diagnostics
that choose nothing, the last epoch's weights are the output). ``checkpoint/`` holds the
state while it runs: a killed run resumes at its last finished epoch when the same command
is run again.
"""

from __future__ import annotations

import logging

from covid_keras.core import cli, files
from covid_keras.training import pretraining

log = logging.getLogger("covid_keras.pretrain")


_DEFINED = False


def define_flags() -> None:
    """The command's flags (defined when it runs, so that importing this module next to
    covid_keras.train, whose flags share these names, defines nothing)."""
    global _DEFINED
    if _DEFINED:
        return
    from absl import flags

    d = pretraining.PretrainConfig("", "")
    flags.DEFINE_string("data_dir", None, "Folder of TFRecords written by data_prep.")
    flags.DEFINE_string("run_dir", None, "Output folder of the pretraining run (created).")
    flags.DEFINE_list("splits", list(d.splits), "Splits of --data_dir (and "
                      "--extra_data_dir) whose slices are read, unlabelled.")
    flags.DEFINE_bool("allow_test", False, "Allow a split named 'test' in --splits "
                      "(transductive use of a held-out split).")
    flags.DEFINE_string("extra_data_dir", None, "A second data_prep folder whose --splits "
                        "are read too (e.g. generated studies: python -m data_prep.phantom).")
    flags.DEFINE_string("backbone", d.backbone, "Backbone to pretrain (the trainer's "
                        "--backbone: resnet50, vgg16, densenet121, densenet169, tiny).")
    flags.DEFINE_string("backbone_weights", None, "Start from these weights (None: random; "
                        "'imagenet' downloads; or a .weights.h5 file).")
    flags.DEFINE_integer("input_size", d.input_size, "Input side in pixels.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Slices per batch (each gives 2 views).")
    flags.DEFINE_integer("epochs", d.epochs, "Epochs.")
    flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass).")
    flags.DEFINE_float("learning_rate", d.learning_rate, "Peak AdamW learning rate (linear "
                       "warm-up, then cosine decay to 0).")
    flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW (decoupled) weight decay.")
    flags.DEFINE_integer("warmup_epochs", d.warmup_epochs, "Warm-up epochs.")
    flags.DEFINE_float("temperature", d.temperature, "NT-Xent temperature.")
    flags.DEFINE_integer("projection_dim", d.projection_dim, "Projection output width.")
    flags.DEFINE_integer("projection_hidden_units", d.projection_hidden_units,
                         "Projection hidden width.")
    flags.DEFINE_float("zoom_jitter", d.zoom_jitter, "View crop: a square of side x U(1 - z, "
                       "1) of the image's, resized back.", lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_float("rotation_degrees", d.rotation_degrees, "View rotation, +- degrees.")
    flags.DEFINE_float("gamma_jitter", d.gamma_jitter, "View gamma: pixel ** exp(U(-ln(1 + g), "
                       "ln(1 + g))).", lower_bound=0.0)
    flags.DEFINE_float("bn_momentum", d.bn_momentum, "Batch-norm momentum (Keras's).")
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer, "Record shuffle buffer.")
    flags.DEFINE_integer("seed", 0, "Random seed (weights, order, views).")
    flags.DEFINE_enum("strategy", d.strategy, ["mirrored", "one_device"],
                      "tf.distribute strategy (TensorFlow backend).")
    flags.DEFINE_string("probe_split", d.probe_split, "Labelled split scored by the k-NN "
                        "and the linear probe each --probe_every epochs ('' : none). Chooses "
                        "nothing.")
    flags.DEFINE_integer("probe_every", d.probe_every, "Probe every N epochs.")
    flags.DEFINE_integer("knn_k", d.knn_k, "Neighbours of the k-NN probe.")
    flags.DEFINE_bool("overwrite", False, "Start --run_dir again from scratch.")
    flags.DEFINE_bool("reuse", False, "A finished run in --run_dir with the same flags is "
                      "kept (nothing runs) instead of being an error; other flags are still "
                      "an error (covid_keras.train's pretraining stage).")
    flags.DEFINE_integer("verbose", d.verbose, "0 silent, 1 a step bar and a line per epoch, "
                         "2 a line per epoch.")
    _DEFINED = True


def config_from_flags() -> pretraining.PretrainConfig:
    from absl import flags

    values = {}
    for name in pretraining.PretrainConfig.__dataclass_fields__:
        v = flags.FLAGS[name].value
        if name in pretraining.PATH_FLAGS and v and v != "imagenet":
            v = files.absolute(v)
        values[name] = tuple(s for s in v if s) if name == "splits" else v
    return pretraining.PretrainConfig(**values)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_flags()
    pretraining.check_config(cfg)
    cli.setup_logging(0)
    log.setLevel(logging.INFO)  # setup_logging leaves absl (and so the root) at WARNING
    pretraining.pretrain(cfg)
    return 0


def run_main(argv=None):
    define_flags()
    cli.run(main, required=["data_dir", "run_dir"], argv=argv, program="covid_keras.pretrain")


if __name__ == "__main__":
    run_main()
