"""Train DRENet or a baseline on data_prep's TFRecords.

    python -m covid_keras.train --flagfile=configs/drenet_covid_vs_bacterial.cfg \\
        --data_dir=tfrecords/mine --run_dir=runs/drenet_cvb

The run folder receives: ``run_info.json`` (resolved flags, package versions, git sha, the
dataset manifest's SHA-256, the seed, the strategy), ``flags.cfg`` (a flagfile that repeats
the run), ``best.keras`` (the epoch chosen on validation by ``--checkpoint_monitor``) with
``best.keras.json``, ``final.keras``, ``log.csv``, ``metrics.json`` (validation metrics of
the best and final models), ``tensorboard/`` (each loss term, learning rate, slice- and
patient-level AUC / sensitivity / specificity, PR curves, slices with their top-K boxes,
HParams) and ``backup/`` while running (a killed run restarts where its last backup stopped: run the
same command again).

Strategies: ``mirrored`` (default: every visible GPU; one device on CPU) trains with
``Model.fit``; ``multi_worker`` (MultiWorkerMirroredStrategy with TF_CONFIG) uses a custom
distributed loop around the model's ``compute_loss``, because Keras 3 ``fit`` fails under
that strategy on TF 2.21 (keras-team/keras#20585). Global batch = per-replica batch x
replicas; only the chief writes.
"""

from __future__ import annotations

import logging
import time

from absl import flags

from covid_keras.core import cli
from covid_keras.core.imaging import BRIGHTNESS_JITTERS, INPUT_NORMS
from covid_keras.training import trainer

FLAGS = flags.FLAGS
log = logging.getLogger("covid_keras.train")


_DEFINED = False


