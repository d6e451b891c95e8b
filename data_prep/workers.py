"""Worker processes that one study can neither hang nor kill the batch with.

``multiprocessing.Pool`` waits forever for the result of a worker that died (a decoder's
segmentation fault, the OS killing it for memory) and cannot take back a task stuck in C
code. :func:`run_tasks` gives each worker one task at a time over its own pipe, watches its
process, and when a worker dies or runs past the hard time limit it kills it, starts a fresh
one, and hands the task to ``on_lost`` (which turns it into that study's failure); every
other task goes on. The soft limit (:func:`data_prep.limits.deadline`, inside the task)
normally ends a slow study first, with a cleaner reason.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator

# Lost tasks: "timeout" (past the hard limit, killed) or "crashed" (the process died).
OnLost = Callable[[tuple, str, str], Any]
#: A new worker's first message: its interpreter started and imported what it needs (a
#: spawned process takes seconds to, more on a loaded machine; that is not the task's time).
READY = "ready"
#: A worker that is not ready this long after its start is killed and started again (while
#: tasks wait); a worker slot whose process dies or hangs before it is ready this many times
#: in a row ends the batch with that reason.
START_LIMIT_S = 300.0
START_TRIES = 3


def init_worker(memory_limit_mb: float = 0.0) -> None:
    """One OpenCV thread per worker process (the processes are the parallelism); with a
    memory limit, the process's address space is capped there (an allocation over it fails
    with MemoryError in that study instead of taking the machine's memory)."""
    import cv2

    cv2.setNumThreads(1)
    if memory_limit_mb > 0:
        import resource

        limit = int(memory_limit_mb * 1024 * 1024)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn: Connection, memory_limit_mb: float) -> None:
    init_worker(memory_limit_mb)
    conn.send(READY)  # the parent's clock for a task starts once its worker can run it
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, fn, args = msg
        try:
            out = (index, True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, by type only
            out = (index, False, type(exc).__name__)
        try:
            conn.send(out)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send((index, False, type(exc).__name__))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    task: int | None = None
    started: float = 0.0
    ready: bool = False
    born: float = 0.0
    tries: int = 1  # starts in a row that did not get ready, this one included


def _start(ctx, memory_limit_mb: float, tries: int = 1) -> _Worker:
    if tries > START_TRIES:
        raise RuntimeError(f"worker processes die or hang before they are ready "
                           f"({START_TRIES} starts in a row)")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_worker_main, args=(child, memory_limit_mb), daemon=True)
    process.start()
    child.close()
    return _Worker(process, parent, born=time.monotonic(), tries=tries)


def _stop(worker: _Worker, kill: bool) -> None:
    if kill:
        worker.process.kill()
    else:
        try:
            worker.conn.send(None)
        except (OSError, ValueError):
            pass
    worker.process.join(5)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join(5)
    worker.conn.close()


def run_tasks(fn: Callable, arg_list: list[tuple], workers: int, on_lost: OnLost,
              hard_timeout_s: float = 0.0, memory_limit_mb: float = 0.0) -> Iterator:
    """``fn(*args)`` for each args, yielded in order, over ``workers`` spawned processes.
    ``hard_timeout_s`` > 0: a task running longer is killed with its worker;
    ``memory_limit_mb`` > 0: each worker's address space is capped."""
    ctx = multiprocessing.get_context("spawn")
    pending = deque(range(len(arg_list)))
    done: dict[int, Any] = {}
    pool = [_start(ctx, memory_limit_mb) for _ in range(min(workers, len(arg_list)))]
    next_out = 0
    try:
        while next_out < len(arg_list):
            for i, w in enumerate(pool):
                if w.ready and w.task is None and pending and not w.process.is_alive():
                    _stop(w, kill=True)  # died between tasks
                    pool[i] = w = _start(ctx, memory_limit_mb)
                if w.ready and w.task is None and pending:
                    w.task, w.started = pending.popleft(), time.monotonic()
                    try:
                        w.conn.send((w.task, fn, arg_list[w.task]))
                    except (OSError, ValueError):  # it died just now: seen below
                        pass
            busy = [w for w in pool if w.task is not None]
            starting = [w for w in pool if not w.ready]
            ends = [w.born + START_LIMIT_S for w in starting]
            if hard_timeout_s > 0:
                ends += [w.started + hard_timeout_s for w in busy]
            timeout = max(0.0, min(ends) - time.monotonic()) if ends else None
            watched = busy + starting
            ready = set(wait([w.conn for w in watched] + [w.process.sentinel for w in watched],
                             timeout))
            now = time.monotonic()
            for i, w in enumerate(pool):
                if not w.ready:
                    if w.conn in ready:
                        try:
                            w.ready = w.conn.recv() == READY
                        except (EOFError, OSError):
                            pass
                    if not w.ready and (w.conn in ready or w.process.sentinel in ready
                                        or now - w.born > START_LIMIT_S):
                        _stop(w, kill=True)  # started again only while tasks wait for it
                        pool[i] = _start(ctx, memory_limit_mb, w.tries + 1) if pending \
                            else None
                    continue
                if w.task is None:
                    continue
                lost = ""
                if w.conn in ready:
                    try:
                        index, ok, value = w.conn.recv()
                        done[index] = value if ok else on_lost(arg_list[index], "crashed",
                                                               f"raised {value}")
                        w.task = None
                        continue
                    except (EOFError, OSError):
                        lost = "crashed"
                elif w.process.sentinel in ready:
                    lost = "crashed"
                elif hard_timeout_s > 0 and now - w.started > hard_timeout_s:
                    lost = "timeout"
                if lost:
                    if lost == "crashed":
                        w.process.join(2)  # the pipe can close before the exit is seen
                    code = w.process.exitcode
                    detail = (f"killed after {now - w.started:.0f} s" if lost == "timeout" else
                              f"the worker process died (exit code {code})")
                    done[w.task] = on_lost(arg_list[w.task], lost, detail)
                    _stop(w, kill=True)
                    pool[i] = _start(ctx, memory_limit_mb)
            pool = [w for w in pool if w is not None]
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
    finally:
        for w in pool:
            if w is not None:
                _stop(w, kill=w.task is not None or not w.ready)
