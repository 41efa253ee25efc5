"""The DB is the journal: a move committed but not carried out (a crash between the two) is finished
by the next start, and nothing is read twice. The start itself waits out a lock or an outage."""

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from dicom_factory import write_png
from sqlalchemy import func, select

from daemon_harness import SQLITE_LOCKER
from meddaemon.daemon import bookkeeper
from meddaemon.daemon.intake import read_file
from meddaemon.daemon.service import Daemon
from meddaemon.daemon.stability import StableFile, signature
from meddaemon.db.engine import transaction
from meddaemon.db.models import DuplicateArrival, Scan, utcnow
from pg_proxy import pg_proxy


def commit_without_moving(daemon: Daemon, paths: list[Path]) -> bookkeeper.BatchRecord:
    """What a daemon killed right after its commit leaves behind."""
    batch = []
    for path in paths:
        stable = StableFile(path, signature(path), utcnow(), utcnow())
        name = daemon.inbox.relative_name(path)
        batch.append((stable, name, read_file(path, name, stable.signature, daemon.intake_context())))
    with transaction(daemon.sessions) as session:
        return bookkeeper.record_batch(session, batch, daemon.destinations, served_tasks=set())


def moves_fail_for_want_of_room(monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """The next ``times`` moves fail with ENOSPC (injected: no disk here fills on demand), then move."""
    import errno

    from meddaemon.daemon import filing

    real_move, failures = filing.finish_move, iter(range(times))

    def full_disk(source, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        if next(failures, None) is not None:
            raise OSError(errno.ENOSPC, "SYNTHETIC: no room", str(source))
        return real_move(source, target, *args, **kwargs)

    monkeypatch.setattr(filing, "finish_move", full_disk)


def test_a_restart_finishes_committed_moves_and_reads_nothing_twice(make_settings, tmp_path: Path):
    inbox = tmp_path / "inbox" / "busi"
    good = write_png(inbox / "synthetic_a.png", np.full((16, 16), 7, np.uint8))
    copy = inbox / "synthetic_copy.png"
    copy.write_bytes(good.read_bytes())
    bad = inbox / "synthetic_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    settings = make_settings()
    crashed = Daemon(settings)
    crashed.prepare()
    record = commit_without_moving(crashed, [good, copy, bad])
    assert len(record.moves) == 3 and all(p.exists() for p in (good, copy, bad))

    restarted = Daemon(settings)
    restarted.run(once=True)

    assert not any(p.exists() for p in (good, copy, bad))
    with restarted.sessions() as session:
        scans = session.scalars(select(Scan)).all()
        assert sorted(s.source_name for s in scans) == ["busi/synthetic_a.png", "busi/synthetic_bad.png"]
        assert session.scalar(select(func.count()).select_from(DuplicateArrival)) == 1
        assert all(s.pending_move_from is None and settings.stored_file(s.stored_path).exists() for s in scans)
    assert (settings.failed_dir / "busi" / "synthetic_bad.png.reason.json").exists()


def test_a_batch_recorded_again_after_a_commit_whose_answer_never_came_is_the_same_scans_not_duplicates(
    make_settings, tmp_path: Path
):
    """A commit can reach the server and its answer not the daemon (the connection lost, or a server
    that did not answer in time): the transaction is run again and found its own scan, and filed the
    file as a duplicate of itself: the scan pointed at a file in work/ that never came."""
    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_once.png", np.zeros((8, 8), np.uint8))
    daemon = Daemon(make_settings())
    daemon.prepare()
    first = commit_without_moving(daemon, [path])  # committed, its answer lost
    again = commit_without_moving(daemon, [path])  # the transaction run again

    assert [(m.kind, m.row_id, m.source, m.target) for m in again.moves] == [
        (m.kind, m.row_id, m.source, m.target) for m in first.moves
    ]
    assert [(o.state, o.scan_id) for o in again.outcomes] == [(o.state, o.scan_id) for o in first.outcomes]
    daemon.run(once=True)
    with daemon.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DuplicateArrival)) == 0
        [scan] = session.scalars(select(Scan)).all()
    assert scan.pending_move_from is None and daemon.settings.stored_file(scan.stored_path).is_file()
    assert not path.exists()


def test_a_move_already_done_before_the_crash_is_only_marked_done(make_settings, tmp_path: Path):
    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_b.png", np.zeros((8, 8), np.uint8))
    settings = make_settings()
    crashed = Daemon(settings)
    crashed.prepare()
    [move] = commit_without_moving(crashed, [path]).moves
    move.target.parent.mkdir(parents=True)
    path.rename(move.target)

    restarted = Daemon(settings)
    restarted.run(once=True)

    with restarted.sessions() as session:
        [scan] = session.scalars(select(Scan)).all()
    assert scan.pending_move_from is None and settings.stored_file(scan.stored_path).exists()
    assert scan.source_name == str(PurePosixPath("busi/synthetic_b.png"))


