"""``covid_keras.train --folds=K``: K fold runs and their ensemble in one run folder.

    python -m covid_keras.train --flagfile=configs/covid_ct_drenet.cfg --folds=5 \\
        --data_dir=tfrecords/covid_ct_holdout --run_dir=runs/drenet_cv

The training patients (train plus the validation split of --data_dir; never a held-out
split) are dealt into K folds by patient, stratified by label and site and seeded by
--seed (:mod:`covid_keras.training.folds`); ``folds.json`` lists them as patient keys. Fold k
trains on the other folds and chooses its checkpoint on fold k: an ordinary run folder,
``fold_<k>/``, whose data folder (``folds_data/fold_<k>/``) every tool reads like
data_prep's. Then the ensemble, in the run folder itself:

==================  ===========================================================
``folds.json``      the folds (patient keys), the seed, the source data folder
``fold_<k>/``       fold k's run (best.keras chosen on fold k)
``folds_data/``     each fold's data folder (train / val / the held-out splits)
``best.keras``      one model: the mean of the members' class probabilities
``decision.json``   the patient rule and threshold, chosen on the out-of-fold
                    predictions of every training patient (split ``out_of_fold``)
``metrics.json``    out-of-fold metrics with CIs, the folds' spread, held-out
                    metrics for --report_splits
``out_of_fold_slices.csv``  each training slice's out-of-fold probabilities
==================  ===========================================================

An out-of-fold prediction of a patient is the one by the fold model that did not train on
it, so the decision is chosen on about K times the patients a validation split offers,
none of them seen by the model that predicted it. ``--fold=k`` trains fold k alone (a job
per machine); ``--ensemble_only`` assembles the finished folds. A killed run resumes at
the fold, and within it the epoch, where it stopped. A pretraining stage
(``--pretrain_flagfile``) runs once, for every fold. A classifier stage
(``--classifier_flagfile``) is trained per fold, on that fold's training patients, in
``fold_<k>/classifier``; with ``--classifier_dir`` naming a ``--folds`` run of the
classifier flagfile with the same folds (DRENet's recipe after the ResNet-50 ensemble of
the same seed), fold k starts from that run's ``fold_<k>``, which must be finished and
is reused.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from covid_keras.core import files, schema
from covid_keras.io.run_dir import BEST, FOLDS, RunDir

log = logging.getLogger("covid_keras.train")

#: decision.json's ``split`` for the out-of-fold predictions.
OOF_SPLIT = "out_of_fold"
#: run_info.json's record of the stage flagfiles' flags (:func:`stage_flags`).
STAGE_FLAGS = "stage_flags"
#: Held while a stage every fold shares (--pretrain_flagfile, --classifier_data_dir) runs.
STAGE_LOCK = ".stage.lock"


def check_fold_flags(cfg) -> None:
    if cfg.folds == 1 or cfg.folds < 0:
        raise ValueError(f"--folds must be 0 (off) or at least 2. Received: {cfg.folds}")
    if not cfg.folds and (cfg.fold >= 0 or cfg.ensemble_only):
        raise ValueError("--fold and --ensemble_only need --folds")
    if cfg.folds and not -1 <= cfg.fold < cfg.folds:
        raise ValueError(f"--fold must be in [0, {cfg.folds}) (or -1: every fold). "
                         f"Received: {cfg.fold}")
    if cfg.folds and cfg.strategy == "multi_worker" and cfg.fold < 0:
        raise ValueError("--folds under --strategy=multi_worker trains one fold at a time: "
                         "pass --fold=k (the cluster's workers train fold k together), then "
                         "--ensemble_only on one machine")
    if cfg.folds and cfg.strategy == "multi_worker" and (cfg.pretrain_flagfile or
                                                         cfg.classifier_flagfile):
        raise ValueError("--folds under --strategy=multi_worker takes no stage "
                         "(--pretrain_flagfile, --classifier_flagfile): every worker would run "
                         "it; run the stage first and pass --init_from=<its weights>")
    if cfg.fold >= 0 and cfg.ensemble_only:
        raise ValueError("--fold trains one fold; --ensemble_only trains none: pass one")
    if shared_fold_stages(cfg) and not cfg.ensemble_only:
        if stage_pretrains(cfg.classifier_flagfile):
            raise ValueError("--folds with --classifier_dir: the classifier flagfile has a "
                             "pretraining stage (--pretrain_flagfile), which its --folds run "
                             "turned into each fold's starting weights, so its folds cannot "
                             "be checked as this run's stages: leave --classifier_dir out "
                             "(each fold then trains its own stage)")
    if cfg.folds and cfg.init_from and cfg.init_from.endswith(".keras"):
        raise ValueError("--folds does not take --init_from=<.keras model>: every fold would "
                         "start from the same trained model (a pretraining run or weights "
                         "file is fine)")


def stage_flags(cfg) -> dict[str, list[str]]:
    """The flags that the stage flagfiles (--classifier_flagfile, --pretrain_flagfile) give,
    expanded: run_info.json records them, as its flags record only the flagfiles' paths."""
    from covid_keras.core import cli

    return {name: cli.expand_flagfiles(["train", f"--flagfile={path}"])[1:]
            for name in ("classifier_flagfile", "pretrain_flagfile")
            if (path := getattr(cfg, name)) and os.path.isfile(path)}


