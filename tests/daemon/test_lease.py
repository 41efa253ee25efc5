"""Daemons sharing one database: leases kept in database time, lost daemons found and their work
given back, on SQLite and PostgreSQL.

Every scan row here is SYNTHETIC (made-up hashes and names); no image is read.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from daemon_rows import add_scan, daemon_row, dead_pid, inbox_file, join, look_for_lost
from meddaemon.daemon import bookkeeper, claims, lease
from meddaemon.db.clock import read_db_clock
from meddaemon.db.engine import ConnectionLimits, create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade
from meddaemon.db.models import DaemonInstance, InboxClaim, Scan
from meddaemon.engine.tasks import all_tasks


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
    silent = join(sessions, "node-a", lease_seconds=30.0)
    watcher = join(sessions, "node-b")
    with transaction(sessions) as session:
        scan_id = add_scan(session, 1, claimed_by=silent.daemon_id).id
        claims.claim_inbox_files(session, silent.daemon_id, [inbox_file(Path("/inbox/busi/synthetic_9.png"))])

    assert look_for_lost(sessions, watcher) == []  # within its lease: alive, whatever it is doing

    with transaction(sessions) as session:  # its last heartbeat 31 s ago, by the database's clock
        session.execute(
            update(DaemonInstance)
            .where(DaemonInstance.id == silent.daemon_id)
            .values(heartbeat_at=DaemonInstance.heartbeat_at - 31.0)
        )
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


def test_a_daemon_killed_and_not_yet_reaped_is_lost_at_once(sessions, zombie: int):
    """A container's init may reap a killed daemon seconds late; its work is given back meanwhile."""
    killed = join(sessions, "node-a", pid=zombie)
    restarted = join(sessions, "node-a")

    [lost] = look_for_lost(sessions, restarted)
    assert lost.daemon_id == killed.daemon_id and "is gone" in lost.why


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


def test_the_running_daemons_are_listed_with_their_heartbeats_age_and_whether_their_lease_still_runs(sessions):
    """What health, the metrics and the web console show of the daemons (``lease.running_daemons``)."""
    live = join(sessions, "node-a")
    silent = join(sessions, "node-b", lease_seconds=0.2)
    gone = join(sessions, "node-c")
    with transaction(sessions) as session:
        lease.sign_off(session, gone)
    time.sleep(0.3)
    with sessions() as session:
        running = lease.running_daemons(session)
    assert [(d.id, d.node, d.pid, d.alive) for d in running] == [
        (live.daemon_id, "node-a", live.pid, True),
        (silent.daemon_id, "node-b", silent.pid, False),
    ]
    assert all(0.25 <= d.heartbeat_age < 30 for d in running)  # julianday(): milliseconds
    assert running[1].lease_seconds == 0.2 and running[0].version == daemon_row(sessions, live).version


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