def test_a_lock_taken_between_registration_and_recovery_is_waited_out(
    make_settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Another process takes SQLite's write lock just after the daemon registered and before its
    stages recover (the models stage reads the active versions first), for longer than the busy
    timeout: the start waits for it instead of ending with "database is locked"."""
    settings = make_settings(busy_timeout=0.2, reports=False)
    daemon = Daemon(settings)
    registered = daemon.prepare
    lockers: list[subprocess.Popen[bytes]] = []

    def prepare_then_lock() -> None:
        registered()
        database = str(settings.state_dir / "meddaemon.db")
        locker = subprocess.Popen([sys.executable, "-c", SQLITE_LOCKER, database, "1.5"], stdout=subprocess.PIPE)
        lockers.append(locker)
        assert locker.stdout is not None and locker.stdout.readline().strip() == b"locked"

    monkeypatch.setattr(daemon, "prepare", prepare_then_lock)
    with caplog.at_level(logging.WARNING, "meddaemon.daemon"):
        daemon.run(once=True)
    assert lockers[0].wait(10) == 0
    assert "database is locked by another process; waiting" in caplog.text


@pytest.mark.postgres
def test_an_outage_between_registration_and_recovery_is_waited_out(
    make_settings, postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The PostgreSQL server goes away just after the daemon registered and comes back 2 s later:
    the start waits for it (``db_outage_seconds``) instead of ending with "database unavailable"."""
    with pg_proxy(postgres_url) as proxy:
        daemon = Daemon(make_settings(db=proxy.url(postgres_url), reports=False))
        registered = daemon.prepare

        def prepare_then_cut() -> None:
            registered()
            proxy.cut()
            threading.Timer(2.0, proxy.restore).start()

        monkeypatch.setattr(daemon, "prepare", prepare_then_cut)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "meddaemon.daemon"):
            daemon.run(once=True)
    assert time.monotonic() - started >= 2.0
    assert "database unreachable" in caplog.text and "database back after" in caplog.text


def test_a_move_that_keeps_failing_is_logged_as_an_error_once_and_its_success_once(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A move with no room was tried at every rescan and logged at ERROR each time, with "finishing N
    committed moves" beside it: 150 lines a minute for 5 blocked files at a 2 s rescan."""

    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_c.png", np.zeros((8, 8), np.uint8))
    daemon = Daemon(make_settings())
    daemon.prepare()
    [move] = commit_without_moving(daemon, [path]).moves
    moves_fail_for_want_of_room(monkeypatch, times=4)
    caplog.set_level(logging.INFO, logger="meddaemon")
    for _rescan in range(5):
        daemon.recover()

    assert move.target.exists() and not path.exists()
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("meddaemon")]
    errors = [m for level, m in said if level >= logging.ERROR]
    assert len(errors) == 1 and "could not move" in errors[0] and "SYNTHETIC: no room" in errors[0], said
    assert len([m for level, m in said if level == logging.INFO and "finishing 1 committed moves" in m]) == 1, said
    # the file by its path in the inbox (its bare name could be any task folder's)
    assert any(f"moved {path} to" in m and "blocked before" in m for _, m in said), said


