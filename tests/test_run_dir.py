"""covid_keras.io.run_dir: the run folder's names, flags, checkpoint, state and model spec."""

import json

import pytest

from covid_keras.evaluation import evaluation
from covid_keras.io.run_dir import RunDir, read_flagfile
from covid_keras.model import saving


def test_state_and_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run.checkpoint()
    (tmp_path / "run").mkdir()
    assert run.state() == "new"
    with pytest.raises(FileNotFoundError, match="has no best.keras or final.keras"):
        run.checkpoint()
    (tmp_path / "run" / "backup").mkdir()
    (tmp_path / "run" / "final.keras").write_text("x")
    assert run.state() == "resumed"  # a backup: interrupted, not finished
    assert run.checkpoint() == str(tmp_path / "run" / "final.keras")
    (tmp_path / "run" / "best.keras").write_text("x")
    assert run.checkpoint() == str(tmp_path / "run" / "best.keras")
    assert run.checkpoint("final.keras") == str(tmp_path / "run" / "final.keras")
    with pytest.raises(FileNotFoundError, match="--checkpoint nope.keras is neither"):
        run.checkpoint("nope.keras")
    (tmp_path / "run" / "backup").rmdir()
    assert run.state() == "finished"
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "tensorboard").mkdir()
    run.clear()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]
    assert run.state() == "new"


def test_flags_from_run_info_else_flags_cfg_through_absl(tmp_path):
    run = RunDir(tmp_path)
    assert run.flags() == {}
    (tmp_path / "flags.cfg").write_text("# a comment\n--data_dir=/d\n--input_size=64\n"
                                        "--deterministic\n--nomixed_precision\n"
                                        "--stages=adam:0.001:2,sgd:0.01:1\n")
    expected = {"data_dir": "/d", "input_size": "64", "deterministic": True,
                "mixed_precision": False, "stages": "adam:0.001:2,sgd:0.01:1"}
    assert run.flags() == expected == read_flagfile(str(tmp_path / "flags.cfg"))
    assert evaluation.read_run(str(tmp_path)) == expected  # the old name, same answer
    (tmp_path / "run_info.json").write_text(json.dumps({"flags": {"input_size": 64}}))
    assert run.flags() == {"input_size": 64}


def test_names_and_evaluation_metrics(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.decision_path == str(tmp_path / "decision.json")
    assert run.eval_dir("test") == str(tmp_path / "eval_test")
    assert "best.keras.json" in RunDir.RUN_FILES and "log.csv" in RunDir.RUN_FILES
    assert run.evaluation_metrics() is None
    for name in ("eval_test", "eval_val"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text("{}")
    assert run.evaluation_metrics() == str(tmp_path / "eval_val" / "metrics.json")


def test_model_spec_reads_what_saving_stored(tmp_path):
    from covid_keras import build_classifier

    model = build_classifier("tiny", 3, 32, input_norm="per_image")
    (tmp_path / "run").mkdir()
    saving.save_model(model, str(tmp_path / "run" / "best.keras"), ["a", "b", "covid"])
    info = saving.read_info(str(tmp_path / "run" / "best.keras"))
    assert info["backbone"] == "tiny" and info["input_norm"] == "per_image"
    run = RunDir(tmp_path / "run")
    expected = {"backbone": "tiny", "input_size": 32, "num_classes": 3,
                "model": "classifier", "input_norm": "per_image",
                "include_preprocessing": True}  # built with BackboneNormalization
    assert run.model_spec() == expected
    assert saving.model_spec(model) == expected
    loaded = run.load_model()
    assert loaded.covid_keras_info["class_names"] == ["a", "b", "covid"]
    # metrics.json's model: the one spec's, as evaluate writes it
    assert evaluation.model_summary(saving.model_spec(loaded)) == {
        "backbone": "tiny", "input_size": 32, "num_classes": 3, "kind": "classifier",
        "include_preprocessing": True}
    with pytest.raises(FileNotFoundError, match="No model file"):
        saving.load_model(str(tmp_path / "run" / "missing.keras"))

