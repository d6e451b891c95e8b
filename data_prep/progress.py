"""Progress of a data_prep phase: a tqdm bar on a terminal, periodic log lines otherwise.

    with Progress(len(tasks), "scan", "study") as bar:
        for ...:
            bar.update()

When stderr is not a terminal (a batch job, CI, a pipe into a file), a line
``scan: 120/400 studies (30 %), 4.1 studies/s, about 68 s left`` is logged every
:data:`LOG_EVERY_S` seconds and one at the end, so a long run still shows where it is.
Lines say counts and rates only (never a name or path).
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("data_prep")

#: Seconds between two log lines when stderr is not a terminal.
LOG_EVERY_S = 30.0


def _plural(unit: str, n: float) -> str:
    if n == 1:
        return unit
    return unit[:-1] + "ies" if unit.endswith("y") else unit + "s"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "study", *,
                 every_s: float | None = None, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        stream = stream or sys.stderr
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream) if tty else None
        self.n = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s and self.n < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        pct = 100.0 * self.n / self.total if self.total else 100.0
        text = (f"{self.desc}: {self.n}/{self.total} {_plural(self.unit, self.total)} "
                f"({pct:.0f} %), {rate:.1f} {_plural(self.unit, 2)}/s")
        if 0 < self.n < self.total and rate > 0:
            text += f", about {(self.total - self.n) / rate:.0f} s left"
        return text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            elapsed = time.monotonic() - self.start
            log.info("%s: %d/%d %s in %.1f s", self.desc, self.n, self.total,
                     _plural(self.unit, self.total), elapsed)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
