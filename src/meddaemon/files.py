"""Writing a file so that it appears whole or not at all: one way for heatmaps, reports and models."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

TMP_SUFFIX = ".tmp"
#: this host in temporary names, without the dots and dashes that separate their parts
HOST_TAG = socket.gethostname().replace(".", "_").replace("-", "_") or "localhost"


def temporary_path(path: Path) -> Path:
    """``.<name>.<host>-<pid>.tmp`` beside ``path``: hidden from the inbox scan, unique per process
    (on every host sharing the folder), and recognisable, so a sweep can remove what a killed
    writer left."""
    return path.with_name(f".{path.name}.{HOST_TAG}-{os.getpid()}{TMP_SUFFIX}")


def left_by_dead_writer(tmp: Path) -> bool:
    """Whether the temporary ``tmp`` was left by a process of this host that is gone. Another host's
    temporaries are never judged: their writer may be alive there."""
    writer = tmp.name.removesuffix(TMP_SUFFIX).rsplit(".", 1)[-1]
    host, _, pid = writer.rpartition("-")
    if (host and host != HOST_TAG) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


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
