"""Files read and written whole: one way to read a scan's bytes (the daemon's inbox, an evaluation's
cohort), and one to write a file so that it appears whole or not at all (heatmaps, reports, models)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from meddaemon.failures import FailureReason, ReadLater, ScanFailure
from meddaemon.names import fitted, shown_name
from meddaemon.processes import process_alive

#: what ``write_atomically`` writes: bytes or any object exposing its memory (a numpy array's)
Buffer = bytes | bytearray | memoryview

TMP_SUFFIX = ".tmp"
#: this host in temporary names, without the dots and dashes that separate their parts
HOST_TAG = socket.gethostname().replace(".", "_").replace("-", "_") or "localhost"


def temporary_path(path: Path) -> Path:
    """``.<name>.<host>-<pid>.tmp`` beside ``path``: hidden from the inbox scan, unique per process
    (on every host sharing the folder), and recognisable, so a sweep can remove what a killed
    writer left. A name too long for that is cut to fit (``final_path`` then gives the cut name)."""
    return path.with_name(fitted(f".{path.name}", f".{HOST_TAG}-{os.getpid()}{TMP_SUFFIX}"))


def _temporary_parts(tmp: Path) -> tuple[str, str]:
    """A ``temporary_path`` name's parts: the name it was to become, and its writer (``<host>-<pid>``)."""
    final, _, writer = tmp.name.removesuffix(TMP_SUFFIX).rpartition(".")
    return final[1:], writer


def final_path(tmp: Path) -> Path:
    """The file a temporary of ``temporary_path`` was to become."""
    return tmp.with_name(_temporary_parts(tmp)[0])


def remove_stale_temporaries(folder: Path, recursive: bool = True) -> list[Path]:
    """Delete the temporaries (``temporary_path``'s names: files, or folders filled before their
    rename) that writers of this host, killed while writing, left in ``folder`` (and below it, with
    ``recursive``); those of live writers, here or on other hosts sharing the folder, stay. Returns
    the ones removed."""
    if not folder.is_dir():
        return []
    pattern = f".*{TMP_SUFFIX}"
    removed = []
    for tmp in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if left_by_dead_writer(tmp):
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
    return removed


def left_by_dead_writer(tmp: Path) -> bool:
    """Whether the temporary ``tmp`` was left by a process of this host that is gone (exited, killed
    and not yet reaped, or its pid since given to a later process). Another host's temporaries are
    never judged: their writer may be alive there."""
    host, _, pid = _temporary_parts(tmp)[1].rpartition("-")
    if (host and host != HOST_TAG) or not (pid.isascii() and pid.isdigit()):
        return False
    try:
        last_written = tmp.lstat().st_mtime
    except OSError:
        return False  # already gone: nothing to remove
    return not process_alive(int(pid), since=last_written)


def write_atomically(
    path: Path, data: Buffer | Sequence[Buffer], durable: bool = False, sync_folder: bool = True
) -> None:
    """Write ``data`` to a temporary name and rename it to ``path``; on any error nothing is left.

    ``data`` is the bytes, or several buffers written one after the other in one system call (a
    header and an array's own memory, without joining them into a copy first).
    ``durable`` also fsyncs the file and its folder (and the parent of each folder it had to make),
    so the file survives a power cut once this returns (models, reports); heatmaps skip it: a lost
    one is rewritten when its scan runs again.
    ``sync_folder=False`` leaves the folder's fsync to a caller writing several files into it,
    which calls ``fsync_dir`` once after the last (the renames are durable only then).
    """
    make_folders(path.parent, durable=durable)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, [data] if isinstance(data, bytes | bytearray | memoryview) else data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable and sync_folder:
        fsync_dir(path.parent)


def write_named_output(path: Path, data: bytes) -> None:
    """Write a file a user named on the command line (``--csv``, ``--pdf``): through a symbolic link
    (the link stays, its target is written), into a pipe or a device as it stands (a FIFO,
    ``/dev/null``), into this process's own stream for ``/dev/stdout`` (``/dev/stderr``,
    ``/dev/fd/N``), otherwise whole or not at all. Renamed over, a link or a pipe was replaced by a
    regular file and what was written never reached its reader; ``/dev/stdout`` followed to the
    file a shell appends to was renamed over that file."""
    descriptor = named_descriptor(path)
    if descriptor is not None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # what was printed before comes before
        _write_all(descriptor, [data])
        return
    target = output_target(path)
    if target.exists() and not target.is_file():
        with target.open("wb") as out:
            out.write(data)
        return
    write_atomically(target, data, durable=True)