def define_flags() -> None:
    """Defines the trainer's flags (once; importing this module defines none, so other
    commands' flags of the same names never clash with them in one process)."""
    global _DEFINED
    if _DEFINED:
        return
    d = trainer.TrainConfig()
    flags.DEFINE_string("data_dir", d.data_dir, "Folder of TFRecords written by data_prep "
                        "(shards + manifest.json).")
    flags.DEFINE_string("run_dir", d.run_dir, "Output folder of the run (created).")
    flags.DEFINE_enum("model", d.model, ["drenet", "classifier"], "DRENet or a plain "
                      "backbone classifier (the baselines).")
    flags.DEFINE_enum("backbone", d.backbone, ["resnet50", "vgg16", "densenet121",
                                               "densenet169", "tiny"],
                      "Backbone (tiny: CPU tests and demo).")
    flags.DEFINE_string("backbone_weights", d.backbone_weights, "None, 'imagenet' "
                        "(downloads) or a local weights file.")
    flags.DEFINE_enum("variant", d.variant, ["paper", "code"], "DRENet as in the paper or as "
                      "in the authors' code.")
    flags.DEFINE_integer("head_hidden_units", d.head_hidden_units, "DRENet head: hidden "
                         "width of the MLP over the concatenated features (default: the "
                         "variant's, paper 512, code 0 = one Dense).")
    flags.DEFINE_enum("trainable", d.trainable, ["all", "last3", "head"], "What trains: "
                      "everything, the backbone's last 3 conv layers + classifier (seed "
                      "004), or the head only (fine-tuning with --init_from).")
    flags.DEFINE_string("init_from", d.init_from, "Start from this .keras model (fine-tuning "
                        "on a new hospital's data), or from a pretraining run's image "
                        "backbone: a finished covid_keras.pretrain run folder or its "
                        "backbone.weights.h5 (as --backbone_weights).")
    flags.DEFINE_string("pretrain_flagfile", d.pretrain_flagfile, "A first stage: "
                        "self-supervised pretraining of the backbone (python -m "
                        "covid_keras.pretrain with this flagfile, on --data_dir, into "
                        "--pretrain_dir), then training from its weights. A relative path "
                        "in a flagfile is read beside that flagfile. A finished pretraining "
                        "with the same flags is reused; an interrupted one resumes.")
    flags.DEFINE_string("pretrain_dir", d.pretrain_dir, "The pretraining stage's run folder "
                        "(default <run_dir>/pretrain; several runs, e.g. seeds, may share "
                        "one).")
    flags.DEFINE_string("classifier_flagfile", d.classifier_flagfile, "A first stage: a "
                        "plain backbone classifier trained with this flagfile (python -m "
                        "covid_keras.train on --data_dir with the same --seed, --val_split "
                        "and --report_splits, into --classifier_dir); this run then starts "
                        "from its image backbone (the checkpoint its --val_split chose). "
                        "Labels of held-out splits are never used. A relative path in a "
                        "flagfile is read beside that flagfile. A finished stage with the "
                        "same flags is reused; an interrupted one resumes.")
    flags.DEFINE_string("classifier_dir", d.classifier_dir, "The classifier stage's run "
                        "folder (default <run_dir>/classifier; e.g. the ResNet-50 run of "
                        "the same seed, which is then reused; with --folds, a --folds run "
                        "of the classifier flagfile with the same folds, whose finished "
                        "fold_<k> is fold k's stage; without a stage it is "
                        "ignored, and it is where the stage lives, not what the run is: a "
                        "resume or --reuse may change it).")
    flags.DEFINE_string("classifier_data_dir", d.classifier_data_dir, "The classifier "
                        "stage's data (default --data_dir), e.g. generated studies "
                        "(python -m data_prep.phantom, any number of patients: supervised "
                        "pretraining on phantoms); its own val split chooses its checkpoint "
                        "and it reports no held-out split.")
    flags.DEFINE_string("distill_from", d.distill_from, "Distil a finished run (typically a "
                        "--folds ensemble; its best.keras, else final.keras) into this "
                        "run's one model: before training the teacher predicts every train "
                        "slice once (no augmentation; cached as <run_dir>/"
                        "distill_targets.npz with the teacher's and the data's SHA-256), and "
                        "the loss mixes the labels with those probabilities "
                        "(--distill_weight, --distill_temperature). The teacher must have "
                        "been trained on --data_dir (its recorded manifest SHA-256) with "
                        "the same classes, on no split this run holds out (train and "
                        "--val_split only). A --folds teacher of this data folder trained on "
                        "the val patients too: the student's val figures (checkpoint, "
                        "decision) are then not clean; held-out splits stay clean. Not with "
                        "--folds.")
    flags.DEFINE_float("distill_weight", d.distill_weight, "With --distill_from: w in "
                       "[0, 1], loss = (1 - w) CE(labels) + w T^2 CE(teacher at T, "
                       "student logits / T); 0: the labels alone, 1: the teacher alone. "
                       "DRENet: its raw and concat terms (region and ranking terms stay on "
                       "the labels).")
    flags.DEFINE_float("distill_temperature", d.distill_temperature, "With --distill_from: "
                       "T > 0, the temperature of both softmaxes in the distillation term "
                       "(the teacher's: softmax(log p / T)); 1 leaves the probabilities as "
                       "they are.")
    flags.DEFINE_integer("input_size", d.input_size, "Model input side in pixels.")
    flags.DEFINE_integer("epochs", d.epochs, "Epochs (ignored with --stages).")
    flags.DEFINE_integer("batch_size", d.batch_size, "Per-replica batch size.")
    flags.DEFINE_enum("optimizer", d.optimizer, ["sgd", "adam"], "Optimiser (ignored with "
                      "--stages).")
    flags.DEFINE_float("learning_rate", d.learning_rate, "Initial learning rate.")
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.")
    flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay (see "
                       "--weight_decay_type).")
    flags.DEFINE_enum("weight_decay_type", d.weight_decay_type, ["coupled", "decoupled"],
                      "coupled: PyTorch's (the authors'): wd x w added to the gradient, ~10x "
                      "Keras's decoupled form under momentum 0.9; decoupled: Keras's "
                      "weight_decay.")
    flags.DEFINE_float("ema_momentum", d.ema_momentum, "Validate, checkpoint and export an "
                       "exponential moving average of the weights (Polyak averaging), "
                       "updated every step with this momentum (0.99: about the last 100 "
                       "steps); 0: the weights as trained. Training itself follows the raw "
                       "weights.")
    flags.DEFINE_list("lr_decay_epochs", list(d.lr_decay_epochs), "Epochs at which lr x "
                      "--lr_decay_factor.")
    flags.DEFINE_float("lr_decay_factor", d.lr_decay_factor, "Learning-rate decay factor.")
    flags.DEFINE_list("stages", list(d.stages), "Two-stage recipes: OPTIMIZER@LR:EPOCHS,... "
                      "(seed 004: adam@1e-4:25,sgd@1e-3:25).")
    flags.DEFINE_integer("early_stopping_patience", d.early_stopping_patience, "Epochs "
                         "without improvement of --checkpoint_monitor before stopping (0: "
                         "off).")
    flags.DEFINE_enum("checkpoint_monitor", d.checkpoint_monitor,
                      ["smoothed_patient_auc", "prediction_loss", "patient_auc"],
                      "What chooses best.keras on --val_split: smoothed_patient_auc (the "
                      "mean val patient AUC of the epoch and the two before; ties: lower "
                      "prediction loss), prediction_loss (the prediction's cross-entropy "
                      "over every val slice; ties: higher patient AUC) or patient_auc (ties: "
                      "lower prediction loss). The chosen epoch is in best.keras.json and "
                      "metrics.json.")
    flags.DEFINE_enum("decision_criterion", d.decision_criterion, ["youden", "sensitivity"],
                      "How the patient decision (aggregation rule + threshold, "
                      "decision.json) is chosen on --val_split at the end of training: "
                      "youden (max sensitivity + specificity - 1) or sensitivity (the best "
                      "specificity with sensitivity >= --target_sensitivity).")
    flags.DEFINE_float("target_sensitivity", d.target_sensitivity, "With "
                       "--decision_criterion=sensitivity.")
    flags.DEFINE_bool("class_balanced", d.class_balanced, "Sample classes equally in "
                      "training.")
    flags.DEFINE_bool("class_weights", d.class_weights, "Weight the loss by inverse class "
                      "frequency.")
    flags.DEFINE_float("rotation_degrees", d.rotation_degrees, "Random rotation "
                       "augmentation, +- degrees.")
    flags.DEFINE_float("zoom_jitter", d.zoom_jitter, "Random zoom augmentation: a square of "
                       "side x U(1 - z, 1) of the image's, at a random place, resized back "
                       "(0: off).", lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_float("gamma_jitter", d.gamma_jitter, "Random gamma augmentation: pixel ** "
                       "exp(U(-ln(1 + g), ln(1 + g))), brightness and contrast together, "
                       "black stays black (0: off).", lower_bound=0.0)
    flags.DEFINE_enum("brightness_jitter", d.brightness_jitter, list(BRIGHTNESS_JITTERS),
                      "Training brightness jitter. multiplicative: x U(0.874, 1.126) as the "
                      "authors (black stays black). additive: +- 0.1 and contrast x U(0.8, "
                      "1.2), the earlier recipe: it greys the masked background, so train "
                      "images differ from val/test ones; kept to measure the change "
                      "(bench/README.md).")
    flags.DEFINE_enum("input_norm", d.input_norm, list(INPUT_NORMS),
                      "per_image: the model's first layer shifts and scales every image to "
                      "zero mean and a fixed spread, so its prediction does not depend on "
                      "the image's overall brightness or contrast (saved with the model: "
                      "evaluation, export, serving and prediction do the same). none: raw "
                      "intensities.")
    flags.DEFINE_enum("navigator_anchors", d.navigator_anchors, ["all", "lung"],
                      "DRENet's navigator chooses its top-K regions among all anchors (the "
                      "paper), or with lung only among the anchors at least a quarter on the "
                      "record's lung mask (mask/encoded), which the model then takes as a "
                      "second input, augmented with the image; an image with no such anchor "
                      "(all black, no mask) falls back to all. Saved with the model: "
                      "evaluation, covid_keras.predict and the page (also with --server) "
                      "restrict with the study's lung masks, and so do the export's "
                      "predict_study and gradcam (their extra lung_masks input); "
                      "serving_default and predict_images do NOT restrict (a mask of ones: "
                      "image-only inputs). --init_from an unrestricted model rebuilds it "
                      "with the option. Not adopted by default: see the README (its "
                      "accuracy cost is to be measured).")
    flags.DEFINE_float("bn_momentum", d.bn_momentum, "Momentum of every batch-norm layer's "
                       "moving statistics (PyTorch's 0.1 = Keras 0.9). Keras's default 0.99 "
                       "leaves them stale on short runs (inference-mode accuracy below "
                       "training mode's).")
    flags.DEFINE_enum("bn_stats", d.bn_stats, ["moving", "population"], "Batch-norm "
                      "statistics that validation, the checkpoints and the export use: "
                      "moving (each batch norm's moving average of recent training batches) "
                      "or population (recomputed at each epoch's end for that epoch's "
                      "weights, the averaged ones with --ema_momentum, over the whole "
                      "training split: unaugmented, --batch_size batches in a fixed shuffled "
                      "order; covid_keras.training.bn_stats; one extra forward pass over the "
                      "training split per epoch).")
    flags.DEFINE_bool("deterministic", d.deterministic, "Deterministic input order and TF "
                      "ops: a rerun with the same flags and --seed repeats the run (on the "
                      "demo, CPU: no measurable cost). --nodeterministic: faster where an "
                      "op's deterministic kernel is slow; a GPU op without one is an error "
                      "under it.")
    flags.DEFINE_integer("seed", d.seed, "Random seed (weights, shuffling, augmentation).")
    flags.DEFINE_integer("steps_per_epoch", d.steps_per_epoch, "Training steps per epoch "
                         "(0: one pass).")
    flags.DEFINE_string("val_split", d.val_split, "Split that chooses the checkpoint.")
    flags.DEFINE_list("report_splits", list(d.report_splits), "Held-out splits (e.g. test) "
                      "on which the best checkpoint is evaluated once at the end "
                      "(metrics.json); never used to choose anything.")
    flags.DEFINE_enum("strategy", d.strategy, ["mirrored", "multi_worker", "one_device"],
                      "tf.distribute strategy.")
    flags.DEFINE_integer("backup_every_steps", d.backup_every_steps, "Back up the training "
                         "state every N steps too (0: at epoch ends only).")
    flags.DEFINE_bool("mixed_precision", d.mixed_precision, "mixed_bfloat16 compute (GPUs).")
    flags.DEFINE_bool("jit_compile", d.jit_compile, "Compile the train step with XLA.")
    flags.DEFINE_integer("num_display_images", d.num_display_images, "Validation slices "
                         "shown with their boxes.")
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer, "Record shuffle buffer.")
    flags.DEFINE_integer("verbose", d.verbose, "Console progress: 0 silent, 1 a step bar and "
                         "one line per epoch, 2 one line per epoch (loss, val loss, val "
                         "patient AUC, time; the full metrics go to TensorBoard and "
                         "log.csv).")
    flags.DEFINE_bool("overwrite", d.overwrite, "Start --run_dir again from scratch, whether "
                      "it holds a finished or an interrupted run. Without it a finished run "
                      "is an error and an interrupted one resumes, if its flags are the "
                      "same. A one-shot action: flags.cfg does not record it.")
    flags.DEFINE_integer("cpu_devices", d.cpu_devices, "Split the CPU into this many logical "
                         "devices (tests of MirroredStrategy without GPUs; 0: leave it).")
    flags.DEFINE_integer("folds", d.folds, "K-fold cross-validation by patient (0: off): "
                         "the training patients (train + --val_split; never a held-out "
                         "split) in K folds stratified by label and site (folds.json); fold "
                         "k trains on the others and chooses its checkpoint on fold k "
                         "(<run_dir>/fold_<k>/); best.keras is then the ensemble (the mean "
                         "of the folds' class probabilities) and decision.json is chosen on "
                         "the out-of-fold predictions of every training patient.")
    flags.DEFINE_integer("fold", d.fold, "With --folds: train fold k alone (one job per "
                         "machine, or every worker of a --strategy=multi_worker cluster), "
                         "then --ensemble_only; -1: every fold, then the ensemble.")
    flags.DEFINE_bool("ensemble_only", d.ensemble_only, "With --folds: assemble the "
                      "ensemble of the finished folds, training none.")
    flags.DEFINE_bool("reuse", d.reuse, "A finished run in --run_dir with the same "
                      "run-defining flags and data is kept and nothing trains (exit 0; how "
                      "a stage of another run is reused); with other flags or data it is an "
                      "error, or with --overwrite replaced. A one-shot action: flags.cfg "
                      "does not record it.")
    _DEFINED = True


# ------------------------------------------------------------------ run folder
#: Path flags: recorded absolute (run_info.json, flags.cfg), so a run's flags.cfg repeats it
#: from any working directory.


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    cfg = trainer.TrainConfig.from_flags(FLAGS)
    trainer.setup_runtime(cfg, FLAGS.verbosity >= 1)
    if cfg.folds or cfg.fold >= 0 or cfg.ensemble_only:
        from covid_keras.training import cross_validation

        cross_validation.cross_validate(cfg, trainer)
    else:
        trainer.train(cfg)
    return 0


def run_main(argv: list[str] | None = None):
    define_flags()
    t0 = time.time()
    try:
        cli.run(main, required=["data_dir", "run_dir"], program="covid_keras.train",
                argv=argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # an error stays its one line
            log.info("took %.0f s", time.time() - t0)
        raise


if __name__ == "__main__":
    run_main()
