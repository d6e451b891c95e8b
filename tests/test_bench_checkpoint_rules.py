"""bench/checkpoint_rules.py: each rule picks from val alone, the swing figures, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rules(bench_script):
    return bench_script("checkpoint_rules")


def _history(val, loss, test, pop=None):
    rows = []
    for i, (v, lo, t) in enumerate(zip(val, loss, test)):
        row = {"epoch": i + 1, "val_patient_auc": v, "val_prediction_loss": lo,
               "test_patient_auc": t}
        if pop:
            row.update({"val_patient_auc_pop": pop[0][i], "val_prediction_loss_pop": pop[1][i],
                        "test_patient_auc_pop": pop[2][i]})
        rows.append(row)
    return rows


def test_rules_choose_from_val_only(rules):
    # a lucky first epoch: alone in its window it beats every 3-epoch mean
    h = _history(val=[0.9, 0.5, 0.6, 0.7, 0.8, 0.8], loss=[0.9, 0.8, 0.7, 0.4, 0.6, 0.5],
                 test=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert rules.choose(h, "smoothed3") == 1
    assert rules.choose(h, "smoothed3_full") == 6  # (0.7 + 0.8 + 0.8) / 3 is the best full
    assert rules.choose(h, "val_loss") == 4
    assert rules.choose(h, "last") == 6
    # ties in the smoothed AUC go to the lower val loss
    tie = _history(val=[0.5, 0.5, 0.5, 0.5], loss=[0.9, 0.9, 0.3, 0.6], test=[0.0] * 4)
    assert rules.choose(tie, "smoothed3_full") == 3
    # the held-out column never moves a choice
    other = _history(val=[0.9, 0.5, 0.6, 0.7, 0.8, 0.8], loss=[0.9, 0.8, 0.7, 0.4, 0.6, 0.5],
                     test=[0.9, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert [rules.choose(other, r) for r in rules.RULES] == \
        [rules.choose(h, r) for r in rules.RULES]
    assert rules.swing([0.5, 0.7, 0.4]) == pytest.approx(0.25)
    assert rules.swing([0.5]) is None


@pytest.mark.parametrize("variant", ["raw", "noavg"])
def test_branch_and_unaveraged_weights_are_chosen_on_their_own_val(rules, variant):
    """DRENet's global branch (*_raw) and, with --ema_momentum, the weights without the
    average (*_noavg): each chosen on its own val figures, not the prediction's."""
    h = _history(val=[0.6, 0.7, 0.8], loss=[0.5, 0.5, 0.5], test=[0.5, 0.6, 0.7])
    for row, v, t in zip(h, [0.9, 0.6, 0.5], [0.3, 0.9, 0.9]):
        row.update({f"val_patient_auc_{variant}": v, f"val_prediction_loss_{variant}": 0.5,
                    f"test_patient_auc_{variant}": t})
    a = rules.analyse_run({"seed": 0, "history": h})
    assert a["moving"]["rules"]["smoothed3"] == {"epoch": 3, "held_out_patient_auc": 0.7}
    # its own val picks epoch 1 (0.9 alone beats 0.75 and 0.667), held out 0.3
    assert a[variant]["rules"]["smoothed3"] == {"epoch": 1, "held_out_patient_auc": 0.3}
    assert a[variant]["held_out_swing"] == pytest.approx(0.3)
    assert variant not in rules.analyse_run({"seed": 0,
                                             "history": _history([0.5], [0.5], [0.5])})
    assert list(rules.summarise([a])) == ["moving", variant]


def test_cli_reads_runs_and_partial_runs(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    pop = ([0.6, 0.6, 0.6, 0.6, 0.6], [0.5, 0.4, 0.3, 0.2, 0.1], [0.7, 0.7, 0.7, 0.7, 0.8])
    done = {"seed": 0, "history": _history([0.6, 0.8, 0.6, 0.8, 0.6], [1, 1, 1, 1, 1],
                                            [0.9, 0.1, 0.9, 0.1, 0.9], pop)}
    (work / "m-seed0.json").write_text(json.dumps(done))
    (work / "m-seed0.partial.json").write_text(json.dumps({"seed": 0, "history": []}))
    partial = {"seed": 1, "history": _history([0.7, 0.7], [1, 1], [0.5, 0.5])}
    (work / "m-seed1.partial.json").write_text(json.dumps(partial))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "bench/checkpoint_rules.py", f"--runs={work}",
                           f"--output_json={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT {" in proc.stdout and "| population |" in proc.stdout
    g = json.loads(out.read_text())["groups"][str(work)]
    assert g["runs"] == 2
    # the unfinished run is counted and named; seed 0's finished JSON wins over its partial
    assert g["unfinished"] == [{"seed": 1, "epochs": 2}]
    assert "unfinished: seed 1 at epoch 2" in proc.stdout
    moving, population = g["summary"]["moving"], g["summary"]["population"]
    assert moving["held_out_swing"]["mean"] == pytest.approx((0.8 + 0.0) / 2)
    assert population["held_out_swing"]["n"] == 1  # the partial run has no *_pop
    assert population["held_out_swing"]["mean"] == pytest.approx(0.025)
    assert population["rules"]["val_loss"]["epochs"] == [5]
    assert population["rules"]["val_loss"]["held_out_patient_auc"]["mean"] == 0.8
    # --finished_only: the stopped run's single partial history is left out
    proc = subprocess.run([sys.executable, "bench/checkpoint_rules.py", f"--runs={work}",
                           f"--output_json={out}", "--finished_only"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    g = json.loads(out.read_text())["groups"][str(work)]
    assert g["runs"] == 1 and g["unfinished"] == [] and "unfinished:" not in proc.stdout
    assert g["summary"]["moving"]["held_out_swing"]["mean"] == pytest.approx(0.8)
    # a --bn_stats=population run: its plain figures are population ones
    (work / "m-seed0.json").write_text(json.dumps(dict(done, bn_stats="population")))
    (work / "m-seed1.partial.json").unlink()
    proc = subprocess.run([sys.executable, "bench/checkpoint_rules.py", f"--runs={work}",
                           f"--output_json={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    g = json.loads(out.read_text())["groups"][str(work)]
    assert list(g["summary"]) == ["population"]
    assert g["summary"]["population"]["held_out_swing"]["mean"] == pytest.approx(0.8)
    bad = subprocess.run([sys.executable, "bench/checkpoint_rules.py",
                          f"--runs={tmp_path / 'nope'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "no such folder" in bad.stderr
