"""Moves that recovery can repeat: every partial state of a move ends with the file at its target."""

import errno
import json
import os
import stat
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath

import pytest

from meddaemon.daemon import filing
from meddaemon.daemon.filing import MoveOutcome, finish_move
from meddaemon.names import NAME_MAX


def test_a_move_puts_the_file_at_the_target_creating_folders(tmp_path: Path):
    src = tmp_path / "inbox" / "a.png"
    src.parent.mkdir()
    src.write_bytes(b"synthetic")
    target = tmp_path / "state" / "work" / "ab" / "a.png"
    assert finish_move(src, target) is MoveOutcome.MOVED
    assert target.read_bytes() == b"synthetic" and not src.exists()


def test_repeating_a_finished_move_changes_nothing(tmp_path: Path):
    target = tmp_path / "t.png"
    target.write_bytes(b"synthetic")
    assert finish_move(tmp_path / "gone.png", target) is MoveOutcome.ALREADY_DONE
    assert target.read_bytes() == b"synthetic"


def test_a_file_at_neither_end_is_reported_lost(tmp_path: Path):
    assert finish_move(tmp_path / "a", tmp_path / "b") is MoveOutcome.LOST


def test_a_different_file_at_the_target_is_never_overwritten(tmp_path: Path):
    (tmp_path / "src").write_bytes(b"one")
    (tmp_path / "dst").write_bytes(b"other bytes")
    with pytest.raises(FileExistsError):
        finish_move(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == b"other bytes" and (tmp_path / "src").exists()


def test_a_file_renamed_over_the_one_read_is_left_where_it_is_not_moved_in_its_place(tmp_path: Path):
    """The move took whatever was at the name: a file renamed over it after it was read was filed
    under the hash of the bytes read before, and never registered itself."""
    import hashlib

    from meddaemon.daemon.stability import signature

    source = tmp_path / "inbox" / "scan.png"
    source.parent.mkdir()
    source.write_bytes(b"synthetic A")
    read_as = filing.AsRead(signature(source), hashlib.sha256(b"synthetic A").hexdigest())
    (tmp_path / "inbox" / ".new").write_bytes(b"synthetic B")
    os.rename(tmp_path / "inbox" / ".new", source)
    target = tmp_path / "work" / "a.png"
    assert finish_move(source, target, read_as=read_as) is MoveOutcome.REPLACED
    assert source.read_bytes() == b"synthetic B" and not target.exists()
    assert finish_move(source, target, read_as=filing.AsRead(signature(source))) is MoveOutcome.MOVED


def test_the_same_bytes_touched_or_copied_over_the_file_read_are_moved(tmp_path: Path):
    """A new mtime or inode alone is no other file: a producer that touched the file, or copied the
    same bytes over it, while its move waited had it left in the inbox, its scan without a copy."""
    import hashlib

    from meddaemon.daemon.stability import signature

    source = tmp_path / "inbox" / "scan.png"
    source.parent.mkdir()
    source.write_bytes(b"synthetic A")
    read_as = filing.AsRead(signature(source), hashlib.sha256(b"synthetic A").hexdigest())
    os.utime(source, ns=(0, 10**18))
    (tmp_path / "inbox" / ".again").write_bytes(b"synthetic A")
    os.rename(tmp_path / "inbox" / ".again", source)
    assert signature(source) != read_as.signature
    assert finish_move(source, tmp_path / "work" / "a.png", read_as=read_as) is MoveOutcome.MOVED
    unread = tmp_path / "inbox" / "too_large.dcm"  # refused before its bytes were read: no SHA-256
    unread.write_bytes(b"synthetic C")
    read_as = filing.AsRead(signature(unread))
    os.utime(unread, ns=(0, 10**18))
    assert finish_move(unread, tmp_path / "failed" / "too_large.dcm", read_as=read_as) is MoveOutcome.MOVED


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (tmpfs at /dev/shm)")
def test_a_move_across_filesystems_copies_then_removes_the_source(tmp_path: Path):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = Path(other) / "scan.dcm"
        src.write_bytes(b"synthetic" * 1000)
        target = tmp_path / "archive" / "scan.dcm"
        assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
        assert finish_move(src, target) is MoveOutcome.MOVED
        assert target.read_bytes() == b"synthetic" * 1000 and not src.exists()
        assert not list(target.parent.glob(".*.tmp"))


SECOND_FILESYSTEM = pytest.mark.skipif(
    not Path("/dev/shm").is_dir(), reason="needs a second filesystem (tmpfs at /dev/shm)"
)


def test_a_numbered_folder_of_a_name_already_at_its_longest_is_cut_to_fit(tmp_path: Path):
    """A folder of 255 bytes, numbered ``__2`` because a file took its name earlier that day, was 258
    bytes: ``File name too long`` inside the commit, and the daemon exited at every start."""
    folder = "synthetic_" + "x" * (NAME_MAX - len("synthetic_"))
    day = datetime(2026, 12, 7)
    (tmp_path / "2026-12-07").mkdir()
    (tmp_path / "2026-12-07" / folder).write_bytes(b"SYNTHETIC")
    target = filing.archive_path(tmp_path, PurePosixPath(folder) / "scan.png", "ab" * 32, day)
    assert target.parent.name.endswith("x__2") and len(os.fsencode(target.parent.name)) == NAME_MAX
    target.parent.mkdir()
    target.write_bytes(b"SYNTHETIC")


def test_a_file_too_deep_for_the_archive_or_failed_is_filed_with_its_deepest_folders_joined(tmp_path: Path):
    """16 folders of 250 bytes fit in the inbox (4,089 bytes to the file) but not under
    ``archive/<day>/`` nor ``failed/``: the move raised ``File name too long`` inside the commit.
    The folders that fit are kept, the rest joined into one name, and the file, its reason and the
    temporary copy a move makes beside it all fit."""
    parts = [f"{n:02d}" + "d" * 248 for n in range(16)]
    source = PurePosixPath(*parts, "synthetic.png")
    assert len(os.fsencode(str(source))) < filing.PATH_MAX
    day = datetime(2026, 12, 7)
    archived = filing.archive_path(tmp_path / "archive", source, "ab" * 32, day)
    failed = filing.failed_path(tmp_path / "failed", source, set())
    for target in (archived, failed):
        folders = target.relative_to(tmp_path).parts[:-1]
        assert all(len(os.fsencode(part)) <= NAME_MAX for part in folders)
        assert len(os.fsencode(str(target.parent))) + 1 + NAME_MAX < filing.PATH_MAX
        kept = len(folders) - (3 if target is archived else 2)  # below archive/<day>/ or failed/
        assert list(folders[-1 - kept : -1]) == parts[:kept] and folders[-1].startswith(parts[kept])
        assert target.name == "synthetic.png"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"SYNTHETIC")
        filing.write_reason(target, {"synthetic": True})