def changed_run_flags(info: dict, cfg, train_mod) -> list[str]:
    """What differs between a --folds run's record (``info``: its run_info.json) and these
    flags: its run-defining flags and its stage flagfiles' flags."""
    return train_mod.changed_flags(info.get("flags", {}), train_mod.resolved_flags(cfg)) + \
        changed_stage_flags(info, cfg)


def changed_stage_flags(info: dict, cfg) -> list[str]:
    """``--classifier_flagfile=F: its flags changed (...)`` when a stage flagfile no longer
    gives the flags that the run recorded (``info``: run_info.json): the folds trained so
    far started from stages of the old flags, the next ones would not."""
    if STAGE_FLAGS not in info:  # a run from before they were recorded
        return []
    old, new = info[STAGE_FLAGS], stage_flags(cfg)
    out = []
    for name in sorted(set(old) | set(new)):
        before, now = old.get(name, []), new.get(name, [])
        if before != now:
            change = [f"-{a}" for a in before if a not in now] + \
                [f"+{a}" for a in now if a not in before]
            out.append(f"--{name}={getattr(cfg, name)}: its flags changed since the first "
                       f"fold ({', '.join(change) or 'their order'})")
    return out


def shared_fold_stages(cfg) -> bool:
    """--folds with --classifier_flagfile and --classifier_dir (on the same data): fold k's
    stage is fold k of that --folds run (``<classifier_dir>/fold_<k>``), which must be
    finished; it is reused through the stage's own --reuse check of its flags and data."""
    return bool(cfg.folds and cfg.classifier_flagfile and cfg.classifier_dir
                and not cfg.classifier_data_dir)


def stage_pretrains(flagfile: str) -> bool:
    """Whether a stage's flagfile (with the flagfiles it includes) names a pretraining
    stage."""
    from covid_keras.core import cli

    if not os.path.isfile(flagfile):  # named by check_recipe
        return False
    return any(a.startswith("--pretrain_flagfile=") and a.split("=", 1)[1]
               for a in cli.expand_flagfiles(["train", f"--flagfile={flagfile}"]))


def check_fold_stages(cfg, todo: list[int]) -> None:
    """Before anything is written: the --classifier_dir of :func:`shared_fold_stages` holds
    folds made as this run's will be (data folder, its manifest, seed, K and splits, which
    decide the patients of each fold: fold k's stage must not have trained on fold k's
    patients), and its fold k is finished for every fold k in ``todo`` (the folds this
    command trains: a stage is never trained inside another run's folder)."""
    from covid_keras.training import folds as folds_mod

    def made_from(doc):  # data_dir too: fold k's data names it (folds.same_fold_data)
        return {k: v for k, v in (doc or {}).items() if k != "patients"}

    stages = RunDir(cfg.classifier_dir)
    if not stages.has(FOLDS):
        raise ValueError("--folds with --classifier_dir: fold k's classifier stage is "
                         "<classifier_dir>/fold_<k>, a --folds run of the classifier "
                         "flagfile with these folds (e.g. the ResNet-50 --folds run of the "
                         f"same seed and data); {cfg.classifier_dir} holds no {FOLDS}. "
                         "Leave --classifier_dir out and each fold trains its own stage")
    theirs, ours = made_from(stages.folds()), made_from(folds_mod.folds_document(
        {}, cfg.folds, cfg.seed, cfg.data_dir, ["train", cfg.val_split]))
    differ = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
              for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        raise ValueError(f"--classifier_dir={cfg.classifier_dir} holds other folds than "
                         f"this run's ({'; '.join(differ)}): its fold_<k> may have trained "
                         "on fold k's patients. Give it the same folds, or leave "
                         "--classifier_dir out (each fold then trains its own stage)")
    missing = [k for k in todo if not RunDir(stages.fold_dir(k)).is_finished()]
    if missing:
        raise ValueError(f"--classifier_dir={cfg.classifier_dir}: its folds {missing} are "
                         "not finished (fold k of this run starts from its fold k): finish "
                         "them first (python -m covid_keras.train with its flags.cfg and "
                         "--fold=k)")


