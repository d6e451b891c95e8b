"""bench/serve.py --quick runs end to end (export, two servers, timed requests) and ends
with a RESULT line holding every figure the issue asks for. Times nothing itself."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # two exports and two server processes: ~40 s


@pytest.fixture(scope="module")
def serve(bench_script):
    return bench_script("serve")


def test_bench_serve_quick_result_line(serve, tmp_path, capsys):
    """The bench in-process (its export and its servers are processes of their own, as
    always)."""
    out_json = tmp_path / "result.json"
    work = tmp_path / "work"
    serve.main(["--quick", "--requests=2", "--probe=1", f"--work_dir={work}",
                f"--output_json={out_json}"])
    stdout = capsys.readouterr().out
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert res == json.loads(out_json.read_text())
    assert res["mode"] == "cpu_quick" and res["slices"] == 15
    assert res["signature"] == "predict_study" and res["clients"] == [1, 4]
    for key in ("target_ratio", "ideal_ratio", "pass", "ratio", "summary", "models",
                "body_mb", "loadavg_before", "loadavg_after"):
        assert key in res, key
    assert set(res["models"]) == {"drenet", "classifier"}
    for m in res["models"].values():
        assert m["input_size"] == 64 and m["rest_overhead_p50_s"] > 0
        for c in ("1", "4"):
            s = m["clients"][c]
            assert s["n"] >= 2 and len(s["latencies_s"]) == s["n"]
            assert 0 < s["p50_s"] <= s["p95_s"] and s["req_per_s"] > 0
    for c in ("1", "4"):
        assert {"p50", "p95", "req_per_s"} <= set(res["ratio"][c])
    assert "p50_model_only_est" in res["ratio"]["1"]  # the probe runs at 1 client
    s = res["summary"]
    assert set(s["drenet_p50_s"]) == set(s["resnet_p95_s"]) == {"1", "4"}
    assert s["req_per_s_clients"] == 4 and s["drenet_req_per_s"] > 0
    assert s["ratio_p50"] == res["ratio"]["1"]["p50"]
    # under attack: slow clients, RSS after bombs, JSON decoding (figures, not targets)
    slow, rss = res["attack"]["slow_clients"], res["attack"]["rss"]
    assert slow["connections"] == 10 and slow["p95_without_s"] > 0 and slow["p95_with_s"] > 0
    assert slow["target"] == 1.5 and isinstance(slow["pass"], bool)
    assert rss["after_normal_mb"] > 0 and rss["after_bombs_mb"] > 0 and rss["target"] == 0.1
    for what, st in rss["statuses"].items():  # every bomb refused (or the socket closed)
        assert set(st["got"]) <= {st["expected"], -1}, (what, st)
    assert res["attack"]["rss"]["statuses"]["png_bomb_20000px"]["got"] == [400]
    d = res["json_decode"]
    assert d["json_loads_s"] > 0 and d["to_arrays_s"] > 0 and d["parser"] in ("json", "orjson")
    # the servers were stopped and nothing but the kept work folder remains
    assert (work / "exports" / "drenet" / "1" / "saved_model.pb").is_file()
    assert "Traceback" not in (work / "serve_drenet.log").read_text()