def check_named_output(path: Path) -> None:
    """Raise the OSError that writing ``path`` with ``write_named_output`` would meet at its start:
    its folder made, a temporary of this process's own created and removed beside it (never a
    name a user's file may hold); a pipe or device only checked for write permission (opening a
    pipe would wait for its reader), a stream of this process for being open."""
    descriptor = named_descriptor(path)
    if descriptor is not None:
        os.fstat(descriptor)
        return
    target = output_target(path)
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        return
    make_folders(target.parent)
    probe = temporary_path(target)
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


def output_target(path: Path) -> Path:
    """The file ``path`` names: the end of its chain of symbolic links (a dangling link's target);
    an OSError (ELOOP) for links in a loop."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops inside a loop
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    return target


_DESCRIPTOR_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def named_descriptor(path: Path) -> int | None:
    """The file descriptor of this process that ``path`` names, or None: standard output or error
    by any name of the file they are open on (``/dev/stdout``, a link to it, ``/proc/thread-self/fd/1``,
    a link to ``/dev/fd``, the file a shell redirected them to), or ``/dev/fd/N``, ``/proc/self/fd/N``."""
    with contextlib.suppress(OSError):
        named = os.stat(path)
        for descriptor in (1, 2):
            with contextlib.suppress(OSError):
                stream = os.fstat(descriptor)
                if (named.st_dev, named.st_ino) == (stream.st_dev, stream.st_ino):
                    return descriptor
    if not path.is_absolute() or ".." in path.parts:  # "/dev/fd/../stdout" names nothing
        return None
    name = "/" + str(path).lstrip("/")  # "//dev/stdout" is "/dev/stdout"
    if name in _DESCRIPTOR_NAMES:  # a stream that is closed: its write fails with EBADF, said as such
        return _DESCRIPTOR_NAMES[name]
    folder, _, number = name.rpartition("/")
    if folder in ("/dev/fd", "/proc/self/fd", f"/proc/{os.getpid()}/fd") and number.isdigit():
        return int(number)
    return None


def _write_all(fd: int, buffers: Sequence[Buffer]) -> None:
    """Every byte of ``buffers``, in order, with ``writev`` (again from where a short write stopped)."""
    views = [_bytes_view(memoryview(buffer)) for buffer in buffers]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


def _bytes_view(view: memoryview) -> memoryview:
    """``view`` as flat bytes, so that its length counts bytes (``cast`` refuses an empty array's view)."""
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


#: what a filesystem that cannot fsync a folder answers: its renames are as durable as it makes them
CANNOT_FSYNC_FOLDERS = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def fsync_dir(path: Path, strict: bool = False) -> None:
    """Make a rename in ``path`` durable; best effort (some filesystems refuse to fsync a folder).

    ``strict`` raises any other failure (EIO: the disk failing), for a caller that tells a peer its
    data is safe once this returns (the C-STORE receiver, a folder destination)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if strict and exc.errno not in CANNOT_FSYNC_FOLDERS:
            raise


def make_folders(folder: Path, durable: bool = False) -> None:
    """``folder`` and the parents it lacks, as ``mkdir(parents=True, exist_ok=True)``.

    ``durable`` also fsyncs the parent of each folder that was missing (strictly, as
    ``fsync_dir``): a file fsynced into a new folder is lost in a power cut with that folder
    when the folder's own entry in its parent was never made durable."""
    missing: list[Path] = []
    while not folder.is_dir() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(exist_ok=True)  # made meanwhile by another writer: its entry is made durable here too
        except FileExistsError:  # a file there: "File exists" said nothing of which, or that it is no folder
            what = "a file, not a folder"
            if new.is_symlink() and not new.exists():  # a loop of links, or one to nothing, was "a file"
                what = "a link that leads to no folder (to nothing, or round a loop of links)"
            raise NotADirectoryError(errno.ENOTDIR, f"{shown_name(new)} is {what}", str(new)) from None
        if durable:
            fsync_dir(new.parent, strict=True)


def read_whole(
    path: Path | str, *, follow_symlinks: bool = False, keep_atime: bool = False, max_bytes: int | None = None
) -> tuple[bytes, os.stat_result]:
    """The bytes of ``path`` and the status of the file they came from (``fstat`` of the open file,
    to compare with what was seen before), or a ScanFailure with the daemon's reason code.

    Opened read-only and non-blocking (a FIFO in the tree does not hang the reader), never locked.
    The inbox follows no symbolic link; a dataset is the user's own tree and does. ``keep_atime``
    leaves the access time alone where the system allows it (``O_NOATIME`` needs the file's owner).
    A file over ``max_bytes`` is refused unread (``too_large``): it would be held whole in memory.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = open_keeping_atime(path, flags) if keep_atime else os.open(path, flags)
    except FileNotFoundError:
        if follow_symlinks and os.path.islink(path):  # a dataset's link whose target is not there
            raise ScanFailure(FailureReason.UNREADABLE, "a symbolic link to a file that does not exist") from None
        raise ScanFailure(FailureReason.VANISHED, "the file was deleted before it could be read") from None
    except PermissionError:
        raise ScanFailure(FailureReason.UNREADABLE, "permission denied") from None
    except OSError as exc:
        raise unreadable("cannot open the file", exc) from None
    try:
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise ScanFailure(
                    FailureReason.TOO_LARGE,
                    f"the file holds {size} bytes, over max_file_bytes ({max_bytes}); it was not read",
                )
            return handle.read(), os.fstat(handle.fileno())
    except IsADirectoryError:
        raise ScanFailure(FailureReason.UNREADABLE, "not a regular file") from None
    except OSError as exc:
        raise unreadable("cannot read the file", exc) from None


#: errors of the host, not of the file: out of descriptors, memory or buffers, interrupted, a stale
#: handle on a share; reading again later can succeed
PASSING_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR, errno.ESTALE}
)


def unreadable(what: str, exc: OSError) -> ScanFailure:
    """``unreadable``, saying ``what`` could not be done; a ``ReadLater`` for the host's passing trouble."""
    failure = ReadLater if exc.errno in PASSING_ERRNOS else ScanFailure
    return failure(FailureReason.UNREADABLE, f"{what}: {exc.strerror}")


def read_text_in_place(path: Path | str) -> str:
    """The text of a dataset's file (UTF-8, a byte-order mark dropped, line ends as written), its
    access time left as it was where the system allows: a dataset is read where it lies."""
    with os.fdopen(open_keeping_atime(path, os.O_RDONLY), encoding="utf-8-sig", newline="") as handle:
        return handle.read()


def open_keeping_atime(path: Path | str, flags: int) -> int:
    """``os.open``, leaving the file's access time alone where the system lets this user
    (``O_NOATIME`` needs the file's owner); a descriptor either way."""
    noatime = getattr(os, "O_NOATIME", 0)
    if noatime:
        try:
            return os.open(path, flags | noatime)
        except PermissionError:
            pass
    return os.open(path, flags)


@contextlib.contextmanager
def folder_entries(folder: Path) -> Iterator[Iterator[os.DirEntry[str]]]:
    """``os.scandir(folder)``, leaving the folder's access time alone where the system lets this
    user, as ``open_keeping_atime`` does for a file: a cohort read in place is not touched. Ask the
    entries what they are inside the ``with`` (they are read through the open folder); their
    ``path`` is their name alone."""
    descriptor = open_keeping_atime(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        with os.scandir(descriptor) as listing:  # scandir reads a duplicate of the descriptor
            yield listing
    finally:
        os.close(descriptor)


def folder_paths(folder: Path) -> list[Path]:
    """The paths in ``folder``, as ``Path.iterdir`` gives them, its access time left alone as
    ``folder_entries`` leaves it."""
    with folder_entries(folder) as entries:
        return [folder / entry.name for entry in entries]


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path`` (hex), read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of ``path`` (None: gone, or not to be looked at): what tells a folder or
    a file replaced under the same name from the one that was there."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino
