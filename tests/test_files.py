"""Files written whole: what a writer killed while writing leaves is recognisable, and removed only
when that writer is gone; a file written durably is in its folder for good, and each folder made
for it in its parent."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meddaemon.files import (
    HOST_TAG,
    final_path,
    make_folders,
    remove_stale_temporaries,
    temporary_path,
    write_atomically,
)


def test_temporaries_left_by_a_killed_writer_are_removed(tmp_path: Path):
    folder = tmp_path / "scans" / "ab"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = temporary_path(folder / "abcd.pdf").with_name(f".abcd.pdf.{HOST_TAG}-{dead.pid}.tmp")
    left.write_bytes(b"%PDF-1.4 half")
    kept = folder / "abcd.pdf"
    kept.write_bytes(b"%PDF-1.4 whole")
    assert remove_stale_temporaries(tmp_path) == [left]
    assert not left.exists() and kept.exists()
    assert final_path(left) == kept == final_path(temporary_path(kept))


def test_temporaries_of_live_writers_here_or_on_other_hosts_sharing_the_folder_stay(tmp_path: Path):
    folder = tmp_path / "studies"
    folder.mkdir()
    live_here = temporary_path(folder / "x.pdf")
    elsewhere = folder / ".y.pdf.otherhost-1.tmp"  # pid 1 there may be anything: not ours to judge
    for tmp in (live_here, elsewhere):
        tmp.write_bytes(b"%PDF-1.4 being written")
    assert len(remove_stale_temporaries(tmp_path)) == 0
    assert live_here.exists() and elsewhere.exists()


def test_without_recursion_only_the_folder_s_own_temporaries_are_looked_at(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    own = tmp_path / f".a.dcm.{HOST_TAG}-{dead.pid}.tmp"
    below = tmp_path / "sub" / f".b.dcm.{HOST_TAG}-{dead.pid}.tmp"
    below.parent.mkdir()
    for tmp in (own, below):
        tmp.write_bytes(b"DICM half")
    assert len(remove_stale_temporaries(tmp_path, recursive=False)) == 1
    assert not own.exists() and below.exists()
    assert len(remove_stale_temporaries(tmp_path / "missing")) == 0


def test_a_temporary_of_a_writer_killed_and_not_yet_reaped_is_removed(tmp_path: Path, zombie: int):
    """A container's init may reap a killed daemon's report process seconds late; the restarted
    daemon must not keep that writer's half-written PDF meanwhile."""
    left = tmp_path / f".abcd.pdf.{HOST_TAG}-{zombie}.tmp"
    left.write_bytes(b"%PDF-1.4 half")
    assert len(remove_stale_temporaries(tmp_path)) == 1 and not left.exists()


def test_a_temporary_whose_writer_s_pid_now_belongs_to_a_later_process_is_removed(tmp_path: Path, running_child: int):
    left = tmp_path / f".abcd.pdf.{HOST_TAG}-{running_child}.tmp"
    left.write_bytes(b"%PDF-1.4 half")
    hour_ago = time.time() - 3600
    os.utime(left, (hour_ago, hour_ago))  # written before that process started
    being_written = tmp_path / f".efgh.pdf.{HOST_TAG}-{running_child}.tmp"
    being_written.write_bytes(b"%PDF-1.4 being written")
    assert len(remove_stale_temporaries(tmp_path)) == 1
    assert not left.exists() and being_written.exists()


def fsynced_folders(monkeypatch: pytest.MonkeyPatch, fail_with: int | None = None) -> list[Path]:
    """Record each folder ``os.fsync`` is called on (failing them with ``fail_with``, injected: no
    real disk here fails on demand)."""
    seen: list[Path] = []
    real = os.fsync

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            if fail_with is not None:
                raise OSError(fail_with, os.strerror(fail_with) + " (injected)")
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_a_durable_file_in_new_folders_makes_each_new_folder_s_entry_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A power cut after the write returns keeps the file only if every folder on its way that did
    not exist before is in its parent for good: each parent is fsynced after its child is made."""
    folders = fsynced_folders(monkeypatch)
    write_atomically(tmp_path / "a" / "b" / "model.safetensors", b"synthetic", durable=True)
    assert folders == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    folders.clear()
    write_atomically(tmp_path / "a" / "b" / "MODEL_CARD.md", b"synthetic", durable=True)
    assert folders == [tmp_path / "a" / "b"]  # the folders were there: only the rename's own


def test_a_file_not_asked_to_be_durable_fsyncs_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folders = fsynced_folders(monkeypatch)
    write_atomically(tmp_path / "heatmaps" / "ab" / "map.npy", b"synthetic")
    assert folders == [] and (tmp_path / "heatmaps" / "ab" / "map.npy").read_bytes() == b"synthetic"


def test_a_new_folder_whose_parent_cannot_be_fsynced_raises_unless_the_filesystem_cannot_fsync_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fsynced_folders(monkeypatch, fail_with=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        make_folders(tmp_path / "studies" / "0123", durable=True)
    fsynced_folders(monkeypatch, fail_with=errno.EINVAL)
    make_folders(tmp_path / "studies" / "4567", durable=True)
    assert (tmp_path / "studies" / "4567").is_dir()


def test_a_file_where_a_folder_is_to_be_made_is_named_as_no_folder(tmp_path: Path):
    """``mkdir`` said "File exists", naming neither the file nor that it is no folder: ``medcli synth
    --out /etc/passwd/x`` printed "cannot write /etc/passwd/x: File exists"."""
    (tmp_path / "notes").write_text("SYNTHETIC")
    with pytest.raises(NotADirectoryError) as raised:
        make_folders(tmp_path / "notes" / "reports" / "2026")
    assert raised.value.strerror == f"{tmp_path / 'notes'} is a file, not a folder"
    assert raised.value.filename == str(tmp_path / "notes")


@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_a_link_that_leads_to_no_folder_is_named_so_not_as_a_file(tmp_path: Path, link: str):
    """A loop of links in an --out path was said to be "a file, not a folder"."""
    if link == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
    else:
        (tmp_path / "a").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError) as raised:
        make_folders(tmp_path / "a" / "reports")
    assert (
        raised.value.strerror
        == f"{tmp_path / 'a'} is a link that leads to no folder (to nothing, or round a loop of links)"
    )