@pytest.mark.postgres
def test_a_daemon_frozen_inside_a_claiming_transaction_is_declared_lost_once_the_server_cuts_it_off(
    postgres_url: str,
):
    """The frozen daemon holds FOR KEY SHARE on its own row (a claim's foreign key) and a scan row:
    the peer's look for lost daemons is not blocked by the first and waits at most the lock timeout
    on the second, its own heartbeat goes on meanwhile, and once the server has ended the frozen
    session (idle in transaction) the peer declares it lost and takes its scan."""
    setup = create_db_engine(postgres_url)
    upgrade(setup)
    setup.dispose()
    frozen_engine = create_db_engine(postgres_url, limits=ConnectionLimits(lock_timeout=1.0, idle_in_transaction=3.0))
    peer_engine = create_db_engine(postgres_url, limits=ConnectionLimits(lock_timeout=1.0))
    frozen_sessions, peer_sessions = session_factory(frozen_engine), session_factory(peer_engine)
    frozen = join(peer_sessions, "node-frozen", lease_seconds=1.0)
    with transaction(peer_sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(peer_sessions) as session:
        scan_id = add_scan(session, 1, claimed_by=frozen.daemon_id).id

    stuck = frozen_sessions()
    stuck.begin()
    assert claims.scans_held(stuck, frozen.daemon_id, [scan_id])  # the scan row locked FOR UPDATE
    claims.claim_inbox_files(stuck, frozen.daemon_id, [inbox_file(Path("/inbox/busi/synthetic_7.png"))])
    # ... and the daemon freezes here, its transaction open

    watcher = join(peer_sessions, "node-b")
    keeper = lease.LeaseKeeper(peer_sessions, watcher)
    time.sleep(1.3)
    beat_before = daemon_row(peer_sessions, watcher).heartbeat_at
    started = time.monotonic()
    keeper.beat()
    assert time.monotonic() - started < 2.5, "waited no longer than the lock timeout"
    assert daemon_row(peer_sessions, watcher).heartbeat_at > beat_before, "its own heartbeat went on"

    deadline = time.monotonic() + 10
    while daemon_row(peer_sessions, frozen).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        keeper.beat()
    assert daemon_row(peer_sessions, frozen).state == "lost"
    assert not keeper.lost.is_set()
    with peer_sessions() as session:
        assert session.get(Scan, scan_id).claimed_by is None
    with pytest.raises(DBAPIError):  # the frozen daemon wakes up: its session is gone
        claims.claim_inbox_files(stuck, frozen.daemon_id, [inbox_file(Path("/inbox/busi/synthetic_8.png"))])
    stuck.close()
    frozen_engine.dispose()
    peer_engine.dispose()


@pytest.mark.postgres
def test_heartbeats_keep_their_interval_while_a_look_for_lost_daemons_waits_longer_than_it(postgres_url: str):
    """A look for lost daemons and the heartbeat ran in one thread, one after the other: under a
    table lock on scans a look waited the lock timeout once per statement, and a live daemon with a
    10 s lease went a whole lease without renewing and was declared lost by a peer. The heartbeats
    of a 4 s lease (a second apart) now keep their second while each look waits 2.5 s."""
    setup = create_db_engine(postgres_url)
    upgrade(setup)
    setup.dispose()
    engine = create_db_engine(postgres_url, limits=ConnectionLimits(lock_timeout=2.5))
    sessions = session_factory(engine)
    frozen = join(sessions, "node-frozen", lease_seconds=1.0)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        scan_id = add_scan(session, 1, claimed_by=frozen.daemon_id).id
    stuck = sessions()
    stuck.begin()
    assert claims.scans_held(stuck, frozen.daemon_id, [scan_id])  # locked until the end of the test
    watcher = join(sessions, "node-b", lease_seconds=4.0)
    keeper = lease.LeaseKeeper(sessions, watcher)
    time.sleep(1.3)  # the frozen peer's lease has run out: each look now waits on its scan row
    beats = set()
    try:
        keeper.start()
        deadline = time.monotonic() + 5.6
        while time.monotonic() < deadline:
            beats.add(daemon_row(sessions, watcher).heartbeat_at)
            time.sleep(0.05)
    finally:
        keeper.stop()
        stuck.rollback()
        stuck.close()
        engine.dispose()
    renewed = sorted(beats)[1:]  # the registration's stamp left out
    gaps = [later - earlier for earlier, later in itertools.pairwise(renewed)]
    # behind the look, a beat comes 2.5 s apart at least; 1.9 leaves room for a loaded machine
    assert len(gaps) >= 3 and max(gaps) < 1.9, f"seconds between heartbeats: {gaps}"


def test_the_lease_keeper_asks_for_a_rescan_when_it_releases_a_lost_daemons_inbox_files(sessions):
    silent = join(sessions, "node-a", lease_seconds=30.0)
    watcher = join(sessions, "node-b")
    keeper = lease.LeaseKeeper(sessions, watcher)
    keeper.beat()
    assert not keeper.inbox_released.is_set()
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, silent.daemon_id, [inbox_file(Path("/inbox/busi/synthetic_9.png"))])
        # its last heartbeat 31 s ago by the database's clock, however slowly this machine ran so far
        session.execute(
            update(DaemonInstance)
            .where(DaemonInstance.id == silent.daemon_id)
            .values(heartbeat_at=DaemonInstance.heartbeat_at - 31.0)
        )
    keeper.beat()
    assert keeper.inbox_released.is_set()


@pytest.mark.postgres
def test_a_daemon_holding_a_claim_transaction_open_is_still_judged_by_its_lease(postgres_url: str):
    """A claim's foreign key takes FOR KEY SHARE on the claiming daemon's row; the look for lost
    daemons locks rows in a mode that does not conflict with it, so it does not skip that daemon."""
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    factory = session_factory(engine)
    frozen = join(factory, "node-frozen", lease_seconds=1.0)
    stuck = factory()
    stuck.begin()
    claims.claim_inbox_files(stuck, frozen.daemon_id, [inbox_file(Path("/inbox/busi/synthetic_7.png"))])
    try:
        watcher = join(factory, "node-b")
        time.sleep(1.3)
        started = time.monotonic()
        assert [d.daemon_id for d in look_for_lost(factory, watcher)] == [frozen.daemon_id]
        assert time.monotonic() - started < 4.0  # not the 5 s lock timeout
        assert daemon_row(factory, frozen).state == "lost"
    finally:
        stuck.rollback()
        stuck.close()
        engine.dispose()


def test_a_beat_tried_from_the_loop_gives_way_to_a_lock_held_elsewhere_instead_of_waiting_for_it(tmp_path: Path):
    """The loop's probe of an unwritable database beat through the lease's own retry, which waits on
    a lock for as long as it is held: the loop froze, deaf to a stop, its watchdog unfed. A try
    gives way after the database's busy timeout, and beats once the lock is gone."""
    import sqlite3

    engine = create_db_engine(f"sqlite:///{tmp_path / 'meddaemon.db'}", busy_timeout=0.3)
    upgrade(engine)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    member = join(sessions, "node-a")
    keeper = lease.LeaseKeeper(sessions, member)
    beaten = daemon_row(sessions, member).heartbeat_at
    holder = sqlite3.connect(tmp_path / "meddaemon.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    assert keeper.try_a_beat() is False
    assert time.monotonic() - started < 3.0 and not keeper.lost.is_set()
    holder.execute("ROLLBACK")
    holder.close()
    time.sleep(0.01)
    assert keeper.try_a_beat() is True
    assert daemon_row(sessions, member).heartbeat_at > beaten
    engine.dispose()
