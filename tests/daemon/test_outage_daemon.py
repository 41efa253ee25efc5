"""A real daemon on PostgreSQL whose database goes away (issue 19, faults 3 and 4), as subprocesses.

The daemons reach the server through a TCP proxy (``tests/pg_proxy.py``) that the test cuts: every
connection closed, new ones refused. A cut shorter than ``db_outage_seconds`` is waited out and
every file is still processed exactly once; a longer one ends the daemon with exit code 3 and one
line. Then the claims: a cold daemon claims no more than its starting workers can take, and a
daemon frozen while it holds unread files loses them to a peer after ``claim_unread_seconds``.

Every file here is SYNTHETIC (seeded noise PNGs); the model is an untrained SYNTHETIC small CNN.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from daemon_harness import MEDDAEMON, TASK, Daemons, Layout, RunningDaemon, daemon_env, files_under, wait_until
from daemon_rows import stages_run_twice
from meddaemon.daemon.intake_stage import READ_AHEAD_PER_WORKER
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import DaemonInstance, DuplicateArrival, InboxClaim, Report, Scan, ScanEvent
from model_factory import promote_into, write_model
from pg_proxy import PgProxy, pg_proxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CUT_SECONDS = 15.0


@pytest.fixture
def shared_db(postgres_url: str, layout: Layout, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """The database, migrated, with a SYNTHETIC busi model promoted in the shared registry; the
    test reads it directly, never through the proxy."""
    promote_into(postgres_url, layout.state / "models", write_model(tmp_path / "model"))
    engine = create_db_engine(postgres_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[PgProxy]:
    with pg_proxy(postgres_url) as running:
        yield running


def drop_pngs(inbox: Path, first: int, count: int) -> list[str]:
    """``count`` distinct SYNTHETIC PNGs renamed into ``inbox/busi``; returns their names."""
    names = []
    for i in range(first, first + count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8)
        part = write_png(inbox / f".synthetic_{i:05d}.png.part", pixels)
        os.rename(part, inbox / TASK / f"synthetic_{i:05d}.png")
        names.append(f"{TASK}/synthetic_{i:05d}.png")
    return names


def count(sessions: sessionmaker[Session], query) -> int:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return int(session.scalar(query) or 0)


def archived(sessions: sessionmaker[Session]) -> int:
    return count(sessions, select(func.count()).select_from(Scan).where(Scan.state == "archived"))


def assert_processed_exactly_once(sessions: sessionmaker[Session], layout: Layout, names: list[str]) -> None:
    """One scan per distinct content, one report per scan whose PDF is the one its history names,
    nothing left in the inbox or work/, every claim closed."""
    with sessions() as session:
        scans = session.scalars(select(Scan)).all()
        assert sorted(s.source_name for s in scans) == sorted(names)
        assert len({s.sha256 for s in scans}) == len(names)
        assert session.scalar(select(func.count()).select_from(DuplicateArrival)) == 0
        assert all(s.state == "archived" and s.claimed_by is None and s.pending_move_from is None for s in scans)
        assert stages_run_twice(session) == [], "no stage of any scan ran twice"
        reports = session.scalars(select(Report).where(Report.kind == "scan")).all()
        assert sorted(r.scan_id for r in reports) == sorted(s.id for s in scans), "one report per scan"
        named = dict(
            session.execute(select(ScanEvent.scan_id, ScanEvent.detail).where(ScanEvent.state == "reported")).all()
        )
        for report in reports:
            pdf = layout.stored_file(report.path)
            assert named[report.scan_id] == f"report {pdf.name}"
            assert hashlib.sha256(pdf.read_bytes()).hexdigest() == report.sha256
        assert all(c.done_at is not None for c in session.scalars(select(InboxClaim))), "no claim left open"
    assert layout.inbox_files() == []
    assert files_under(layout.state / "work") == []


def start(daemons: Daemons, url: str, node: str = "node-1", workers: int = 1, **settings: str) -> RunningDaemon:
    env = {"MEDDAEMON_NODE": node, "MEDDAEMON_LEASE_SECONDS": "5", **settings}
    return daemons.start(stable=0.3, rescan=1.0, workers=workers, batch_size=16, extra=("--db", url), env=env)


def health(url: str, layout: Layout) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MEDDAEMON), "health", "--db", url, "--state-dir", str(layout.state), "--json"],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )


def test_a_database_cut_for_15_s_is_waited_out_and_every_file_is_processed_once(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], proxy: PgProxy, postgres_url: str
):
    sessions = shared_db
    daemon = start(daemons, proxy.url(postgres_url), MEDDAEMON_DB_OUTAGE_SECONDS="60")
    daemon.wait_ready(60)
    names = drop_pngs(layout.inbox, 0, 12)
    wait_until(lambda: archived(sessions) == 12, 60, "the files before the cut archived", daemon)

    proxy.cut()
    cut_at = time.monotonic()
    names += drop_pngs(layout.inbox, 100, 12)  # they arrive while the database is away
    wait_until(lambda: "database unreachable" in daemon.log_text(), 15, "the outage noticed", daemon)
    checked = health(proxy.url(postgres_url), layout)
    assert checked.returncode == 2 and '"status": "down"' in checked.stdout
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    assert daemon.alive(), f"the daemon gave up during a {CUT_SECONDS:.0f} s cut:\n{daemon.tail()}"
    proxy.restore()

    names += drop_pngs(layout.inbox, 200, 12)
    wait_until(lambda: archived(sessions) == 36, 90, "every file archived after the cut", daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0

    assert_processed_exactly_once(sessions, layout, names)
    log = daemon.log_text()
    for process in ("daemon", "reporter"):  # the daemon's loop and heartbeats, and its report process
        assert log.count(f"meddaemon.{process}: database unreachable:") == 1, "logged once when the outage began"
        assert log.count(f"meddaemon.{process}: database back after") == 1, "and once when it ended"
    assert "Traceback" not in log
    with sessions() as session:
        assert session.scalar(select(DaemonInstance.state)) == "stopped"


def test_an_outage_longer_than_db_outage_seconds_ends_the_daemon_with_exit_3_and_one_line(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], proxy: PgProxy, postgres_url: str
):
    daemon = start(daemons, proxy.url(postgres_url), workers=0, MEDDAEMON_DB_OUTAGE_SECONDS="4")
    daemon.wait_ready(60)
    proxy.cut()
    cut_at = time.monotonic()
    assert daemon.wait(40) == 3
    waited = time.monotonic() - cut_at
    assert waited >= 4.0
    errors = [line for line in daemon.log_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    # the time it says is the time it was down: 4 s on a quiet machine, more when its last try comes
    # late (5 to 7 s with the machine's load at 6 on 2 cores), never more than the test waited; that
    # no wait runs past the limit is test_outage.py's, on a fake clock
    said = re.match(
        r"error: the database has been unreachable for (\d+) s, longer than db_outage_seconds \(4 s\)", errors[0]
    )
    assert said is not None and 4 <= int(said[1]) <= waited + 0.5, errors[0]
    assert "Traceback" not in daemon.log_text()


def test_a_stop_asked_for_during_an_outage_is_a_stop_exit_0_not_a_database_failure(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], proxy: PgProxy, postgres_url: str
):
    """SIGTERM 5 s into a cut well under db_outage_seconds: it exited 3 (the code of an outage past
    the limit), and systemd marked the unit failed on a plain `systemctl stop`."""
    daemon = start(daemons, proxy.url(postgres_url), workers=0, MEDDAEMON_DB_OUTAGE_SECONDS="120")
    daemon.wait_ready(60)
    proxy.cut()
    wait_until(lambda: "database unreachable" in daemon.log_text(), 30, "the outage noticed", daemon)
    daemon.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert daemon.wait(60) == 0
    assert time.monotonic() - asked < 30
    assert "stopping as asked while the database was unreachable" in daemon.log_text()
    assert "Traceback" not in daemon.log_text()


def test_a_daemon_claims_no_more_inbox_files_than_its_workers_can_start_on(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    """One file per worker until they have answered, then 16 per worker (tests/daemon/test_workers.py
    holds the cold half: the daemon now starts its workers before it claims, so they are warm here)."""
    sessions = shared_db
    names = drop_pngs(layout.inbox, 0, 40)  # more than two workers start on at once: all of it claimed before
    daemon = start(daemons, postgres_url, workers=2)
    open_claims = select(func.count()).select_from(InboxClaim).where(InboxClaim.done_at.is_(None))
    first_claimed = 0
    deadline = time.monotonic() + 60
    while not first_claimed:
        first_claimed = count(sessions, open_claims)
        assert time.monotonic() < deadline and daemon.alive(), daemon.tail()
        time.sleep(0.01)
    limit = 2 * READ_AHEAD_PER_WORKER
    assert first_claimed <= limit, f"a daemon with 2 workers claimed {first_claimed} files at once"
    wait_until(lambda: archived(sessions) == 40, 90, "all archived", daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    assert_processed_exactly_once(sessions, layout, names)


def test_files_a_frozen_daemon_claimed_and_never_read_are_taken_over_by_a_peer_and_processed_once(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    sessions = shared_db
    names = drop_pngs(layout.inbox, 0, 24)
    unread = {"MEDDAEMON_CLAIM_UNREAD_SECONDS": "2", "MEDDAEMON_LEASE_SECONDS": "120"}
    frozen = start(daemons, postgres_url, "node-1", workers=2, **unread)
    held = select(func.count()).select_from(InboxClaim).where(InboxClaim.done_at.is_(None))
    busy = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND state <> 'idle'")

    def frozen_holding_claims_outside_a_transaction() -> bool:
        """Frozen inside a claim's transaction, its row locks would hold the peer's claims until the
        server's idle timeout: on a loaded machine past this test's minute. Stopped, then looked at."""
        if count(sessions, held) == 0:
            return False
        os.killpg(frozen.pid, signal.SIGSTOP)
        time.sleep(0.1)  # a statement sent just before lands
        with sessions() as session:
            if not session.scalar(busy, {"name": f"meddaemon[{frozen.pid}]"}):
                return True
        os.killpg(frozen.pid, signal.SIGCONT)
        return False

    wait_until(frozen_holding_claims_outside_a_transaction, 60, "the first daemon to claim files", frozen, every=0.02)
    with sessions() as session:
        frozen_id = session.scalar(select(DaemonInstance.id).where(DaemonInstance.pid == frozen.pid))
        taken = set(session.scalars(select(InboxClaim.path).where(InboxClaim.daemon_id == frozen_id)))
    assert taken

    peer = start(daemons, postgres_url, "node-2", workers=0, **unread)
    try:
        wait_until(lambda: archived(sessions) == 24, 60, "the peer to process every file, held ones too", peer)
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    time.sleep(3.0)  # the first daemon wakes up: its reads come back, and it must record nothing
    for daemon in (frozen, peer):
        daemon.signal(signal.SIGTERM)
    assert [frozen.wait(60), peer.wait(60)] == [0, 0]

    assert_processed_exactly_once(sessions, layout, names)


@pytest.mark.parametrize("how", ["left to wait", "asked to stop"])
def test_a_server_that_acknowledges_but_never_answers_is_an_outage_not_a_hang(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str, how: str
):
    """A server frozen with its host up (a paused VM, a hung pooler) acknowledges every packet:
    neither keepalives, the TCP user timeout nor its own timeouts end a wait on it. The daemon hung
    for as long as it lasted: no "database unreachable", no exit 3 past db_outage_seconds, deaf to
    SIGTERM and its watchdog. A round trip unanswered for 6 x db_keepalive_seconds fails now."""
    from sqlalchemy.engine import make_url

    from tcp_proxy import tcp_proxy

    where = make_url(postgres_url)
    with tcp_proxy((where.host or "127.0.0.1", where.port or 5432)) as frozen:
        through = where.set(host="127.0.0.1", port=frozen.port).render_as_string(hide_password=False)
        daemon = start(daemons, through, workers=0, MEDDAEMON_DB_OUTAGE_SECONDS="4", MEDDAEMON_DB_KEEPALIVE_SECONDS="1")
        daemon.wait_ready(60)
        frozen.freeze()
        frozen_at = time.monotonic()
        if how == "asked to stop":
            time.sleep(1.0)
            daemon.signal(signal.SIGTERM)
        code = daemon.wait(60)
        took = time.monotonic() - frozen_at
    log = daemon.log_text()
    assert code == (3 if how == "left to wait" else 0), daemon.tail()
    assert took < 40, took
    if how == "left to wait":
        assert "database unreachable: " in log and "longer than db_outage_seconds (4 s)" in log
    assert "Traceback" not in log
