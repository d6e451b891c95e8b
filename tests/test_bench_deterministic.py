"""bench/deterministic.py's own logic (no training): the interleaved order, the ratio and the
rerun difference of two logs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import deterministic  # noqa: E402


def test_largest_difference_of_two_logs():
    a = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}]
    assert deterministic.largest_difference(a, a) == 0.0
    assert deterministic.largest_difference(a, [{"epoch": 0, "loss": 1.0},
                                                {"epoch": 1, "loss": 0.75}]) == 0.25
    assert deterministic.largest_difference(a, a[:1]) == float("inf")  # another length
    assert deterministic.largest_difference(a, [{"epoch": 0}, {"epoch": 1}]) == float("inf")


def test_runs_interleave_and_the_ratio_is_of_the_medians(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    order, times = [], {"deterministic": [12.0, 10.0, 11.0], "nondeterministic": [10.0, 9.0, 8.0]}

    def fake_train(args, mode, index):
        order.append((mode, index))
        log = [{"epoch": 0, "loss": 1.0 + (index * 0.5 if mode == "nondeterministic" else 0)}]
        return {"mode": mode, "index": index, "seconds": times[mode][index], "log": log}

    monkeypatch.setattr(deterministic, "train", fake_train)
    assert deterministic.main([f"--data_dir={data}", "--repeats=3"]) == 0
    assert order == [("deterministic", 0), ("nondeterministic", 0), ("nondeterministic", 1),
                     ("deterministic", 1), ("deterministic", 2), ("nondeterministic", 2)]
    out = capsys.readouterr().out
    assert "ratio deterministic / nondeterministic: 1.222" in out  # 11 / 9
    assert '"rerun_max_difference": 1.0' in out  # nondeterministic: 1.0 vs 2.0
    with pytest.raises(SystemExit):
        deterministic.main([f"--data_dir={data}", "--repeats=1"])
