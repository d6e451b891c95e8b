"""Bounded work per study: only regular files, bounded bytes, bounded pixels, bounded time.

A hospital folder can hold anything: FIFOs (``open`` blocks forever), links to ``/dev/zero``
(a reader never reaches the end), files of many GB, a 0.4 MB PNG that decodes to
20000 x 20000 pixels. Every file data_prep reads goes through :func:`open_regular`, every
image's dimensions are read from its header (:func:`image_header_size`) and checked against
a pixel limit before it is decoded, and every study runs under a :func:`deadline`. Each
limit failure is a :class:`data_prep.errors.StudyError` with a named reason, so the batch
goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from data_prep.errors import StudyError

DEFAULT_MAX_FILE_MB = 256.0
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_STUDY_TIMEOUT_S = 600.0
# A worker's address space: a 448 px study with JPEG decoding peaks near 0.5 GB of it.
DEFAULT_WORKER_MEMORY_MB = 4096.0
# In-plane pixel spacing a chest CT can have: 0.1 mm (micro-CT-like reconstructions) to
# 20 mm (far coarser than any diagnostic CT). 0.0007 (metres) or 700 (micrometres) are
# rejected before the lung mask sizes its kernels from them.
PIXEL_SPACING_RANGE_MM = (0.1, 20.0)


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = int(DEFAULT_MAX_FILE_MB * 1024 * 1024)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    study_timeout_s: float = DEFAULT_STUDY_TIMEOUT_S  # <= 0: no limit
    worker_memory_mb: float = DEFAULT_WORKER_MEMORY_MB  # <= 0: no limit; worker processes only


def check_regular(path: str, limits: Limits) -> os.stat_result:
    """The file's stat (links followed) if it is a regular file within the byte limit; raises
    StudyError(not_regular_file | file_too_large) without opening it."""
    try:
        st = os.stat(path)
    except OSError as exc:  # dangling link, link loop, permission
        raise StudyError("not_regular_file", f"cannot stat ({type(exc).__name__})", path)
    if not stat.S_ISREG(st.st_mode):
        raise StudyError("not_regular_file", f"a {_kind(st.st_mode)}, not a regular file", path)
    if st.st_size > limits.max_file_bytes:
        raise StudyError("file_too_large", f"{st.st_size} bytes > --max_file_mb "
                         f"({limits.max_file_bytes} bytes)", path)
    return st


@contextlib.contextmanager
def open_regular(path: str, limits: Limits) -> Iterator[BinaryIO]:
    """Opens ``path`` for reading only if it is a regular file within the byte limit.

    The type is checked before opening (a device is never opened) and again on the open
    descriptor (the name could have been swapped for a FIFO in between); the open itself is
    non-blocking, so a FIFO cannot hang it."""
    check_regular(path, limits)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise StudyError("unreadable_file", f"cannot open ({type(exc).__name__})", path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StudyError("not_regular_file", f"a {_kind(st.st_mode)}, not a regular file",
                             path)
        if st.st_size > limits.max_file_bytes:
            raise StudyError("file_too_large", f"{st.st_size} bytes > --max_file_mb "
                             f"({limits.max_file_bytes} bytes)", path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        yield f


def read_bytes(path: str, limits: Limits, n: int = -1) -> bytes:
    """The first ``n`` bytes (all: -1) of a regular file within the limits. An I/O error is
    StudyError(unreadable_file)."""
    with open_regular(path, limits) as f:
        try:
            return f.read(limits.max_file_bytes if n < 0 else n)
        except OSError as exc:
            raise StudyError("unreadable_file", f"cannot read ({type(exc).__name__})", path)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


# ---------------------------------------------------------------- image dimensions
def image_header_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) of a PNG or JPEG from its first bytes (no decoding), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(head) >= 24 and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return height, width
        return None
    if head.startswith(b"\xff\xd8"):
        i = 2
        while i + 4 <= len(head):
            if head[i] != 0xFF:
                i += 1  # stray bytes between segments
                continue
            marker = head[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
                i += 2
                continue
            (length,) = struct.unpack(">H", head[i + 2:i + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
                if i + 9 > len(head):
                    return None
                height, width = struct.unpack(">HH", head[i + 5:i + 9])
                return height, width
            if marker == 0xDA:  # start of scan before any frame header
                return None
            i += 2 + length
    return None


def check_pixels(rows: int, columns: int, limits: Limits, path: str, frames: int = 1) -> None:
    """Raises StudyError(image_too_large) when rows x columns x frames is over the limit."""
    n = int(rows) * int(columns) * max(1, int(frames))
    if n > limits.max_image_pixels:
        raise StudyError("image_too_large", f"{rows} x {columns}"
                         + (" x the frame count" if frames > 1 else f" = {n}")
                         + f" pixels > --max_image_pixels={limits.max_image_pixels}", path)


def check_pixel_spacing(spacing: tuple[float, ...] | None, path: str) -> None:
    """Raises StudyError(bad_pixel_spacing) for NaN, infinite, <= 0 or implausible values."""
    if spacing is None:
        return
    lo, hi = PIXEL_SPACING_RANGE_MM
    for v in spacing:
        if not (lo <= v <= hi):  # NaN fails every comparison
            what = ("is not a number" if v != v else "is <= 0" if v <= 0 else
                    f"is under {lo:g} mm (in metres?)" if v < lo else
                    f"is over {hi:g} mm (in micrometres?)")
            raise StudyError("bad_pixel_spacing", f"PixelSpacing {what}", path)


# ---------------------------------------------------------------- time
class StudyTimeout(BaseException):
    """Raised inside a study's work when its deadline passes. A BaseException, so that the
    per-file ``except Exception`` handlers cannot turn it into a file's failure."""


_deadline = threading.local()


def check_deadline() -> None:
    """Cooperative check, called in every per-file loop."""
    end = getattr(_deadline, "end", None)
    if end is not None and time.monotonic() > end:
        raise StudyTimeout()


def _on_alarm(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise StudyTimeout()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bounds the time of the enclosed work: cooperative checks (:func:`check_deadline`) in
    every thread, and, in the main thread (a local worker process, or the inline run), a
    SIGALRM timer that interrupts pure-Python work such as a parser that never ends.
    ``seconds`` <= 0: no limit."""
    if seconds <= 0:
        yield
        return
    _deadline.end = time.monotonic() + seconds
    use_alarm = (threading.current_thread() is threading.main_thread()
                 and hasattr(signal, "setitimer"))
    old = None
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
        _deadline.end = None