def deep_folder(base: Path, length: int) -> Path:
    """A folder under ``base`` whose path is ``length`` bytes, made of folders of at most 250 bytes."""
    folder = base
    while len(os.fsencode(str(folder))) + 1 + 250 < length:
        folder = folder / f"{len(folder.parts):02d}{'d' * 248}"
    return folder / ("e" * (length - len(os.fsencode(str(folder))) - 1))


def test_a_folder_numbered_near_the_longest_path_still_leaves_room_for_the_file_and_its_reason(tmp_path: Path):
    """The room of a path was measured with the folders as named: numbered ``__2`` (a file took the
    first folder's name), a path within 3 bytes of the limit was past it, and the daemon exited."""
    failed = tmp_path / "failed"
    failed.mkdir()
    first = "p" * 243
    (failed / first).write_bytes(b"SYNTHETIC")  # an earlier failed file of that name
    for end in range(filing.PATH_MAX - 1 - NAME_MAX - 8, filing.PATH_MAX - NAME_MAX + 8):
        inbox = tmp_path / "inbox"
        folder = deep_folder(inbox / first, end - len(os.fsencode(str(failed))) + len(os.fsencode(str(inbox))))
        source = PurePosixPath(folder.relative_to(inbox).as_posix()) / ("n" * 239 + ".png")
        target = filing.failed_path(failed, source, set())
        assert target.relative_to(failed).parts[0].startswith(f"{first}__2")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"SYNTHETIC")
        filing.write_reason(target, {"synthetic": True})


