"""Where files go once the database says so: ``work/`` while in flight, ``archive/`` when done or a
duplicate, ``failed/`` with a ``.reason.json`` beside it.

Every move is committed in the database first (the row's ``pending_move_from``) and carried out
after; ``finish_move`` is idempotent, so recovery after a crash simply calls it again.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath

from meddaemon.daemon.stability import Signature, signature
from meddaemon.files import file_sha256, fsync_dir, remove_stale_temporaries, temporary_path
from meddaemon.names import NAME_MAX, fitted, label_file_part, split_extension

#: times ``finish_move`` makes the target's folder again when it was removed as empty meanwhile
SHARD_RACE_RETRIES = 3
#: what a copy to another file system leaves free there: the database and the reports beside it go on
COPY_RESERVE = 64 * 2**20
COPY_CHUNK = 2**20


class MoveOutcome(StrEnum):
    MOVED = "moved"
    ALREADY_DONE = "already_done"
    LOST = "lost"
    #: another file took the source's name after it was read: it is not moved in its place
    REPLACED = "replaced"


@dataclass(frozen=True)
class CarriedOut:
    """What carrying out committed moves came to (``Daemon._carry_out``)."""

    #: files moved (the others held back, or gone)
    moved: int
    #: scans failed as ``vanished`` by it: their file left the inbox before its move
    vanished: frozenset[int] = frozenset()


@dataclass(frozen=True)
class AsRead:
    """An inbox file as it was read: its size, mtime and inode, and the SHA-256 of its bytes."""

    signature: Signature
    sha256: str | None = None


#: the end of the name of the document kept beside a failed file
REASON_SUFFIX = ".reason.json"


def work_path(work_dir: Path, sha256: str, source_name: PurePosixPath) -> Path:
    return work_dir / sha256[:2] / f"{sha256}{_suffix(source_name)}"


def archive_path(
    archive_dir: Path, source_name: PurePosixPath, sha256: str, day: datetime, taken: set[Path] | None = None
) -> Path:
    """``archive/<YYYY-MM-DD>/<name as received>``; the SHA-256 prefix keeps same-named files apart,
    on disk and among the ``taken`` targets of the same transaction, numbered after it when the same
    bytes came under the same name earlier that day (a third arrival was filed over the second's)."""
    folder = free_folder(archive_dir / day.strftime("%Y-%m-%d"), source_name.parent.parts, taken or set())
    target = folder / source_name.name
    n = 1
    while target.exists() or target.is_symlink() or (taken is not None and target in taken):
        tail = f"__{sha256[:12]}" + (f"__{n}" if n > 1 else "") + _suffix(source_name)
        target = folder / fitted(_stem(source_name), tail)
        n += 1
    if taken is not None:
        taken.add(target)
    return target


def failed_path(failed_dir: Path, source_name: PurePosixPath, taken: set[Path]) -> Path:
    """``failed/<name as received>``, numbered when that name is already there, or when it is the
    name of a reason document (``*.reason.json``): then no failed file can ever take the name of
    another's reason, nor its reason the file's, whichever is filed first (by this daemon or another).
    A name too long to have its reason beside it is cut (``fitted``); the row keeps it whole."""
    folder = free_folder(failed_dir, source_name.parent.parts, taken)
    n = 1
    while True:
        tail = (f"__{n}" if n > 1 else "") + _suffix(source_name)
        target = folder / fitted(_stem(source_name), tail, NAME_MAX - len(REASON_SUFFIX))
        if not (
            target.name.endswith(REASON_SUFFIX)
            or target in taken
            or target.exists()
            or target.is_symlink()
            or reason_path(target).exists()
        ):
            break
        n += 1
    taken.add(target)
    return target


def free_folder(base: Path, parts: Sequence[str], taken: set[Path]) -> Path:
    """``base/<parts>``, each part a folder there or not there yet. A part that is a file (an earlier
    file named like this folder: ``studyA``, then ``studyA/x.png``), or the target of another move of
    the transaction, is numbered (``studyA__2``, cut to fit as a name): its files could never be
    moved into it, and stayed in the inbox for good, their rows saying they were filed."""
    folder = base
    for part in _parts_that_fit(base, parts):
        candidate, n = folder / part, 2
        while candidate in taken or candidate.is_symlink() or (candidate.exists() and not candidate.is_dir()):
            candidate, n = folder / fitted(part, f"__{n}"), n + 1
        folder = candidate
    return folder


#: the most bytes a path may take on Linux, its terminating NUL counted
PATH_MAX = 4096


def _parts_that_fit(base: Path, parts: Sequence[str]) -> Sequence[str]:
    """``parts``, or where ``base/<parts>/<a name of NAME_MAX bytes>`` would be longer than a path may
    be, the leading parts that fit and the rest joined into one folder name (``a__b__c``, cut to
    fit). A file that fitted in the inbox can be too deep for ``archive/<day>/`` or ``failed/``: its
    move raised ``File name too long`` inside the commit, and the daemon exited at every start."""
    room = PATH_MAX - 1 - len(os.fsencode(str(base))) - (1 + NAME_MAX)

    def length(folders: Sequence[str]) -> int:  # each with room for the number free_folder may give it
        return sum(1 + len(os.fsencode(part)) + len(NUMBERED) for part in folders)

    if length(parts) <= room:
        return parts
    kept: list[str] = []
    for part in parts:
        if length([*kept, part]) + 1 + NAME_MAX > room:
            break
        kept.append(part)
    return [*kept, fitted("__".join(parts[len(kept) :]), "", NAME_MAX - len(NUMBERED))]


#: the longest number ``free_folder`` gives a folder, counted in the room of a path
NUMBERED = "__99"


def inbox_return_path(watch: Path, source_name: PurePosixPath, scan_id: int, attempt: int = 1) -> Path:
    """Where a failed scan's original goes back into the inbox (``medcli retry``): the name it arrived
    with, so a task folder routes it the same way; ``<stem>__retry<scan id>[_<n>]`` when the ``attempt``
    before found that name taken."""
    relative = PurePosixPath(*(part for part in source_name.parts if part not in ("", ".", "..", "/")))
    if attempt <= 1:
        return watch / relative
    number = "" if attempt == 2 else f"_{attempt - 1}"
    return watch / relative.parent / fitted(_stem(relative), f"__retry{scan_id}{number}{_suffix(relative)}")


def is_return_path(name: PurePosixPath, source_name: str, scan_id: int, attempts: int) -> bool:
    """Whether an inbox file named ``name`` (relative to the inbox) is one of the first ``attempts``
    names ``inbox_return_path`` gives the failed scan ``scan_id`` that arrived as ``source_name``."""
    root = Path("/")
    return any(
        inbox_return_path(root, PurePosixPath(source_name), scan_id, attempt) == root / name
        for attempt in range(1, attempts + 1)
    )


def place_new_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` as a new file (new inode, mtime now: no inbox claim's tombstone
    mistakes it for the file that left), written under a dot name and linked into place whole; never
    replaces a file already at ``target`` (``FileExistsError``). The copy keeps the source's read,
    write and execute bits, and its owner where this user may give it (root): made by ``medcli
    retry`` under another user's umask, it was that user's at 0640, and the daemon's next attempt
    failed as ``unreadable``. Set-user-ID and set-group-ID bits are never copied: a file dropped
    with them would come back owned by the retrying user (the daemon's), theirs to run as."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_beside(target, fitted(f".{target.name}", f".{os.getpid()}.retry"))
    try:
        shutil.copyfile(source, tmp)
        kept = os.stat(source)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, kept.st_uid, kept.st_gid)
        os.chmod(tmp, stat.S_IMODE(kept.st_mode) & 0o777)  # never set-user-ID: its owner may be another's
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: a rename, after a last look
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "a file already has the name", str(target)) from None
            os.rename(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _temporary_beside(target: Path, name: str) -> Path:
    """``name`` in ``target``'s folder, or in the nearest folder above it where the path fits: a file
    the inbox held within a few bytes of the longest path could not go back under its name (the
    temporary name beside it is longer)."""
    folder = target.parent
    while len(os.fsencode(str(folder / name))) >= PATH_MAX and folder.parent != folder:
        folder = folder.parent
    return folder / name


def reason_path(failed_file: Path) -> Path:
    return failed_file.with_name(failed_file.name + REASON_SUFFIX)


def write_reason(failed_file: Path, document: dict[str, object]) -> None:
    """The ``.reason.json`` beside a failed file, written whole or not at all."""
    target = reason_path(failed_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(fitted(f".{target.name}", ".tmp"))
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    os.replace(tmp, target)


def finish_move(
    source: Path, target: Path, alive: Callable[[], None] = lambda: None, read_as: AsRead | None = None
) -> MoveOutcome:
    """Make the file that was at ``source`` be at ``target``, however far an earlier attempt got.
    ``alive`` is called between the chunks of a copy to another file system (the daemon's watchdog
    and lease: a large file over NFS is a long copy). ``read_as``: the inbox file as it was read;
    other bytes at its name now (a file renamed over it since) are left where they are,
    ``REPLACED``, not filed under the hash of bytes they do not hold."""
    source_there = os.path.lexists(source)
    target_there = os.path.lexists(target)
    if target_there and not source_there:
        return MoveOutcome.ALREADY_DONE
    if not source_there:
        return MoveOutcome.LOST
    if read_as is not None and not target_there and not _still_as_read(source, read_as):
        return MoveOutcome.REPLACED
    if not target_there and source.is_dir() and not source.is_symlink():
        # a folder made at the name since (a restart's recovery knows the row only): its files are
        # arrivals of their own, never filed under the scan of the file it replaced
        return MoveOutcome.REPLACED
    if target_there:
        # a cross-device copy that completed its rename but not the unlink of its source
        if _same_bytes(source, target):
            _durable_on_its_file_system(target.parent)  # the killed daemon's rename may not be yet
            os.unlink(source)
            return MoveOutcome.ALREADY_DONE
        raise FileExistsError(errno.EEXIST, "a different file already has the target name", str(target))
    retries = 0
    while True:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            # another daemon finishing the same committed move (recovery) got there first
            if os.path.lexists(target) and not os.path.lexists(source):
                return MoveOutcome.ALREADY_DONE
            # or the target's shard was emptied and removed between the mkdir and the rename
            retries += 1
            if retries > SHARD_RACE_RETRIES or not os.path.lexists(source) or target.parent.is_dir():
                raise
            continue
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across_devices(source, target, alive)
        return MoveOutcome.MOVED


def _still_as_read(source: Path, read_as: AsRead) -> bool:
    """Whether ``source`` holds the bytes read: the same size, mtime and inode, or, where only its
    mtime or inode changed (touched, or the same bytes copied over it), the same SHA-256. A file
    that is not a regular one is not read to tell (a FIFO would never answer). One refused before
    its bytes were read (too large, unreadable: no SHA-256) is the same file while its size and
    inode are: touched, it is still the file that failed."""
    now = signature(source)
    if now == read_as.signature:
        return True
    if now is None or now.size != read_as.signature.size:
        return False
    if read_as.sha256 is None:
        return now.inode == read_as.signature.inode
    try:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            return False
        return file_sha256(source) == read_as.sha256
    except OSError:
        return False


def remove_emptied_shard(folder: Path, root: Path) -> bool:
    """Remove the shard ``folder`` (``work/<xx>/``, right below ``root``) once its last file has left.

    ``os.rmdir`` removes only an empty folder, so a file another writer put there meanwhile keeps it;
    a writer whose folder vanished between its mkdir and its rename makes it again (``finish_move``).
    """
    if folder.parent != root:
        return False
    try:
        os.rmdir(folder)
    except OSError:  # not empty, already gone
        return False
    return True


def _copy_across_devices(source: Path, target: Path, alive: Callable[[], None]) -> None:
    """A move to another file system: a copy beside ``target``, durable, renamed over it, its folders
    made durable, then the source unlinked. What the source is decides how, never what reading it gives: a link is made
    again, a FIFO, socket or device node too (``mknod``: a /dev/zero node was read until the state
    disk filled, a FIFO was refused at every rescan), and a regular file keeps its holes (a sparse
    10 GB file, nothing on disk, was copied as 10 GB of zeros). A copy the target's file system has
    no room for is not begun, and one that fails leaves nothing behind."""
    tmp = temporary_path(target)
    st = os.lstat(source)
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), tmp)
        elif stat.S_ISREG(st.st_mode):
            _require_room(source, target.parent, st)
            _copy_keeping_holes(source, tmp, st, alive)
        else:
            os.mknod(tmp, st.st_mode, st.st_rdev)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _durable_on_its_file_system(target.parent)  # before the source goes, on a file system of its own
    os.unlink(source)


def _durable_on_its_file_system(folder: Path) -> None:
    """The names in ``folder``, and each folder's own name in its parent up to the root of its file
    system, made durable: the copy of a file whose source is about to be unlinked elsewhere, in
    folders this move, a reason file or another writer may have just made (a folder fsync with
    nothing new in it costs next to nothing). A rename within one file system needs none of this:
    lost in a power cut, it leaves the source where it was."""
    device = folder.stat().st_dev
    while True:
        fsync_dir(folder, strict=True)
        parent = folder.parent
        if parent == folder or parent.stat().st_dev != device:
            return
        folder = parent


def remove_unfinished_copies(targets: Iterable[Path]) -> list[Path]:
    """The half-made copies that daemons of this host killed mid-copy left beside ``targets`` (each
    folder listed once): recovery makes the copy again under its own name, and the old one stayed."""
    removed: list[Path] = []
    for folder in dict.fromkeys(target.parent for target in targets):
        removed += remove_stale_temporaries(folder, recursive=False)
    return removed


def room_for_copies(folder: Path) -> int:
    """Bytes a copy into ``folder`` may take: its file system's free space less ``COPY_RESERVE``."""
    fs = os.statvfs(folder)
    return fs.f_bavail * fs.f_frsize - COPY_RESERVE


def _require_room(source: Path, folder: Path, st: os.stat_result) -> None:
    needed = st.st_blocks * 512  # what the file holds on disk: a sparse file's holes cost nothing
    room = room_for_copies(folder)
    if needed > room:
        raise OSError(
            errno.ENOSPC,
            f"{needed} bytes to copy, more than the {folder} file system has to spare: "
            f"{room + COPY_RESERVE} bytes free, of which {COPY_RESERVE} are kept for the database and reports",
            str(source),
        )


def _copy_keeping_holes(source: Path, tmp: Path, st: os.stat_result, alive: Callable[[], None]) -> None:
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        for start, end in _data_extents(src.fileno(), st.st_size):
            src.seek(start)
            dst.seek(start)
            left = end - start
            while left > 0:
                chunk = src.read(min(left, COPY_CHUNK))
                if not chunk:
                    break
                dst.write(chunk)
                left -= len(chunk)
                alive()
        dst.truncate(st.st_size)
        dst.flush()
        os.fsync(dst.fileno())
    shutil.copystat(source, tmp)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ``[start, end)`` ranges of ``fd`` that hold data (``SEEK_DATA``/``SEEK_HOLE``); the whole
    file where the file system cannot tell."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno != errno.EINVAL:
                raise
            yield position, size
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        position = end


def _same_bytes(a: Path, b: Path) -> bool:
    """Compared byte for byte: a same-sized different file must never cost the source its life."""
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    sa, sb = os.lstat(a), os.lstat(b)
    if not (stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode)):  # a FIFO is never opened: it would block
        return stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode) and sa.st_rdev == sb.st_rdev
    return filecmp.cmp(a, b, shallow=False)


def _suffix(name: PurePosixPath) -> str:
    return split_extension(name.name)[1]


def _stem(name: PurePosixPath) -> str:
    return split_extension(name.name)[0]


def overlay_path(heatmaps_dir: Path, sha256: str, version_id: int, label: str) -> Path:
    """``heatmaps/<sha[:2]>/<sha>/v<version id>_<label>.jpg``, a map's overlay: named by what it is, so
    a replay after a crash overwrites instead of adding. (Earlier versions kept the map beside it,
    ``.npy``; the map's grid is in its database row now.)"""
    return heatmaps_dir / sha256[:2] / sha256 / f"v{version_id}_{label_file_part(label)}.jpg"


def view_path(heatmaps_dir: Path, sha256: str, version_id: int) -> Path:
    """``heatmaps/<sha[:2]>/<sha>/v<version id>.view.jpg``: the scan as that version saw it, beside its
    heatmaps, for the report (which would otherwise decode the scan again). The dot keeps it apart
    from every label's files."""
    return heatmaps_dir / sha256[:2] / sha256 / f"v{version_id}.view.jpg"