def check_shared_stage_data(cfg) -> None:
    """--folds with --classifier_data_dir: one classifier stage serves every fold, so it must
    not train on the folds' own patients (the same data folder: each fold's validation
    patients would have trained its starting weights)."""
    if not (cfg.folds and cfg.classifier_flagfile and cfg.classifier_data_dir):
        return
    same = os.path.realpath(cfg.classifier_data_dir) == os.path.realpath(cfg.data_dir) or \
        files.sha256(os.path.join(cfg.classifier_data_dir, schema.MANIFEST)) == \
        files.sha256(os.path.join(cfg.data_dir, schema.MANIFEST))
    if same:
        raise ValueError("--folds with --classifier_data_dir=--data_dir: the one shared "
                         "classifier stage would train on every fold's validation patients; "
                         "leave --classifier_data_dir out (each fold then trains its own)")
    # another preparation of the same source (other fractions, a rebuild) holds the same
    # pseudonymous patient keys: then it is the same patients
    from covid_keras.io import data
    from covid_keras.training import folds as folds_mod

    def patients(data_dir):
        return set(folds_mod.patient_table(data_dir, sorted(
            data.read_manifest(data_dir).get("counts", {}))))

    shared = patients(cfg.classifier_data_dir) & patients(cfg.data_dir)
    if shared:
        raise ValueError(f"--folds with --classifier_data_dir={cfg.classifier_data_dir}: it "
                         f"holds {len(shared)} patients of --data_dir={cfg.data_dir}, on "
                         "whom the one shared classifier stage would train (each fold's "
                         "validation or a held-out split's patients): give it other patients, "
                         "or leave --classifier_data_dir out (each fold then trains its own)")


def prepare(cfg, train_mod) -> tuple[RunDir, dict]:
    """The run folder (new, resumed, or overwritten) and its folds.json, made once."""
    from covid_keras.io import data
    from covid_keras.training import folds as folds_mod

    run = RunDir(cfg.run_dir)
    partial = cfg.fold >= 0 or cfg.ensemble_only
    if cfg.overwrite and not partial and run.is_started():
        run.clear()
        log.info("--overwrite: %s starts again from scratch (folds included)", run.path)
    elif run.is_finished() and not cfg.overwrite:
        raise ValueError(f"{run.path} holds a finished cross-validation run: evaluate it with "
                         f"python -m covid_keras.evaluate --run_dir={run.path}, or pass "
                         "--overwrite to replace it")
    manifest = data.read_manifest(cfg.data_dir)
    train_mod.check_splits(cfg, manifest)
    info = run.run_info()
    if info is not None:
        diff = changed_run_flags(info, cfg, train_mod)
        if diff:
            raise ValueError(f"{run.path} holds a cross-validation run with other flags ("
                             f"{'; '.join(diff)}): rerun with its flags (--flagfile="
                             f"{run.flags_path}) to resume, or pass --overwrite")
    files.makedirs(run.path)
    splits = ["train", cfg.val_split]
    sha = files.sha256(data.manifest_path(cfg.data_dir))
    doc = run.folds()
    if doc is not None and (doc["folds"] != cfg.folds or doc["seed"] != cfg.seed
                            or doc["dataset_manifest_sha256"] != sha):
        raise ValueError(f"{run.folds_path} holds folds of another data folder, --folds or "
                         "--seed: pass --overwrite to start again")
    if doc is None:
        table, order = folds_mod.patients_and_order(cfg.data_dir, splits)
        assignment = folds_mod.assign_folds(table, cfg.folds, cfg.seed, order)
        doc = folds_mod.folds_document(assignment, cfg.folds, cfg.seed, cfg.data_dir, splits)
        files.write_json(run.folds_path, doc)
        sizes = [len(doc["patients"][str(k)]) for k in range(cfg.folds)]
        log.info("%d folds of %s patients (train + %s of %s): %s", cfg.folds,
                 sum(sizes), cfg.val_split, cfg.data_dir, sizes)
    return run, doc