def test_a_file_within_a_few_bytes_of_the_longest_path_goes_back_under_its_name(tmp_path: Path):
    """``medcli retry`` sends a failed file back to the inbox under the name it arrived with: its
    temporary copy, named longer beside it, was past the longest path ("cannot write into the inbox")."""
    source = tmp_path / "kept.png"
    source.write_bytes(b"SYNTHETIC")
    folder = deep_folder(tmp_path / "inbox", filing.PATH_MAX - 1 - len("/y.png"))
    target = folder / "y.png"
    assert len(os.fsencode(str(target))) == filing.PATH_MAX - 1
    filing.place_new_file(source, target)
    assert target.read_bytes() == b"SYNTHETIC"
    assert sorted(p.name for p in target.parent.iterdir()) == ["y.png"]
    assert not [p for p in (tmp_path / "inbox").rglob(".*")]


@SECOND_FILESYSTEM
@pytest.mark.parametrize("kind", ["fifo", "socket", "character device"])
def test_a_special_file_moved_across_filesystems_is_made_again_not_read(tmp_path: Path, kind: str):
    """A FIFO was refused at every rescan ("is a named pipe"), and a /dev/zero node dropped in the
    inbox was read until the state disk was full."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = Path(other) / "special.png"
        if kind == "fifo":
            os.mkfifo(src)
        elif kind == "socket":
            os.mknod(src, stat.S_IFSOCK | 0o600)
        else:
            try:
                os.mknod(src, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
            except PermissionError:
                pytest.skip("making a device node needs root")
        made = os.lstat(src)
        target = tmp_path / "failed" / "busi" / "special.png"
        assert finish_move(src, target) is MoveOutcome.MOVED
        kept = os.lstat(target)
        assert (stat.S_IFMT(kept.st_mode), kept.st_rdev) == (stat.S_IFMT(made.st_mode), made.st_rdev)
        assert not os.path.lexists(src) and not list(target.parent.glob(".*.tmp"))
        if kind == "fifo":  # the copy made, its source not yet unlinked: the two are compared, never opened
            os.mkfifo(src)
            assert finish_move(src, target) is MoveOutcome.ALREADY_DONE and not os.path.lexists(src)


@SECOND_FILESYSTEM
def test_a_sparse_file_moved_across_filesystems_keeps_its_holes(tmp_path: Path):
    """A sparse 10 GB file (nothing on disk, refused too_large unread) was copied as 10 GB of zeros."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = Path(other) / "sparse.png"
        with open(src, "wb") as handle:
            handle.write(b"synthetic head")
            handle.seek(2**30)
            handle.write(b"synthetic tail")
        target = tmp_path / "failed" / "sparse.png"
        assert finish_move(src, target) is MoveOutcome.MOVED
        assert target.stat().st_size == 2**30 + len(b"synthetic tail")
        assert target.stat().st_blocks * 512 < 2**20  # the gigabyte between stays a hole
        with open(target, "rb") as handle:
            assert handle.read(14) == b"synthetic head"
            handle.seek(2**30)
            assert handle.read() == b"synthetic tail"


@SECOND_FILESYSTEM
def test_a_copy_the_target_has_no_room_for_is_not_begun_and_leaves_the_source(tmp_path: Path, monkeypatch):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = Path(other) / "large.png"
        src.write_bytes(b"synthetic" * 100_000)
        monkeypatch.setattr(filing, "room_for_copies", lambda folder: 1000)  # a file system all but full
        target = tmp_path / "failed" / "large.png"
        with pytest.raises(OSError) as refused:
            finish_move(src, target)
        assert refused.value.errno == errno.ENOSPC
        assert src.read_bytes() == b"synthetic" * 100_000
        assert not target.exists() and not list(target.parent.glob(".*"))