def test_a_once_run_that_could_not_move_a_file_out_of_the_inbox_is_not_drained(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A move that fails is retried at each rescan, and --once has none: it said "drained": true,
    "left": 0 and exited 0 with the file read and inferred still in the inbox, never reported."""
    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_held.png", np.zeros((8, 8), np.uint8))
    moves_fail_for_want_of_room(monkeypatch, times=1000)
    stats = Daemon(make_settings()).run(once=True)
    assert (stats.drained, stats.left, stats.held) == (False, 1, 1) and path.exists()


def test_a_file_renamed_over_one_whose_move_was_blocked_is_taken_as_a_new_arrival(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A's move was blocked (no room, injected); B was renamed over A's name meanwhile. Once the move
    could be made, B's bytes were filed as A's (under A's hash, A's row) and B was never registered."""

    from meddaemon.files import file_sha256

    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_scan.png", np.zeros((8, 8), np.uint8))
    daemon = Daemon(make_settings())
    daemon.prepare()
    record = commit_without_moving(daemon, [path])
    moves_fail_for_want_of_room(monkeypatch, times=1)
    caplog.set_level(logging.INFO, logger="meddaemon")
    daemon._carry_out(record.moves)  # the move right after the commit: blocked
    replacement = write_png(tmp_path / "synthetic_b.png", np.full((8, 8), 200, np.uint8))
    replacement.rename(path)
    b_sha = file_sha256(path)
    daemon.recover()  # the next rescan's retry of the blocked move
    daemon.run(once=True)

    with daemon.sessions() as session:
        scans = dict(session.execute(select(Scan.sha256, Scan.stored_path)).all())
    assert b_sha in scans and len(scans) == 2  # B registered as a scan of its own
    for sha, stored in scans.items():
        kept = daemon.settings.stored_file(stored) if stored else None
        assert kept is None or not kept.exists() or file_sha256(kept) == sha, (sha, stored)
    assert any("was replaced by other bytes before it could be moved" in r.getMessage() for r in caplog.records)


def test_a_folder_made_at_the_name_of_a_file_whose_move_a_crash_left_is_not_filed_as_that_scan(
    make_settings, tmp_path: Path
):
    """After a restart, recovery knows only the row: whatever held the name was moved, a folder too.
    A folder made at a killed daemon's file's name (holding another scan) went to work/, then to
    archive/, as the first scan's file, and the image inside it never had a scan of its own."""
    from meddaemon.files import file_sha256

    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_scan.png", np.zeros((8, 8), np.uint8))
    crashed = Daemon(make_settings())
    crashed.prepare()
    commit_without_moving(crashed, [path])
    path.unlink()
    inner = write_png(path / "synthetic_inner.png", np.full((8, 8), 200, np.uint8))
    inner_sha = file_sha256(inner)

    restarted = Daemon(crashed.settings)
    restarted.run(once=True)

    with restarted.sessions() as session:
        scans = {s.source_name: s for s in session.scalars(select(Scan))}
    assert sorted(scans) == ["busi/synthetic_scan.png", "busi/synthetic_scan.png/synthetic_inner.png"]
    first, arrival = scans["busi/synthetic_scan.png"], scans["busi/synthetic_scan.png/synthetic_inner.png"]
    assert (first.state, first.failure_reason) == ("failed", "vanished")  # its file is gone
    assert arrival.sha256 == inner_sha and restarted.settings.stored_file(arrival.stored_path).is_file()
    state_dir = restarted.settings.state_dir
    assert [p for p in state_dir.rglob("*") if p.is_dir() and p.name.startswith(first.sha256[:16])] == []


def test_a_failed_file_replaced_before_its_move_leaves_no_reason_without_a_file(make_settings, tmp_path: Path):
    """The reason document is written beside the failed file's target before the move: a file
    renamed over the one read left ``failed/`` a reason for a file that never came."""

    bad = tmp_path / "inbox" / "busi" / "synthetic_bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    daemon = Daemon(make_settings())
    daemon.prepare()
    record = commit_without_moving(daemon, [bad])
    write_png(tmp_path / "synthetic_good.png", np.full((8, 8), 90, np.uint8)).rename(bad)
    daemon._carry_out(record.moves)
    failed = daemon.settings.state_dir / "failed"
    assert [p.name for p in failed.rglob("*") if p.is_file()] == []
    assert bad.exists()


def test_a_file_gone_before_its_move_into_work_fails_its_scan_and_found_again_is_a_new_attempt(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The move into work/ was blocked (no room, injected) and the file's folder renamed meanwhile:
    the scan waited for ever for a copy that could not come, and the same bytes found under the new
    folder were filed as a duplicate of it, archived, never inferred."""
    path = write_png(tmp_path / "inbox" / "busi" / "x" / "synthetic_scan.png", np.full((8, 8), 40, np.uint8))
    daemon = Daemon(make_settings())
    daemon.prepare()
    record = commit_without_moving(daemon, [path])
    moves_fail_for_want_of_room(monkeypatch, times=1)
    daemon._carry_out(record.moves)  # the move right after the commit: blocked
    path.parent.rename(path.parent.with_name("y"))
    daemon.recover()  # the next rescan's retry of the blocked move finds the file gone
    daemon.run(once=True)

    with daemon.sessions() as session:
        scans = session.execute(
            select(Scan.source_name, Scan.state, Scan.failure_reason, Scan.stored_path).order_by(Scan.id)
        ).all()
        assert session.scalar(select(func.count()).select_from(DuplicateArrival)) == 0
    assert scans[0] == ("busi/x/synthetic_scan.png", "failed", "vanished", None)
    assert scans[1][:2] == ("busi/y/synthetic_scan.png", "waiting_model")
    assert daemon.settings.stored_file(scans[1].stored_path).exists()


def test_a_failed_file_removed_before_its_move_leaves_no_reason_and_no_name_in_failed(make_settings, tmp_path: Path):
    bad = tmp_path / "inbox" / "busi" / "synthetic_bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    daemon = Daemon(make_settings())
    daemon.prepare()
    record = commit_without_moving(daemon, [bad])
    bad.unlink()
    daemon._carry_out(record.moves)

    assert [p.name for p in (daemon.settings.state_dir / "failed").rglob("*") if p.is_file()] == []
    with daemon.sessions() as session:
        assert session.execute(select(Scan.state, Scan.stored_path)).all() == [("failed", None)]


def test_a_duplicate_whose_file_is_gone_before_its_move_is_recorded_and_the_daemon_runs_on(
    make_settings, tmp_path: Path
):
    """Clearing the name of a duplicate arrival whose file was gone broke its NOT NULL column: the
    daemon died at the move, and at every start after, on the same pending move."""
    inbox = tmp_path / "inbox" / "busi"
    good = write_png(inbox / "synthetic_a.png", np.full((16, 16), 7, np.uint8))
    copy = inbox / "synthetic_copy.png"
    copy.write_bytes(good.read_bytes())
    settings = make_settings()
    crashed = Daemon(settings)
    crashed.prepare()
    commit_without_moving(crashed, [good, copy])
    copy.unlink()
    restarted = Daemon(settings)
    restarted.run(once=True)

    with restarted.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DuplicateArrival).where(
            DuplicateArrival.pending_move_from.is_(None))) == 1  # fmt: skip
        assert session.scalar(select(Scan.state)) == "waiting_model"
