"""A daemon declared lost that wakes up writes nothing for the scans another daemon took over, at
every stage: results (tests/daemon/test_claims.py), the report (its row and its PDF on disk), and
the moves of the journal (into work/, into the archive). On SQLite and PostgreSQL.

The scans are SYNTHETIC PNGs run through the real daemon (``--once``, no reports) with an untrained
SYNTHETIC model; the daemons that stall and take over are rows registered here.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from daemon_rows import join, look_for_lost
from meddaemon.daemon import bookkeeper, lease
from meddaemon.daemon.reporter import Reporter
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import transaction
from meddaemon.db.models import Report, Scan, ScanEvent
from meddaemon.states import ScanState
from model_factory import drop_scans, promote, write_model

LEASE = 1.0


@pytest.fixture
def inferred(make_settings, db_url: str, tmp_path: Path) -> Daemon:  # type: ignore[no-untyped-def]
    """A daemon's settings and database with four SYNTHETIC scans ``inferred``, not yet reported."""
    daemon = Daemon(make_settings(db=db_url, max_wait_ms=10, reports=False))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    assert set(scan_ids(daemon, ScanState.INFERRED)) and not scan_ids(daemon, ScanState.ROUTED)
    return daemon


def scan_ids(daemon: Daemon, state: ScanState) -> list[int]:
    with daemon.sessions() as session:
        return list(session.scalars(select(Scan.id).where(Scan.state == state).order_by(Scan.id)))


def stall_past_the_lease(daemon: Daemon, stalled: lease.Member) -> lease.Member:
    """``stalled`` is silent past its lease; another daemon registers and declares it lost."""
    time.sleep(LEASE + 0.3)
    other = join(daemon.sessions, "node-other")
    assert [d.daemon_id for d in look_for_lost(daemon.sessions, other)] == [stalled.daemon_id]
    return other


def as_member(daemon: Daemon, member: lease.Member) -> Daemon:
    """A daemon process of ``member`` on the same settings (its moves, its recovery)."""
    twin = Daemon(daemon.settings)
    twin.member = member
    return twin


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_daemon_declared_lost_rewrites_neither_the_report_row_nor_the_pdf_of_a_scan_taken_over(inferred):
    daemon = inferred
    slow = join(daemon.sessions, "node-slow", lease_seconds=LEASE)
    slow_reporter = Reporter(daemon.settings, daemon.sessions, slow.daemon_id)
    claimed = slow_reporter._claim(set())  # its report process claimed them, then the daemon froze
    assert claimed == scan_ids(daemon, ScanState.INFERRED)

    other = stall_past_the_lease(daemon, slow)
    Reporter(daemon.settings, daemon.sessions, other.daemon_id).drain()
    with daemon.sessions() as session:
        before = {r.scan_id: (r.path, r.sha256, r.created_at) for r in session.scalars(select(Report))}
    assert sorted(before) == claimed
    on_disk = {scan_id: sha256_of(daemon.settings.stored_file(path)) for scan_id, (path, _, _) in before.items()}
    assert on_disk == {scan_id: sha for scan_id, (_, sha, _) in before.items()}

    time.sleep(0.05)  # a rewrite would have a later time (and a new SHA-256: the PDF carries its time)
    for scan_id in claimed:  # it wakes up and goes on with the reports in hand
        assert slow_reporter._report_scans([scan_id]) == set()

    with daemon.sessions() as session:
        after = {r.scan_id: (r.path, r.sha256, r.created_at) for r in session.scalars(select(Report))}
        reported_steps = session.scalar(
            select(func.count()).select_from(ScanEvent).where(ScanEvent.state == ScanState.REPORTED)
        )
    assert after == before, "the report rows are the ones the daemon that took over wrote"
    assert {scan_id: sha256_of(daemon.settings.stored_file(path)) for scan_id, (path, _, _) in after.items()} == on_disk
    assert reported_steps == len(claimed)
    assert slow_reporter.stats.scans == 0
    assert [p for p in daemon.settings.reports_dir.rglob("*") if p.is_file() and p.suffix != ".pdf"] == []