def test_a_cross_device_copy_interrupted_before_the_unlink_is_finished(tmp_path: Path):
    (tmp_path / "src").write_bytes(b"same")
    (tmp_path / "dst").write_bytes(b"same")
    assert finish_move(tmp_path / "src", tmp_path / "dst") is MoveOutcome.ALREADY_DONE
    assert not (tmp_path / "src").exists()


def test_failed_names_keep_the_folder_and_are_numbered_on_collision(tmp_path: Path):
    taken: set[Path] = set()
    first = filing.failed_path(tmp_path, PurePosixPath("busi/bad scan.png"), taken)
    second = filing.failed_path(tmp_path, PurePosixPath("busi/bad scan.png"), taken)
    assert first == tmp_path / "busi" / "bad scan.png"
    assert second == tmp_path / "busi" / "bad scan__2.png"


def test_a_failed_file_never_takes_the_name_of_a_reason_document(tmp_path: Path):
    """``x.png``'s reason is ``x.png.reason.json``: a file of that name (a failed/ folder copied
    back into the inbox brings one) is numbered, whichever of the two is filed first."""
    taken: set[Path] = set()
    scan = filing.failed_path(tmp_path, PurePosixPath("busi/x.png"), taken)
    document = filing.failed_path(tmp_path, PurePosixPath("busi/x.png.reason.json"), taken)
    assert scan == tmp_path / "busi" / "x.png" and document == tmp_path / "busi" / "x.png.reason__2.json"
    assert filing.failed_path(tmp_path, PurePosixPath("busi/y.png.reason.json"), set()).name == "y.png.reason__2.json"


#: a name of 250 bytes, as long as a file system allows but for five: the characters of two bytes
#: each ("é") show that a name is never cut inside a character
LONG = "é" * 123 + ".png"


def test_a_long_failed_name_is_cut_to_leave_room_for_its_reason(tmp_path: Path):
    """Received at 250 bytes, the file could never be filed: its reason's name was too long."""
    taken: set[Path] = set()
    for n in (1, 2):
        target = filing.failed_path(tmp_path, PurePosixPath("busi") / LONG, taken)
        target.parent.mkdir(parents=True, exist_ok=True)
        filing.write_reason(target, {"synthetic": True})
        target.write_bytes(b"")
        assert target.name.endswith(f"é{'__2' if n == 2 else ''}.png")
        assert len(filing.reason_path(target).name.encode()) <= NAME_MAX


def test_a_long_name_disambiguated_in_the_archive_still_fits(tmp_path: Path):
    day = datetime(2026, 11, 22)
    first = filing.archive_path(tmp_path, PurePosixPath(LONG), "1" * 64, day)
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    second = filing.archive_path(tmp_path, PurePosixPath(LONG), "2" * 64, day)
    assert second.name.endswith("é__222222222222.png") and len(second.name.encode()) <= NAME_MAX
    second.write_bytes(b"y")


def test_work_names_are_content_addressed_and_keep_a_real_extension_only():
    sha = "ab" + "0" * 62
    assert filing.work_path(Path("/w"), sha, PurePosixPath("x/y.dcm")) == Path(f"/w/ab/{sha}.dcm")
    assert filing.work_path(Path("/w"), sha, PurePosixPath("1.2.840.113619.2")) == Path(f"/w/ab/{sha}")


def test_archive_names_are_dated_and_disambiguated_by_hash(tmp_path: Path):
    day = datetime(2026, 11, 22)
    first = filing.archive_path(tmp_path, PurePosixPath("a.png"), "1" * 64, day)
    assert first == tmp_path / "2026-11-22" / "a.png"
    first.parent.mkdir(parents=True)
    first.write_bytes(b"x")
    assert filing.archive_path(tmp_path, PurePosixPath("a.png"), "2" * 64, day).name == "a__222222222222.png"