def drop_ensemble(run: RunDir) -> None:
    """Removes the ensemble's files (best.keras, decision.json, metrics.json, the
    out-of-fold table): --ensemble_only, or the end of a --folds run, makes them again."""
    for path in (run.best_path, run.decision_path, run.metrics_path, run.out_of_fold_path):
        files.remove(path)


def fold_config(cfg, train_mod, run: RunDir):
    """The settings every fold run shares: the ensemble's, less the cross-validation
    flags, with the pretraining stage's weights (run once, here) as the start, or the
    classifier stage's when it trains on other data (--classifier_data_dir; on the same
    data every fold trains its own, on its own training patients)."""
    base = cfg.replace(folds=0, fold=-1, ensemble_only=False, overwrite=False,
                       val_split="val", report_splits=())
    shared = cfg.classifier_flagfile and cfg.classifier_data_dir  # other data: once for all
    if not (cfg.pretrain_flagfile or shared):
        return base
    # --fold=k jobs started together share these stages: one trains them, the others wait
    # and then reuse what it finished
    with files.exclusive(os.path.join(run.path, STAGE_LOCK), "the stage every fold shares",
                         say=log.info):
        if cfg.pretrain_flagfile:
            weights = train_mod.backbone_weights(cfg, run.path)
            base = base.replace(pretrain_flagfile=None, pretrain_dir=None, init_from=weights)
        if shared:
            weights = train_mod.classifier_stage(cfg, run.path)
            base = base.replace(classifier_flagfile=None, classifier_dir=None,
                                classifier_data_dir=None, init_from=weights)
    return base


def cross_validate(cfg, train_mod, command: list[str] | None = None) -> dict:
    """What ``covid_keras.train --folds=K`` does (see the module docstring). Returns
    metrics.json's content ({} when only one fold was trained)."""
    from covid_keras.training import folds as folds_mod

    check_fold_flags(cfg)
    reused = reused_folds_run(cfg, train_mod)
    if reused is not None:
        return reused
    train_mod.check_recipe(cfg)  # before a stage runs for every fold
    check_shared_stage_data(cfg)
    chief = True
    if cfg.strategy == "multi_worker":  # before any TensorFlow op (collectives)
        from covid_keras.training.distributed import make_strategy

        chief = train_mod.is_chief(make_strategy(cfg.strategy))
    todo = [] if cfg.ensemble_only else ([cfg.fold] if cfg.fold >= 0 else range(cfg.folds))
    redo = cfg.overwrite and cfg.fold >= 0  # --fold=k --overwrite: train fold k again
    if shared_fold_stages(cfg) and not cfg.ensemble_only:  # before prepare() writes
        planned = RunDir(cfg.run_dir)                        # or clears anything
        pending = [k for k in todo if cfg.overwrite or  # --overwrite: all
                   not RunDir(planned.fold_dir(k)).is_finished()]
        if pending:  # every fold finished: the stages' run is needed no more
            check_fold_stages(cfg, pending)
    run, doc = prepare(cfg, train_mod)
    if cfg.fold < 0 or not run.is_run():
        train_mod.write_run_info(cfg, run.path, {"folds": cfg.folds,
                                                 STAGE_FLAGS: stage_flags(cfg)}, command)
    base = fold_config(cfg, train_mod, run) if not cfg.ensemble_only else None
    for k in todo:
        fold_run = RunDir(run.fold_dir(k))
        if fold_run.is_finished() and not redo:
            log.info("fold %d/%d finished in an earlier run: reused", k + 1, cfg.folds)
            continue
        if redo and chief:  # the other workers would clear what the chief wrote
            fold_run.clear()
        drop_ensemble(run)  # a fold that changes makes the ensemble stale
        data_k = folds_mod.write_fold_data(cfg.data_dir, doc, k, run.fold_data_dir(k),
                                           cfg.val_split)
        print(f"fold {k + 1}/{cfg.folds}: training on the other folds, choosing on fold "
              f"{k + 1} ({len(doc['patients'][str(k)])} patients): {fold_run.path}",
              flush=True)
        import keras

        keras.utils.set_random_seed(base.seed)  # as if the fold ran alone (e.g. resumed)
        fold_cfg = base.replace(data_dir=data_k, run_dir=fold_run.path)
        if shared_fold_stages(cfg):  # fold k of the classifier's --folds run
            fold_cfg = fold_cfg.replace(classifier_dir=RunDir(cfg.classifier_dir).fold_dir(k))
        train_mod.train(fold_cfg, command=list(command or []) + [f"(fold {k})"])
    if cfg.fold >= 0:
        return {}
    return assemble(cfg, train_mod, run, doc)


