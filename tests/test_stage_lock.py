"""Stages every fold shares (--pretrain_flagfile, --classifier_data_dir) run under an
exclusive lock in the run folder (core.files.exclusive), so --fold=k jobs started together
train the stage once: one trains it, the others wait, then reuse it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from covid_keras.core import files
from covid_keras.io.run_dir import RunDir
from covid_keras.training import cross_validation
from covid_keras.training.trainer import TrainConfig


def test_jobs_take_the_lock_one_at_a_time(tmp_path):
    lock, events = str(tmp_path / "run" / ".lock"), []

    def job(name):
        with files.exclusive(lock, "the stage", poll_s=0.02, say=lambda m: None):
            events.append(("in", name))
            time.sleep(0.2)
            events.append(("out", name))

    threads = [threading.Thread(target=job, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e[0] for e in events] == ["in", "out", "in", "out"]  # never both inside
    assert not os.path.exists(lock)


def test_a_waiting_job_says_who_holds_the_lock_and_goes_on_when_it_is_freed(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    said = []
    threading.Timer(0.3, lock.unlink).start()
    t0 = time.monotonic()
    with files.exclusive(str(lock), "the stage", poll_s=0.02, say=said.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 >= 0.25
    assert len(said) == 1 and "waiting for the stage" in said[0] and str(os.getpid()) in said[0]


def test_a_lock_left_by_a_dead_process_is_broken(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is free now
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid}))
    said = []
    with files.exclusive(str(lock), "the stage", poll_s=0.02, say=said.append):
        pass
    assert said == [] and not lock.exists()


def test_the_shared_classifier_stage_runs_under_the_lock(tmp_path):
    run = RunDir(str(tmp_path / "cv"))
    seen = []

    class Train:
        @staticmethod
        def classifier_stage(cfg, run_dir):
            seen.append(os.path.exists(os.path.join(run_dir, cross_validation.STAGE_LOCK)))
            return "w.weights.h5"

    cfg = TrainConfig(data_dir="d", run_dir=run.path, folds=2, fold=1,
                      classifier_flagfile="c.cfg", classifier_data_dir="other")
    base = cross_validation.fold_config(cfg, Train, run)
    assert seen == [True] and base.init_from == "w.weights.h5"
    assert not os.path.exists(os.path.join(run.path, cross_validation.STAGE_LOCK))
    # without a shared stage: no lock, nothing run
    assert cross_validation.fold_config(cfg.replace(classifier_data_dir=None), Train,
                                        run).init_from is None and seen == [True]
