"""What data_prep says about a study without saying anything about the patient.

* :func:`study_name` / :func:`file_names`: the pseudonymous names failures.csv, the log and
  manifest.json use (see :mod:`data_prep.errors` for the scheme). Paths and folder names
  (which hospitals fill with ``<PatientID>_<date>`` or a name) never leave the worker.
* :func:`capture_library_messages`: pydicom's warnings (``warnings`` module and the
  ``pydicom`` logger) quote tag values, UIDs included, and C libraries print to file
  descriptor 2; all are caught and counted by kind.
* :func:`spreadsheet_safe`: a failures.csv cell can never start a formula.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections import Counter
from typing import Iterator


def to_bytes(text: str) -> bytes:
    """UTF-8 bytes of any str, including the surrogate-escaped bytes of a path that is not
    valid UTF-8 (os.fsdecode's), so that every path can be hashed."""
    return text.encode("utf-8", "surrogateescape")


def _hash(salt: bytes, kind: str, value: str, length: int) -> str:
    h = hashlib.sha256(salt + b"\x00" + kind.encode() + b"\x00" + to_bytes(value))
    return h.hexdigest()[:length]


def study_name(origin: str, path: str, salt: bytes) -> str:
    """``<origin>.<10 hex>``: where the study came from in the input (``line00017``,
    ``entry00003``) and a salted hash of its path."""
    return f"{origin}.{_hash(salt, 'study-name', path, 10)}"


def file_names(files: list[str], root: str, salt: bytes) -> dict[str, str]:
    """path -> ``file<NNNNN>.<8 hex>`` (1-based index in the study's sorted listing, salted
    hash of the path relative to the study)."""
    out = {}
    for i, f in enumerate(files, start=1):
        rel = os.path.relpath(f, root) if os.path.isdir(root) else os.path.basename(f)
        out[f] = f"file{i:05d}.{_hash(salt, 'file-name', rel, 8)}"
    return out


def escaped(text: str) -> str:
    """A printable ASCII rendering of any str: bytes that were not UTF-8 as ``\\xff``,
    control characters as ``\\x00`` / ``\\n``, other non-ASCII as ``\\u20ac``."""
    s = to_bytes(text).decode("utf-8", "backslashreplace")
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s.encode("ascii", "backslashreplace").decode("ascii")


# ---------------------------------------------------------------- library messages
_KINDS = (
    (re.compile(r"Invalid value for VR (\w\w)"), "invalid {0} value"),
    (re.compile(r"VR of '?(\w\w)'? .*(differ|mismatch)", re.I), "VR mismatch"),
    (re.compile(r"[Ee]xpected explicit VR"), "VR mismatch"),
    (re.compile(r"(end of (the )?file|truncat|shorter|EOF)", re.I), "file ends early"),
    (re.compile(r"[Pp]reamble"), "missing preamble"),
    (re.compile(r"[Tt]ransfer [Ss]yntax"), "transfer syntax"),
    (re.compile(r"[Cc]haracter set|[Ee]ncoding|codec", re.I), "character set"),
    (re.compile(r"length", re.I), "element length"),
)


def message_kind(message: str) -> str:
    """A value-free name for a library message (never the message itself)."""
    for pattern, name in _KINDS:
        m = pattern.search(message)
        if m:
            return name.format(*m.groups()) if "{0}" in name else name
    return "other"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: Counter = Counter()  # text -> count; held here, never written

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            try:
                self.messages[record.getMessage()] += 1
            except Exception:  # noqa: BLE001 - a broken record is still counted
                self.messages[""] += 1


@contextlib.contextmanager
def capture_library_messages() -> Iterator[Counter]:
    """Every warning (``warnings`` module) and every pydicom log record of WARNING or above
    raised inside is counted by kind and printed nowhere. pydicom's ``warn_and_log`` both
    warns and logs one message: it is counted once."""
    counts: Counter = Counter()
    if threading.current_thread() is not threading.main_thread():
        with _thread_capture() as (caught, logged):
            yield counts
        _tally(counts, caught, logged)
        return
    logger = logging.getLogger("pydicom")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    with _native_stderr_counted(counts), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield counts
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate
            _tally(counts, caught, handler.messages)


def _tally(counts: Counter, caught: list, logged: Counter) -> None:
    warned: Counter = Counter()
    kind_of: dict[str, str] = {}
    for w in caught:
        text = str(w.message)
        warned[text] += 1
        kind_of[text] = _warning_kind(w)
    for text in set(warned) | set(logged):
        counts[kind_of.get(text) or message_kind(text)] += max(warned[text], logged[text])


# Non-main threads (Beam's threaded runners): warning filters, ``warnings.showwarning`` and
# the logger are per process, so they are set once for the process and route each message
# to the capturing thread's own lists. (C libraries' fd 2 cannot be split per thread.)
_thread = threading.local()
_hook_lock = threading.Lock()


class _ThreadRouter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logged = getattr(_thread, "logged", None)
        if logged is not None and record.levelno >= logging.WARNING:
            try:
                logged[record.getMessage()] += 1
            except Exception:  # noqa: BLE001 - a broken record is still counted
                logged[""] += 1


def _route_warning(message: Warning | str, category: type[Warning], filename: str,
                   lineno: int, file: object = None, line: str | None = None) -> None:
    caught = getattr(_thread, "caught", None)
    if caught is not None:
        caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
    # elsewhere in such a process warnings are dropped: they could quote input values


@contextlib.contextmanager
def _thread_capture() -> Iterator[tuple[list, Counter]]:
    with _hook_lock:  # (re)installed whenever something else replaced them
        if warnings.showwarning is not _route_warning:
            warnings.showwarning = _route_warning
        logger = logging.getLogger("pydicom")
        if not any(isinstance(h, _ThreadRouter) for h in logger.handlers):
            logger.addHandler(_ThreadRouter())
        logger.propagate = False
        if not warnings.filters or warnings.filters[0][0] != "always":
            warnings.simplefilter("always")
    _thread.caught, _thread.logged = [], Counter()
    try:
        yield _thread.caught, _thread.logged
    finally:
        _thread.caught = _thread.logged = None


@contextlib.contextmanager
def _native_stderr_counted(counts: Counter) -> Iterator[None]:
    """C libraries (libpng, libjpeg, GDCM, OpenJPEG) write straight to file descriptor 2,
    and some quote the file's own strings (a PNG's ICC profile name): their lines go to an
    unlinked temporary file instead, and are only counted."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: sink.read(1 << 16), b""))
            if lines:
                counts["native library message"] += lines


def _warning_kind(w: warnings.WarningMessage) -> str:
    kind = message_kind(str(w.message))
    return f"other {w.category.__name__}" if kind == "other" else kind


def summarise(counts: Counter) -> str:
    """'invalid UI value x200, VR mismatch x3' (kinds only, never values)."""
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


# ---------------------------------------------------------------- failures.csv
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """Printable ASCII, and never read as a formula by a spreadsheet (a leading
    ``= + - @ TAB CR`` gets a ``'`` in front, OWASP's CSV-injection advice)."""
    text = escaped(cell)
    return "'" + text if cell.startswith(_FORMULA_START) or text.startswith(_FORMULA_START) \
        else text