def reused_folds_run(cfg, train_mod) -> dict | None:
    """--reuse (every fold and the ensemble): the metrics of the finished --folds run in
    --run_dir when it was made with the same run-defining flags from the same data; None
    when there is none (or, with --overwrite, when it differs: it is then replaced); an
    error naming what differs otherwise."""
    from covid_keras.io import data

    run = RunDir(cfg.run_dir)
    if not (cfg.reuse and cfg.fold < 0 and not cfg.ensemble_only and run.is_finished()
            and files.exists(run.metrics_path)):
        return None
    diff = changed_run_flags(run.run_info() or {}, cfg, train_mod)
    if (run.folds() or {}).get("dataset_manifest_sha256") != files.sha256(
            data.manifest_path(cfg.data_dir)):
        diff.append(f"--data_dir: other data than the run's ({cfg.data_dir})")
    if not train_mod.reuse_verdict(cfg, diff, "--folds run"):
        return None
    return json.loads(files.read_text(run.metrics_path))


def member_path(fold_run: RunDir) -> str:
    """A finished fold's model: its chosen checkpoint, else its last epoch's."""
    return fold_run.best_path if fold_run.has(BEST) else fold_run.final_path


def check_members(run: RunDir, folds: int) -> None:
    """Refuses, in one line, an ensemble of mixed members: a fold run trained on other data
    than its fold folder holds now (a fold left from another set of folds, or copied in),
    or a member that is another kind of model than fold 0's (backbone, input size,
    classes, normalisation: e.g. a fold retrained with other flags or code). Reads run
    files and model configs only (no weights)."""
    from covid_keras.io import data
    from covid_keras.model import saving

    first = None
    for k in range(folds):
        fold_run = RunDir(run.fold_dir(k))
        trained_on = (fold_run.run_info() or {}).get("dataset_manifest_sha256")
        if trained_on != files.sha256(data.manifest_path(run.fold_data_dir(k))):
            raise ValueError(f"fold {k} of {run.path} was trained on other data than "
                             f"{run.fold_data_dir(k)} holds (a fold of another set of folds?): "
                             f"train it again with --fold={k} --overwrite")
        spec = saving.model_spec(member_path(fold_run))
        if first is None:
            first = spec
        elif spec != first:
            differ = sorted(key for key in set(first) | set(spec)
                            if first.get(key) != spec.get(key))
            raise ValueError(f"fold {k} of {run.path} is another model than fold 0 ("
                             + "; ".join(f"{key}: {spec.get(key)!r}, fold 0 "
                                         f"{first.get(key)!r}" for key in differ)
                             + f"): train it again with --fold={k} --overwrite")


