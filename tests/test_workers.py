"""data_prep.workers: a worker that dies or hangs costs its own study, not the batch."""

from __future__ import annotations

import os
import signal
import time

import pytest

from data_prep import pipeline, workers
from data_prep.study import StudyTask
from tests.helpers import scan_cfg


def square_or_die(x: int) -> int:
    if x == 3:
        os._exit(3)  # a decoder's crash, or the OS killing the process for memory
    if x == 5:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # past every soft limit
        time.sleep(600)
    if x == 6:
        raise ValueError("a bug")
    return x * x


def lost(args: tuple, why: str, detail: str) -> tuple:
    return why, args[0], detail


def test_a_dead_or_stuck_worker_costs_its_task_only():
    start = time.monotonic()
    out = list(workers.run_tasks(square_or_die, [(i,) for i in range(9)], 2, lost,
                                 hard_timeout_s=3.0))
    assert time.monotonic() - start < 60
    assert out[:3] == [0, 1, 4] and out[4] == 16 and out[7:] == [49, 64]
    assert out[3][:2] == ("crashed", 3) and "exit code 3" in out[3][2]
    assert out[5][:2] == ("timeout", 5) and out[5][2].startswith("killed after")
    assert out[6] == ("crashed", 6, "raised ValueError")


def slow_starting_worker(conn, memory_limit_mb: float) -> None:
    time.sleep(4)  # a spawned interpreter's start on a loaded machine
    workers._worker_main(conn, memory_limit_mb)


def worker_dying_on_start(conn, memory_limit_mb: float) -> None:
    os._exit(7)


def test_the_hard_limit_counts_from_when_the_worker_is_ready(monkeypatch):
    monkeypatch.setattr(workers, "_worker_main", slow_starting_worker)
    out = list(workers.run_tasks(square_or_die, [(i,) for i in (0, 1, 2, 4)], 2, lost,
                                 hard_timeout_s=2.0))
    assert out == [0, 1, 4, 16]


def test_workers_that_die_before_they_are_ready_end_the_batch_with_a_reason(monkeypatch):
    monkeypatch.setattr(workers, "_worker_main", worker_dying_on_start)
    with pytest.raises(RuntimeError, match="die or hang before they are ready"):
        list(workers.run_tasks(square_or_die, [(0,), (1,)], 1, lost))


def crash(task: StudyTask, cfg) -> None:
    os._exit(9)


def test_lost_studies_get_a_named_reason():
    tasks = [StudyTask(study_id=f"s{i}", path=f"/nonexistent/{i}", label="covid",
                       origin=f"line{i + 2:05d}") for i in range(2)]
    cfg = scan_cfg()
    scans = list(pipeline.parallel_map(crash, [(t, cfg) for t in tasks], 2, "scan",
                                       pipeline._lost_scan, 30.0))
    assert [s.error.reason for s in scans] == ["worker_crashed"] * 2
    assert [s.name.split(".")[0] for s in scans] == ["line00002", "line00003"]
    assert "/nonexistent" not in repr([s.error for s in scans])


def allocate_mb(mb: int) -> int:
    import numpy as np

    return int(np.ones(mb * 1024 * 1024, np.uint8).sum() // (1024 * 1024))


def test_worker_memory_is_capped():
    out = list(workers.run_tasks(allocate_mb, [(16,), (3000,), (16,)], 2, lost,
                                 memory_limit_mb=1024))
    assert out[0] == out[2] == 16
    assert out[1] == ("crashed", 3000, "raised MemoryError")


def test_a_study_out_of_memory_is_named(tmp_path, monkeypatch):
    from data_prep import dicom_io
    from data_prep.preprocess import PrepConfig
    from data_prep.study import process_study, scan_study
    from tests.helpers import short_series as series
    from tests.helpers import study_task

    study = tmp_path / "study"
    series(study, kind="covid", seed=1)
    cfg = scan_cfg()
    scan = scan_study(study_task(study), cfg)

    def oom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(dicom_io, "read_hu", oom)
    result = process_study(scan, "train", 0, cfg, PrepConfig(image_size=32), 0)
    assert result.error is not None and result.error.reason == "out_of_memory"
