"""A remote path (gs://, ram://...) is recorded as given; a local one made absolute: in the
trainer's flags.cfg, the pretraining's flags.cfg and the pretrain command's settings."""

from __future__ import annotations

import os

from covid_keras.core import files
from covid_keras.training import pretraining, trainer


def test_absolute_keeps_remote_paths_and_anchors_local_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.absolute("gs://bucket/records") == "gs://bucket/records"
    assert files.absolute("ram://x/y") == "ram://x/y"
    assert files.absolute("runs/a") == str(tmp_path / "runs" / "a")
    assert files.absolute("~/a") == os.path.join(os.path.expanduser("~"), "a")


def test_run_records_keep_remote_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert trainer.recorded_value("data_dir", "gs://b/d") == "gs://b/d"
    assert trainer.recorded_value("data_dir", "d") == str(tmp_path / "d")
    cfg = pretraining.PretrainConfig(data_dir="gs://b/d", run_dir="runs/p")
    text = cfg.flagfile()
    assert "--data_dir=gs://b/d\n" in text  # os.path.abspath would make it <cwd>/gs:/b/d
    assert f"--run_dir={tmp_path / 'runs' / 'p'}\n" in text


def test_the_pretrain_command_keeps_remote_paths(tmp_path, monkeypatch):
    """config_from_flags on the command's parsed flags (a stand-in for absl's FLAGS: this
    process may hold the trainer's flags of the same names)."""
    import dataclasses
    from types import SimpleNamespace

    from absl import flags

    from covid_keras import pretrain

    monkeypatch.chdir(tmp_path)
    values = {f.name: f.default for f in dataclasses.fields(pretraining.PretrainConfig)
              if f.default is not dataclasses.MISSING}
    values.update(data_dir="gs://b/d", run_dir="r", extra_data_dir="ram://e")
    monkeypatch.setattr(flags, "FLAGS", {k: SimpleNamespace(value=v) for k, v in values.items()})
    cfg = pretrain.config_from_flags()
    assert (cfg.data_dir, cfg.extra_data_dir) == ("gs://b/d", "ram://e")
    assert cfg.run_dir == str(tmp_path / "r")
