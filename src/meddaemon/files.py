"""Files read and written whole: one way to read a scan's bytes (the daemon's inbox, an evaluation's
cohort), and one to write a file so that it appears whole or not at all (heatmaps, reports, models)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from meddaemon.failures import FailureReason, ScanFailure

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


def write_atomically(path: Path, data: bytes, durable: bool = False, sync_folder: bool = True) -> None:
    """Write ``data`` to a temporary name and rename it to ``path``; on any error nothing is left.

    ``durable`` also fsyncs the file and its folder, so the file survives a power cut once this
    returns (models, reports); heatmaps skip it: a lost one is rewritten when its scan runs again.
    ``sync_folder=False`` leaves the folder's fsync to a caller writing several files into it,
    which calls ``fsync_dir`` once after the last (the renames are durable only then).
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
    if durable and sync_folder:
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


def read_whole(
    path: Path | str, *, follow_symlinks: bool = False, keep_atime: bool = False
) -> tuple[bytes, os.stat_result]:
    """The bytes of ``path`` and the status of the file they came from (``fstat`` of the open file,
    to compare with what was seen before), or a ScanFailure with the daemon's reason code.

    Opened read-only and non-blocking (a FIFO in the tree does not hang the reader), never locked.
    The inbox follows no symbolic link; a dataset is the user's own tree and does. ``keep_atime``
    leaves the access time alone where the system allows it (``O_NOATIME`` needs the file's owner).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = _open_keeping_atime(path, flags) if keep_atime else os.open(path, flags)
    except FileNotFoundError:
        raise ScanFailure(FailureReason.VANISHED, "the file was deleted before it could be read") from None
    except PermissionError:
        raise ScanFailure(FailureReason.UNREADABLE, "permission denied") from None
    except OSError as exc:
        raise ScanFailure(FailureReason.UNREADABLE, f"cannot open the file: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            return handle.read(), os.fstat(handle.fileno())
    except IsADirectoryError:
        raise ScanFailure(FailureReason.UNREADABLE, "not a regular file") from None
    except OSError as exc:
        raise ScanFailure(FailureReason.UNREADABLE, f"cannot read the file: {exc.strerror}") from None


def _open_keeping_atime(path: Path | str, flags: int) -> int:
    noatime = getattr(os, "O_NOATIME", 0)
    if noatime:
        try:
            return os.open(path, flags | noatime)
        except PermissionError:
            pass
    return os.open(path, flags)
