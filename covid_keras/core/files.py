"""Files the project writes: atomic (write a temporary file beside, then rename) and, for
JSON, strict (``null``, never ``NaN`` or ``Infinity``). The one owner of both.

Local paths use ``os``; a path with a scheme (``gs://``, ``ram://``, ``s3://``...) goes
through ``tf.io.gfile``, so every file system registered with TensorFlow works (TensorFlow
is imported only then).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from typing import Any

import numpy as np


def is_remote(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a remote one (``gs://...``) as given."""
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """The names in a folder (any file system), without trailing slashes."""
    if is_remote(path):
        return [n.rstrip("/") for n in _gfile().listdir(path)]
    return os.listdir(path)


def remove(path: str) -> None:
    """Removes a file if it exists."""
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().remove(path)
    elif os.path.exists(path):
        os.remove(path)


def rmtree(path: str) -> None:
    """Removes a folder and everything in it, if it exists."""
    if is_remote(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    else:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
    """Replaces ``dst`` by ``src`` (atomic on a local file system)."""
    if is_remote(src) or is_remote(dst):
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def copy_file(local: str, path: str) -> None:
    """Copies the local file ``local`` to ``path`` (any file system), replacing it whole:
    a reader sees the old file or the new one."""
    gfile = _gfile()
    tmp = f"{path}.{unique_suffix()}"
    gfile.copy(local, tmp, overwrite=True)
    gfile.rename(tmp, path, overwrite=True)


def put_file(local: str, path: str) -> None:
    """Moves the local file ``local`` to ``path`` (any file system), replacing it whole."""
    if not is_remote(path):
        os.replace(local, path)
        return
    copy_file(local, path)
    os.remove(local)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (any file system)."""
    import hashlib

    return hashlib.sha256(read_bytes(path)).hexdigest()


def read_text(path: str) -> str:
    if is_remote(path):
        with _gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def unique_suffix() -> str:
    """``tmp-<pid>-<random>``: a temporary name no other process writes, on any machine
    (workers of a cluster may share a PID, e.g. 1 in containers, and a file system)."""
    return f"tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """``path`` appears whole or not at all (a reader never sees a partial file)."""
    tmp = f"{path}.{unique_suffix()}"
    if is_remote(path):
        gfile = _gfile()
        with gfile.GFile(tmp, "wb") as f:
            f.write(data)
        gfile.rename(tmp, path, overwrite=True)
        return
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict(obj: Any) -> Any:
    """A JSON-ready copy: NaN and infinities become ``None``, NumPy scalars and arrays
    become Python numbers and lists, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text (raises on anything that is not JSON after :func:`strict`)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, dumps(obj, indent))


@contextlib.contextmanager
def exclusive(lock_path: str, what: str, poll_s: float = 5.0, say=print):
    """Holds ``lock_path`` (created exclusively: ``O_CREAT | O_EXCL``) for the block, so
    that jobs sharing a folder (``--fold=k`` jobs on one machine or on a shared POSIX file
    system) do ``what`` one at a time; a waiting job says so once a minute. A lock left by a
    process of this host that has died is broken. A remote path (``gs://``) has no
    exclusive create: the block runs unlocked there."""
    if is_remote(lock_path):
        yield
        return
    import socket
    import time

    host, waited, told = socket.gethostname(), 0.0, -1
    makedirs(os.path.dirname(os.path.abspath(lock_path)))
    while True:
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(lock_path)
            if (holder.get("host") == host and not pid_alive(holder.get("pid"))) or \
                    (not holder and _age(lock_path) > 60):  # died before writing its pid
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock_path)  # its process died: the lock is stale
                continue
            if int(waited // 60) > told:
                told = int(waited // 60)
                say(f"waiting for {what}, which another job is doing (pid "
                    f"{holder.get('pid')} on {holder.get('host')}; lock {lock_path})")
            time.sleep(poll_s)
            waited += poll_s
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"host": host, "pid": os.getpid()}, f)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)


def _lock_holder(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # being written: not stale


def _age(path: str) -> float:
    import time

    try:
        return time.time() - os.path.getmtime(path)
    except OSError:
        return 0.0


def pid_alive(pid) -> bool:
    """Whether process ``pid`` of this host runs (an unknown pid counts as alive)."""
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
