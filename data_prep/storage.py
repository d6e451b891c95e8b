"""Spool and summary files on any file system: local paths through ``os``; a path with a
scheme through Apache Beam's ``FileSystems`` when Beam is installed and knows the scheme
(``gs://``, ``s3://``, ``hdfs://``, ``azfs://``: what Beam's workers on Dataflow, Flink or
Spark use), else through ``tf.io.gfile`` (:mod:`covid_keras.core.files`: every file system
registered with TensorFlow, ``ram://`` included).

Writes are whole-or-nothing (a temporary file beside, then a rename), so a reader never
sees half a spool file.
"""

from __future__ import annotations

import os

from covid_keras.core import files


def _beam(path: str):
    """Beam's FileSystems when it handles ``path``, else None."""
    if not files.is_remote(path):
        return None
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError:
        return None
    try:
        FileSystems.get_filesystem(path)
    except (ValueError, OSError):  # a scheme Beam does not know (TensorFlow's ram://) or
        return None  # cannot serve here (hdfs:// without its client)
    return FileSystems


def _uncompressed():
    """Bytes as they are (Beam would otherwise guess a compression from the file name)."""
    from apache_beam.io.filesystem import CompressionTypes

    return CompressionTypes.UNCOMPRESSED


def join(folder: str, name: str) -> str:
    if files.is_remote(folder):
        return f"{folder.rstrip('/')}/{name}"
    return os.path.join(folder, name)


def exists(path: str) -> bool:
    beam = _beam(path)
    return beam.exists(path) if beam else files.exists(path)


def makedirs(path: str) -> None:
    beam = _beam(path)
    if beam:
        try:
            beam.mkdirs(path)
        except OSError:  # exists already (object stores have no folders: a no-op)
            pass
    else:
        files.makedirs(path)


def read_bytes(path: str) -> bytes:
    beam = _beam(path)
    if beam:
        with beam.open(path, compression_type=_uncompressed()) as f:
            return f.read()
    return files.read_bytes(path)


def write_bytes(path: str, data: bytes) -> None:
    """``path`` appears whole or not at all."""
    beam = _beam(path)
    if beam is None:
        files.atomic_write_bytes(path, data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with beam.create(tmp, compression_type=_uncompressed()) as f:
        f.write(data)
    if beam.exists(path):
        beam.delete([path])
    beam.rename([tmp], [path])


def size(path: str) -> int:
    beam = _beam(path)
    if beam:
        return beam.match([path])[0].metadata_list[0].size_in_bytes
    if files.is_remote(path):
        import tensorflow as tf

        return tf.io.gfile.stat(path).length
    return os.path.getsize(path)


def remove(path: str) -> None:
    beam = _beam(path)
    if beam:
        if beam.exists(path):
            beam.delete([path])
    else:
        files.remove(path)


def rmtree(path: str) -> None:
    """Removes a (flat) folder and its files, if there."""
    beam = _beam(path)
    if beam is None:
        files.rmtree(path)
        return
    try:
        found = [m.path for m in beam.match([join(path, "*")])[0].metadata_list]
    except OSError:
        found = []
    if found:
        beam.delete(found)
    try:
        beam.delete([path.rstrip("/")])  # a local or HDFS folder; object stores have none
    except OSError:
        pass