def test_the_same_bytes_under_one_name_a_third_time_in_a_day_get_a_file_of_their_own(tmp_path: Path):
    """The third took the second's name: its file was unlinked as "already there" and its row named
    the second's file (two files for three arrivals)."""
    day = datetime(2026, 12, 6)
    kept = []
    for _arrival in range(3):
        target = filing.archive_path(tmp_path, PurePosixPath("busi/dup.png"), "8c" * 32, day)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"synthetic")
        kept.append(target.name)
    assert kept == ["dup.png", "dup__8c8c8c8c8c8c.png", "dup__8c8c8c8c8c8c__2.png"]
    taken: set[Path] = set()
    in_one_batch = [filing.archive_path(tmp_path, PurePosixPath("busi/dup.png"), "8c" * 32, day, taken) for _ in "ab"]
    assert [t.name for t in in_one_batch] == ["dup__8c8c8c8c8c8c__3.png", "dup__8c8c8c8c8c8c__4.png"]


def test_the_reason_file_is_complete_json(tmp_path: Path):
    failed = tmp_path / "failed" / "x.dcm"
    filing.write_reason(failed, {"reason": "truncated_pixel_data", "message": "cut"})
    document = json.loads((tmp_path / "failed" / "x.dcm.reason.json").read_text())
    assert document == {"reason": "truncated_pixel_data", "message": "cut"}
    assert [p.name for p in failed.parent.iterdir()] == ["x.dcm.reason.json"]


def test_an_emptied_work_shard_is_removed_and_a_shard_still_holding_files_is_kept(tmp_path: Path):
    work = tmp_path / "work"
    (work / "ab").mkdir(parents=True)
    (work / "cd").mkdir()
    (work / "cd" / "cd12.png").write_bytes(b"x")
    assert filing.remove_emptied_shard(work / "ab", work) and not (work / "ab").exists()
    assert not filing.remove_emptied_shard(work / "cd", work) and (work / "cd" / "cd12.png").exists()
    assert not filing.remove_emptied_shard(work, tmp_path) and work.is_dir()  # only shards right below the root


def test_a_move_into_a_shard_removed_between_its_mkdir_and_its_rename_makes_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = tmp_path / "inbox" / "a.png"
    source.parent.mkdir()
    source.write_bytes(b"scan")
    target = tmp_path / "work" / "ab" / "ab12.png"
    rename = os.rename
    raced: list[Path] = []

    def rename_after_another_daemon_emptied_the_shard(src: object, dst: object) -> None:
        if not raced:
            raced.append(target.parent)
            filing.remove_emptied_shard(target.parent, target.parent.parent)
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename_after_another_daemon_emptied_the_shard)
    assert finish_move(source, target) is MoveOutcome.MOVED
    assert raced and target.read_bytes() == b"scan" and not source.exists()


def test_a_folder_of_the_target_that_is_a_file_there_or_taken_is_numbered(tmp_path: Path):
    """failed/scanA (a file kept before) cannot hold failed/scanA/x.png, nor can archive/<day>/a.png
    hold a.png/y.png: the move failed at every try and the file stayed in the inbox."""
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "scanA").write_bytes(b"SYNTHETIC")
    assert filing.failed_path(failed, PurePosixPath("scanA/x.png"), set()) == failed / "scanA__2" / "x.png"
    taken = {failed / "scanB"}  # another row of the same transaction files a file there
    assert filing.failed_path(failed, PurePosixPath("scanB/y.png"), taken) == failed / "scanB__2" / "y.png"
    day = datetime(2026, 12, 5)
    (tmp_path / "archive" / "2026-12-05").mkdir(parents=True)
    (tmp_path / "archive" / "2026-12-05" / "a.png").write_bytes(b"SYNTHETIC")
    target = filing.archive_path(tmp_path / "archive", PurePosixPath("a.png/y.png"), "ab" * 32, day)
    assert target == tmp_path / "archive" / "2026-12-05" / "a.png__2" / "y.png"


