"""bench/bootstrap.py: both ways of the patient bootstrap on the same resamples."""

from __future__ import annotations

import json


def test_bench_bootstrap_result_line_and_equal_intervals(bench_script, tmp_path, capsys):
    res = bench_script("bootstrap").main(["--patients=12", "--slices=2", "--classes=3",
                                          "--resamples=30",
                                          f"--output_json={tmp_path / 'r.json'}"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")]
    assert len(line) == 1 and json.loads(line[0][len("RESULT "):]) == res
    assert res == json.loads((tmp_path / "r.json").read_text())
    assert res["same_keys"] and res["max_ci_gap"] < 1e-9
    assert res["one_at_a_time_s"] > 0 and res["all_at_once_s"] > 0 and res["ratio"] > 0
