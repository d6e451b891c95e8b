"""bench/ensemble.py (issue 31's inference cost, K members against one): a quick run, in
process, Keras model and SavedModel both. Timings are the benchmark's, never asserted here;
what is checked is that it times what it says it times."""

import json

import numpy as np


def test_quick_run_times_an_ensemble_of_the_asked_size_and_its_export(bench_script, tmp_path,
                                                                      capsys):
    bench = bench_script("ensemble")
    single, ensemble = bench.build("drenet", "tiny", 64, 3)
    from covid_keras.model.ensemble import members

    # what is timed: K members, the first of them the single model
    assert len(members(ensemble)) == 3
    for a, b in zip(members(ensemble)[0].get_weights(), single.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(members(ensemble)[1].get_weights(),
                                                          single.get_weights()))
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--model=classifier", "--members=2", "--export", "--warmup=0",
                       f"--output_json={out}"]) == 0
    res = json.loads(out.read_text())
    assert (res["model"], res["backbone"], res["input_size"], res["members"],
            res["slices"]) == ("classifier", "tiny", 64, 2, 4)
    for key in ("keras", "savedmodel"):
        times = res[f"{key}_s_per_study"]
        assert times["single"] > 0 and times["ensemble"] > 0, res
        assert abs(res[f"{key}_ratio"] - times["ensemble"] / times["single"]) < 1e-9
    printed = capsys.readouterr().out
    assert "SavedModel predict_study" in printed and "RESULT " in printed