@SECOND_FILESYSTEM
def test_a_long_copy_across_filesystems_says_it_is_alive_as_it_goes(tmp_path: Path):
    """One large file over NFS is a long copy: the daemon's watchdog and lease hear from it meanwhile."""
    calls: list[int] = []
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = Path(other) / "large.dcm"
        src.write_bytes(os.urandom(3 * 2**20 + 5))  # SYNTHETIC bytes
        target = tmp_path / "archive" / "large.dcm"
        assert finish_move(src, target, alive=lambda: calls.append(1)) is MoveOutcome.MOVED
    assert len(calls) >= 3 and target.stat().st_size == 3 * 2**20 + 5


def test_recovery_removes_the_half_made_copy_a_killed_daemon_left_and_keeps_a_live_one_s(tmp_path: Path):
    """A daemon killed mid-copy left its temporary; recovery made the copy again under its own name,
    and the old one (up to the file's size) stayed for good."""
    import subprocess
    import sys

    from meddaemon.files import HOST_TAG

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    folder = tmp_path / "archive" / "2026-12-05" / "busi"
    folder.mkdir(parents=True)
    left = folder / f".scan.dcm.{HOST_TAG}-{dead_pid}.tmp"
    left.write_bytes(b"synthetic half")
    live = folder / f".other.dcm.{HOST_TAG}-{os.getpid()}.tmp"
    live.write_bytes(b"synthetic, being written")
    assert filing.remove_unfinished_copies([folder / "scan.dcm", folder / "other.dcm"]) == [left]
    assert not left.exists() and live.exists()


def recording_folder_fsyncs_and_unlinks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    from meddaemon import files

    calls: list[tuple[str, Path]] = []
    real_fsync_dir, real_unlink = files.fsync_dir, os.unlink

    def fsync_dir(path: Path, strict: bool = False) -> None:
        calls.append(("fsync", Path(path)))
        real_fsync_dir(path, strict)

    def unlink(path: Path, *args: object, **kwargs: object) -> None:
        calls.append(("unlink", Path(path)))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(filing, "fsync_dir", fsync_dir, raising=False)
    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    monkeypatch.setattr(filing.os, "unlink", unlink)
    return calls


@SECOND_FILESYSTEM
@pytest.mark.parametrize("to", ["work/ab/scan.png", "failed/busi/study/scan.png"])
def test_a_copy_across_filesystems_is_made_durable_in_its_folders_before_its_source_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to: str
):
    """The copy's rename, and the folders made for it (by the move, or by the reason file written
    before a failed file's move), were never fsynced before the source was unlinked on its own file
    system: a power cut could leave the file in neither."""
    calls = recording_folder_fsyncs_and_unlinks(monkeypatch)
    target = tmp_path / to
    if to.startswith("failed/"):
        filing.write_reason(target, {"reason": "corrupt_image"})
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = Path(other) / "scan.png"
        src.write_bytes(b"SYNTHETIC" * 100)
        assert finish_move(src, target) is MoveOutcome.MOVED
        removed = calls.index(("unlink", src))
    made_durable = {path for what, path in calls[:removed] if what == "fsync"}
    every_folder_of_it = {folder for folder in target.parents if folder.is_relative_to(tmp_path)}
    assert every_folder_of_it <= made_durable, sorted(every_folder_of_it - made_durable)


def test_a_rename_within_one_file_system_fsyncs_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Lost in a power cut, a rename leaves the source where it was: a folder fsync for each file
    (its shard made anew) was a cost with nothing to show for it."""
    calls = recording_folder_fsyncs_and_unlinks(monkeypatch)
    src = tmp_path / "inbox" / "scan.png"
    src.parent.mkdir()
    src.write_bytes(b"SYNTHETIC")
    assert finish_move(src, tmp_path / "work" / "ab" / "scan.png") is MoveOutcome.MOVED
    assert calls == []