def assemble(cfg, train_mod, run: RunDir, doc: dict) -> dict:
    """The ensemble of the finished folds: best.keras, the out-of-fold decision and
    metrics.json."""
    from covid_keras.evaluation import decision, metrics
    from covid_keras.evaluation.evaluation import Predictions, SplitPredictor
    from covid_keras.io import data
    from covid_keras.model import saving
    from covid_keras.model.ensemble import build_ensemble
    from covid_keras.training import callbacks as cbs

    missing = [k for k in range(cfg.folds) if not RunDir(run.fold_dir(k)).is_finished()]
    if missing:
        raise ValueError(f"folds {missing} of {run.path} are not finished: train them "
                         f"(--fold=k), then run --ensemble_only again")
    manifest = data.read_manifest(cfg.data_dir)
    classes = manifest["classes"]
    check_members(run, cfg.folds)
    members, parts, fold_metrics = [], [], []
    for k in range(cfg.folds):
        fold_run = RunDir(run.fold_dir(k))
        path = member_path(fold_run)
        member = saving.load_model(path, compile=False)
        spec = saving.model_spec(member)
        pipeline = data.PipelineConfig.for_model(spec)
        members.append(member)
        # fold k's own patients, predicted by the one member that did not train on them
        parts.append(SplitPredictor(run.fold_data_dir(k), "val", cfg.batch_size,
                                    pipeline).predictions(member, classes))
        m = json.loads(files.read_text(fold_run.metrics_path))
        fold_metrics.append({"fold": k, "checkpoint": os.path.basename(path),
                             "best_epoch": m.get("best_epoch"),
                             "val": {key: (m.get("best") or m["final"]).get(key) for key in
                                     ("patient_auc", "slice_auc", "patient_accuracy",
                                      "patients", "slices")}})
    oof = Predictions(
        classes, np.concatenate([p.labels for p in parts]),
        np.concatenate([p.probs for p in parts]),
        [k for p in parts for k in p.patient_keys], [k for p in parts for k in p.study_keys],
        np.concatenate([p.slice_index for p in parts]), [s for p in parts for s in p.sites],
        {}, OOF_SPLIT, cfg.data_dir)
    seen = [k for p in parts for k in set(p.patient_keys)]
    if len(seen) != len(set(seen)):
        raise RuntimeError("a patient is in two folds' validation splits")
    _write_slices(run.out_of_fold_path, oof)
    ensemble = build_ensemble(members)
    saving.save_model(ensemble, run.best_path, classes)
    results = {"folds": cfg.folds, "val_split": OOF_SPLIT,
               "deterministic": bool(cfg.deterministic),
               "best": metrics.classification_metrics(oof.probs, oof.labels,
                                                      oof.patient_keys, classes),
               "fold_runs": fold_metrics}
    aucs = [f["val"]["patient_auc"] for f in fold_metrics
            if f["val"]["patient_auc"] is not None]
    results["fold_val_patient_auc"] = {"mean": float(np.mean(aucs)) if aucs else None,
                                       "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1
                                       else None, "values": aucs}
    try:
        chosen = decision.write_decision(run.path, oof, split=OOF_SPLIT, checkpoint=BEST,
                                         criterion=cfg.decision_criterion,
                                         target_sensitivity=cfg.target_sensitivity)
    except ValueError as exc:
        log.warning("no decision.json (predictions use the argmax): %s", exc)
        chosen = None
    if chosen is not None:
        results["decision"] = {k: chosen[k] for k in (
            "rule", "threshold", "criterion", "positive_class", "split")}
        results[f"decision_on_{OOF_SPLIT}"] = metrics.public_result(
            metrics.evaluate_predictions(oof, chosen))
    for split in cfg.report_splits:
        held_out = cbs.PatientValidation(
            cbs.Evaluator(cfg.data_dir, split, cfg.batch_size, pipeline, 0), classes, None)
        results[f"best_on_{split}"], out = held_out.evaluate(ensemble)
        print("ensemble on held-out " + train_mod.summary_line(results[f"best_on_{split}"],
                                                               split))
        if chosen is not None:
            preds = held_out.evaluator.predictions(ensemble, classes,
                                                   outputs=train_mod._plain(out))
            m = metrics.evaluate_predictions(preds, chosen, n_bootstrap=0)
            results[f"decision_on_{split}"] = metrics.public_result(m)
            print("  at the decision: " + train_mod.decision_line(m))
    files.write_json(run.metrics_path, results)
    print(train_mod.summary_line(results["best"], OOF_SPLIT))
    print(f"ensemble of {cfg.folds} folds: {run.best_path}; fold val patient AUC "
          f"{_fmt(results['fold_val_patient_auc'])}; decision chosen on "
          f"{len(set(oof.patient_keys))} out-of-fold patients: {run.decision_path}")
    return results


def _write_slices(path: str, preds) -> None:
    import tempfile

    from covid_keras.evaluation import report

    fd, tmp = tempfile.mkstemp(suffix=".csv", dir=None if files.is_remote(path)
                               else os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        report.write_slices_csv(tmp, preds)
        files.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fmt(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f}" + (f" +- {s['sd']:.3f}" if s["sd"] is not None else "")

