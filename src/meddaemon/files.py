"""Writing a file so that it appears whole or not at all: one way for heatmaps, reports and models."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """``.<name>.<pid>.tmp`` beside ``path``: hidden from the inbox scan, unique per process, and
    recognisable, so a sweep can remove what a killed writer left."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def write_atomically(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to a temporary name and rename it to ``path``; on any error nothing is left.

    ``durable`` also fsyncs the file and its folder, so the file survives a power cut once this
    returns (models, reports); heatmaps skip it: a lost one is rewritten when its scan runs again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
