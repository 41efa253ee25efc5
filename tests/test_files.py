"""Files written whole: what a writer killed while writing leaves is recognisable, and removed only
when that writer is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from meddaemon.files import HOST_TAG, remove_stale_temporaries, temporary_path


def test_temporaries_left_by_a_killed_writer_are_removed(tmp_path: Path):
    folder = tmp_path / "scans" / "ab"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = temporary_path(folder / "abcd.pdf").with_name(f".abcd.pdf.{HOST_TAG}-{dead.pid}.tmp")
    left.write_bytes(b"%PDF-1.4 half")
    kept = folder / "abcd.pdf"
    kept.write_bytes(b"%PDF-1.4 whole")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not left.exists() and kept.exists()


def test_temporaries_of_live_writers_here_or_on_other_hosts_sharing_the_folder_stay(tmp_path: Path):
    folder = tmp_path / "studies"
    folder.mkdir()
    live_here = temporary_path(folder / "x.pdf")
    elsewhere = folder / ".y.pdf.otherhost-1.tmp"  # pid 1 there may be anything: not ours to judge
    for tmp in (live_here, elsewhere):
        tmp.write_bytes(b"%PDF-1.4 being written")
    assert remove_stale_temporaries(tmp_path) == 0
    assert live_here.exists() and elsewhere.exists()


def test_without_recursion_only_the_folder_s_own_temporaries_are_looked_at(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    own = tmp_path / f".a.dcm.{HOST_TAG}-{dead.pid}.tmp"
    below = tmp_path / "sub" / f".b.dcm.{HOST_TAG}-{dead.pid}.tmp"
    below.parent.mkdir()
    for tmp in (own, below):
        tmp.write_bytes(b"DICM half")
    assert remove_stale_temporaries(tmp_path, recursive=False) == 1
    assert not own.exists() and below.exists()
    assert remove_stale_temporaries(tmp_path / "missing") == 0


def test_a_temporary_of_a_writer_killed_and_not_yet_reaped_is_removed(tmp_path: Path, zombie: int):
    """A container's init may reap a killed daemon's report process seconds late; the restarted
    daemon must not keep that writer's half-written PDF meanwhile."""
    left = tmp_path / f".abcd.pdf.{HOST_TAG}-{zombie}.tmp"
    left.write_bytes(b"%PDF-1.4 half")
    assert remove_stale_temporaries(tmp_path) == 1 and not left.exists()


def test_a_temporary_whose_writer_s_pid_now_belongs_to_a_later_process_is_removed(tmp_path: Path, running_child: int):
    left = tmp_path / f".abcd.pdf.{HOST_TAG}-{running_child}.tmp"
    left.write_bytes(b"%PDF-1.4 half")
    hour_ago = time.time() - 3600
    os.utime(left, (hour_ago, hour_ago))  # written before that process started
    being_written = tmp_path / f".efgh.pdf.{HOST_TAG}-{running_child}.tmp"
    being_written.write_bytes(b"%PDF-1.4 being written")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not left.exists() and being_written.exists()