def test_a_daemon_declared_lost_reports_nothing_of_its_round_and_the_rest_is_reported_once_by_another(inferred):
    """Of a round claimed together, one scan is taken over and reported by another daemon; the
    lost one wakes up and writes nothing (the scans nobody took were reported by it, under an id
    that no longer runs, before), and the scans it left are reported by a running daemon, once."""
    daemon = inferred
    slow = join(daemon.sessions, "node-slow", lease_seconds=LEASE)
    slow_reporter = Reporter(daemon.settings, daemon.sessions, slow.daemon_id)
    claimed = slow_reporter._claim(set())
    assert len(claimed) >= 3
    other = stall_past_the_lease(daemon, slow)  # which gives back what the slow daemon held
    taken, *left = claimed
    taker = Reporter(daemon.settings, daemon.sessions, other.daemon_id)
    assert taker.builder.claimed_scan_reports([taken], other.daemon_id)[taken] is not None
    with daemon.sessions() as session:
        taken_row = session.scalars(select(Report).where(Report.scan_id == taken)).one()
        taken_pdf = sha256_of(daemon.settings.stored_file(taken_row.path))

    outcomes = slow_reporter.builder.claimed_scan_reports(claimed, slow.daemon_id)  # it wakes up

    assert all(outcome is None for outcome in outcomes.values()), "a daemon declared lost reports nothing"
    assert set(scan_ids(daemon, ScanState.INFERRED)) == set(left)
    assert sorted(taker._claim(set())) == sorted(left)
    reported = taker.builder.claimed_scan_reports(left, other.daemon_id)
    assert all(reported[scan_id] is not None for scan_id in left), reported
    with daemon.sessions() as session:
        rows = {r.scan_id: r for r in session.scalars(select(Report))}
        steps = session.scalars(select(ScanEvent.scan_id).where(ScanEvent.state == ScanState.REPORTED)).all()
    assert sorted(rows) == sorted(claimed) and sorted(steps) == sorted(claimed)
    assert (rows[taken].sha256, rows[taken].created_at) == (taken_row.sha256, taken_row.created_at)
    assert sha256_of(daemon.settings.stored_file(taken_row.path)) == taken_pdf
    for scan_id in left:
        assert sha256_of(daemon.settings.stored_file(rows[scan_id].path)) == rows[scan_id].sha256
    assert set(scan_ids(daemon, ScanState.REPORTED)) == set(claimed)
    assert [p for p in daemon.settings.reports_dir.rglob("*") if p.is_file() and p.suffix != ".pdf"] == []


def test_a_daemon_declared_lost_moves_nothing_for_a_scan_whose_archive_move_another_made(inferred):
    daemon = inferred
    Reporter(daemon.settings, daemon.sessions).drain()
    slow = join(daemon.sessions, "node-slow", lease_seconds=LEASE)
    with transaction(daemon.sessions) as session:  # committed, then the daemon froze before moving
        moves = bookkeeper.claim_for_archive(session, daemon.destinations, 10, slow.daemon_id)
    assert moves and all(m.source.exists() and not m.target.exists() for m in moves)

    peer = join(daemon.sessions, "node-peer")
    as_member(daemon, peer).recover()
    assert all(m.source.exists() for m in moves), "a live daemon's moves in flight are left to it"

    other = stall_past_the_lease(daemon, slow)
    as_member(daemon, other).recover()  # now they are nobody's: recovery finishes them
    assert all(m.target.exists() and not m.source.exists() for m in moves)
    archived = {m.target: sha256_of(m.target) for m in moves}
    for move in moves:  # new files at the old work/ paths, so that a stale move would show
        move.source.parent.mkdir(parents=True, exist_ok=True)  # the emptied shard folder was removed
        move.source.write_bytes(b"SYNTHETIC not the archived scan")

    as_member(daemon, slow)._carry_out(moves)  # it wakes up and carries out the moves in hand

    assert {m.target: sha256_of(m.target) for m in moves} == archived
    assert all(m.source.read_bytes() == b"SYNTHETIC not the archived scan" for m in moves)
    with daemon.sessions() as session:
        scans = session.scalars(select(Scan).where(Scan.id.in_([m.row_id for m in moves]))).all()
    assert all(s.state == ScanState.ARCHIVED and s.claimed_by is None and s.pending_move_from is None for s in scans)


def test_a_daemon_declared_lost_does_not_move_a_new_inbox_file_under_an_old_journalled_name(make_settings, db_url: str):
    daemon = Daemon(make_settings(db=db_url))
    daemon.prepare()
    slow = join(daemon.sessions, "node-slow", lease_seconds=LEASE)
    inbox_file = daemon.settings.watch / "busi" / "synthetic_resent.png"
    inbox_file.parent.mkdir(parents=True)
    inbox_file.write_bytes(b"SYNTHETIC first version")
    target = daemon.settings.work_dir / "ab" / "synthetic_first.png"
    with transaction(daemon.sessions) as session:  # the intake commit of the slow daemon
        scan = Scan(
            sha256="ab" * 32,
            state=ScanState.ROUTED,
            task_name="busi",
            source_name="busi/synthetic_resent.png",
            stored_path=str(target),
            pending_move_from=str(inbox_file),
            claimed_by=slow.daemon_id,
        )
        session.add(scan)
        session.flush()
        move = bookkeeper.PlannedMove("scan", scan.id, inbox_file, target)

    other = stall_past_the_lease(daemon, slow)
    as_member(daemon, other).recover()
    assert target.read_bytes() == b"SYNTHETIC first version"
    target.unlink()  # that scan went on (inferred, archived) and left work/
    inbox_file.write_bytes(b"SYNTHETIC second version, sent again under the same name")

    as_member(daemon, slow)._carry_out([move])

    assert inbox_file.read_bytes() == b"SYNTHETIC second version, sent again under the same name"
    assert not target.exists()
