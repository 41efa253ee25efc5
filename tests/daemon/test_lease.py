"""Daemons sharing one database: leases kept in database time, lost daemons found and their work
given back, on SQLite and PostgreSQL.

Every scan row here is SYNTHETIC (made-up hashes and names); no image is read.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from daemon_rows import add_scan, daemon_row, dead_pid, inbox_file, join, look_for_lost
from meddaemon.daemon import claims, lease
from meddaemon.db.clock import read_db_clock
from meddaemon.db.engine import transaction
from meddaemon.db.models import InboxClaim, Scan


def test_a_daemon_registers_and_beats_in_database_time(sessions):
    member = join(sessions)
    first = daemon_row(sessions, member)
    with sessions() as session:
        assert abs(first.heartbeat_at - read_db_clock(session)) < 2.0
    assert first.state == "running" and abs(first.started_at - first.heartbeat_at) < 0.5

    time.sleep(0.05)
    with transaction(sessions) as session:
        assert lease.heartbeat(session, member)
    assert daemon_row(sessions, member).heartbeat_at > first.heartbeat_at


def test_a_daemon_silent_past_its_lease_is_declared_lost_and_its_work_given_back(sessions):
    silent = join(sessions, "node-a", lease_seconds=1.0)
    watcher = join(sessions, "node-b")
    with transaction(sessions) as session:
        scan_id = add_scan(session, 1, claimed_by=silent.daemon_id).id
        claims.claim_inbox_files(session, silent.daemon_id, [inbox_file(Path("/inbox/busi/synthetic_9.png"))])

    assert look_for_lost(sessions, watcher) == []  # within its lease: alive, whatever it is doing

    time.sleep(1.3)
    [lost] = look_for_lost(sessions, watcher)
    assert (lost.daemon_id, lost.why) == (silent.daemon_id, "its lease ran out")
    assert lost.released == claims.Released(scans=1, inbox_files=1, kept_for_moves=0)
    assert daemon_row(sessions, silent).state == "lost"
    with sessions() as session:
        assert session.get(Scan, scan_id).claimed_by is None
        assert session.scalars(select(InboxClaim)).all() == []
    with transaction(sessions) as session:
        assert not lease.heartbeat(session, silent), "a lost daemon learns it at its next heartbeat"


def test_a_node_whose_clock_is_hours_ahead_cannot_declare_a_live_daemon_lost(sessions, monkeypatch):
    live = join(sessions, "node-a", lease_seconds=5.0)
    real_time = time.time
    skewed = datetime.now(UTC) + timedelta(hours=3)
    monkeypatch.setattr(time, "time", lambda: real_time() + 3 * 3600)
    monkeypatch.setattr("meddaemon.db.models.utcnow", lambda: skewed)

    skewed_node = join(sessions, "node-skewed")
    assert look_for_lost(sessions, skewed_node) == []
    assert daemon_row(sessions, live).state == "running"
    with sessions() as session:  # and its own heartbeat is stamped by the database, not its clock
        assert abs(daemon_row(sessions, skewed_node).heartbeat_at - read_db_clock(session)) < 2.0


def test_on_its_own_node_a_daemon_whose_process_is_gone_is_lost_at_once(sessions):
    gone = dead_pid()
    crashed = join(sessions, "node-a", pid=gone)
    elsewhere = join(sessions, "node-b", pid=gone)  # the same number on another node means nothing here
    container = join(sessions, "node-a", pid=gone, namespace="pid:[1]")  # nor in another PID namespace
    restarted = join(sessions, "node-a")

    [lost] = look_for_lost(sessions, restarted)
    assert lost.daemon_id == crashed.daemon_id and "is gone" in lost.why
    assert daemon_row(sessions, elsewhere).state == "running"
    assert daemon_row(sessions, container).state == "running"


def test_an_earlier_daemon_of_this_very_process_is_lost_when_it_registers_again(sessions):
    before = join(sessions, "node-a")
    again = join(sessions, "node-a")
    assert [d.daemon_id for d in look_for_lost(sessions, again)] == [before.daemon_id]


def test_signing_off_gives_the_work_back_at_once(sessions):
    member = join(sessions)
    with transaction(sessions) as session:
        add_scan(session, 2, claimed_by=member.daemon_id)
    with transaction(sessions) as session:
        lease.sign_off(session, member)
    assert daemon_row(sessions, member).state == "stopped"
    with sessions() as session:
        assert session.scalar(select(Scan.claimed_by)) is None


def test_the_lease_keeper_stops_beating_when_the_main_loop_is_stuck(sessions):
    member = join(sessions, lease_seconds=1.0)
    keeper = lease.LeaseKeeper(sessions, member, stall_seconds=5.0)
    keeper.last_tick -= 4.0  # a long model load: still beating
    keeper.beat()
    beaten = daemon_row(sessions, member).heartbeat_at

    keeper.last_tick -= 2.0  # the main loop has not ticked for over stall_seconds
    time.sleep(0.05)
    keeper.beat()
    assert daemon_row(sessions, member).heartbeat_at == beaten


def test_the_lease_keeper_reports_that_its_daemon_was_declared_lost(sessions):
    member = join(sessions, "node-a", lease_seconds=1.0)
    other = join(sessions, "node-b")
    time.sleep(1.3)
    look_for_lost(sessions, other)

    keeper = lease.LeaseKeeper(sessions, member)
    keeper.beat()
    assert keeper.lost.is_set()
