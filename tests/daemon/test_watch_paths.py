"""One file, one spelling: however ``--watch`` names the inbox (relative, absolute, through a
symlink), the scan, the watcher, the stability tracker and the inbox claims key every file on the
same canonical path, so no file is read twice (issue 12, fault 1).

Every file written here is SYNTHETIC (``synthetic_*`` names, pixels from a seeded generator).
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from daemon_harness import TASK, Daemons, Layout, drop, synthetic_png, wait_until
from meddaemon.daemon.inbox import Inbox

FILES = 100


def rows(db: Path, sql: str) -> list[tuple]:
    try:
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # no database or schema yet
        return []


def test_a_file_named_through_a_symlinked_folder_has_the_inbox_spelling(tmp_path: Path):
    (tmp_path / "real" / TASK).mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    inbox = Inbox(tmp_path / "link", ignore=())
    real = (tmp_path / "real").resolve()
    assert inbox.canonical(tmp_path / "link" / TASK / "a.png") == real / TASK / "a.png"
    assert inbox.canonical(real / TASK / "a.png") == real / TASK / "a.png"
    assert inbox.canonical(tmp_path / "elsewhere.png") is None


@pytest.mark.parametrize("spelling", ["relative", "absolute", "symlinked"])
def test_every_file_is_recorded_once_whatever_the_watch_path_spelling(spelling: str, layout: Layout, daemons: Daemons):
    (layout.root / "link").symlink_to(layout.inbox, target_is_directory=True)
    watch = {"relative": "inbox", "absolute": str(layout.inbox), "symlinked": "link"}[spelling]
    writer_inbox = layout.root / "link" if spelling == "symlinked" else layout.inbox
    # rescans every 0.2 s, well inside the 0.5 s stability window: each file is seen by the watcher
    # and by several rescans before it is read
    daemon = daemons.start(watch=watch, stable=0.5, rescan=0.2)
    daemon.wait_ready()
    source = layout.root / "source"
    for i in range(FILES):
        drop(writer_inbox / TASK, f"synthetic_{i:03d}.png", synthetic_png(source, i), rename=i % 2 == 0)

    def settled() -> bool:
        pending = rows(layout.db, "SELECT count(*) FROM scans WHERE pending_move_from IS NOT NULL")
        return len(rows(layout.db, "SELECT id FROM scans")) >= FILES and pending == [(0,)]

    wait_until(settled, 60, f"{FILES} scans", daemon)
    time.sleep(1.0)  # five more rescans: none may find a file a second time
    scans = rows(layout.db, "SELECT source_name, state, sha256 FROM scans")
    assert len(scans) == FILES
    assert {state for _, state, _ in scans} == {"waiting_model"} and all(sha for _, _, sha in scans)
    assert rows(layout.db, "SELECT count(*) FROM duplicate_arrivals") == [(0,)]
    assert " ERROR " not in daemon.log_text()
    assert layout.inbox_files() == [] and len(layout.stored_files()) == FILES
