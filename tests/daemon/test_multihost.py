"""Several daemons on one PostgreSQL database and one inbox (docs/design.md section 9), as real processes.

Three daemons, each under its own node name as if on three hosts, share the inbox, the state
directory and the database. One is killed with SIGKILL while it holds work; the others take that
work over once its lease has run out by the database's clock, and every file is processed exactly
once: one scan, one set of results, one report, one archived file.

Every file here is SYNTHETIC (seeded noise PNGs); the model is an untrained SYNTHETIC small CNN.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from dicom_factory import write_png
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from daemon_harness import TASK, Daemons, Layout, RunningDaemon, files_under, sha, wait_until
from daemon_rows import dead_pid, inbox_file, stages_run_twice
from meddaemon.daemon import claims, lease
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.models import DaemonInstance, DuplicateArrival, InboxClaim, Report, Result, Scan, ScanEvent
from model_factory import promote_into, write_model
from tcp_proxy import tcp_proxy

#: alone: the daemons here hold leases of a few seconds; beside another test's daemons on two cores, a
#: daemon starting up went 3 s without a heartbeat and was declared lost before the test's moment.
#: Alone on two slow cores (2 GHz, where the suite took 25 min), a daemon loading its model was still
#: declared lost on a lease of 2 s: the leases are 6 and 4 s
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.alone]

FILES = 240
LEASE_SECONDS = 6.0
BUSI_LABELS = 3


@pytest.fixture
def shared_db(postgres_url: str, layout: Layout, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The shared database, migrated, with a SYNTHETIC busi model promoted in the shared registry."""
    promote_into(postgres_url, layout.state / "models", write_model(tmp_path / "model"))
    engine = create_db_engine(postgres_url)
    yield session_factory(engine)
    engine.dispose()


def fill_inbox(inbox: Path, count: int) -> list[str]:
    """``count`` distinct SYNTHETIC PNGs under ``inbox/busi``; returns their names as received."""
    names = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8)
        write_png(inbox / TASK / f"synthetic_{i:05d}.png", pixels)
        names.append(f"{TASK}/synthetic_{i:05d}.png")
    return names


def start_farm(
    daemons: Daemons,
    url: str,
    count: int,
    lease: float = LEASE_SECONDS,
    rescan: float = 1.0,
    first_node: int = 1,
    **env: str,
) -> list[RunningDaemon]:
    """``count`` daemons on the shared inbox and database, nodes ``node-1``...; ``env`` adds
    settings (``db_lock_timeout_seconds="1"``: ``MEDDAEMON_DB_LOCK_TIMEOUT_SECONDS=1``)."""
    settings = {f"MEDDAEMON_{key.upper()}": value for key, value in env.items()}
    return [
        daemons.start(
            stable=0.3,
            rescan=rescan,
            workers=0,
            batch_size=16,
            extra=("--db", url),
            env={"MEDDAEMON_NODE": f"node-{i}", "MEDDAEMON_LEASE_SECONDS": str(lease), **settings},
        )
        for i in range(first_node, first_node + count)
    ]


def scalar(sessions: sessionmaker[Session], query):  # type: ignore[no-untyped-def]
    with sessions() as session:
        return session.scalar(query)


def kill_while_holding_work(victim: RunningDaemon, sessions: sessionmaker[Session]) -> tuple[int, set[str], set[int]]:
    """Freeze the victim (SIGSTOP) until the database shows it holding work, then SIGKILL it.
    Returns its daemon id, the inbox files and the scans it held. Held: claims not done, which only
    a takeover can finish (counting its done claims too, a victim holding nothing was killed, the
    others finished every file within its lease, and it was never declared lost).

    What it held is read again once the server has ended every session of the victim: a COMMIT it
    sent just before the freeze may not have been read by its server process yet (under CI's load
    that process can wait for a core longer than any pause), and the server runs it before it sees
    the connection closed. Read before, the claims that COMMIT released were counted as held. The
    second read may find nothing held: the test then still waits for the lease to run out."""
    deadline = time.monotonic() + 30
    running_statements = text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(:names) AND state = 'active'"
    )
    any_session = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY(:names)")
    while time.monotonic() < deadline:
        daemon_id = scalar(sessions, select(DaemonInstance.id).where(DaemonInstance.pid == victim.pid))
        # frozen only when it holds work already: each freeze pauses it for a quarter of a second
        # or more, and frozen at every look, it ran a twentieth of the time, its model still
        # loading, while the others took every file (CI: "the victim never held work")
        if daemon_id is not None and held_work(sessions, daemon_id) != (set(), set()):
            os.killpg(victim.pid, signal.SIGSTOP)
            time.sleep(0.2)  # a message already sent reaches its server process
            # its report process's too: a round it recorded just before releases the scans it held
            family = [victim.pid, *(p.pid for p in psutil.Process(victim.pid).children(recursive=True))]
            names = [f"meddaemon[{pid}]" for pid in family]
            busy = running_statements.bindparams(names=names)
            try:
                wait_until(
                    lambda busy=busy: scalar(sessions, busy) == 0,
                    30,
                    "the frozen victim's statements to finish at the server",
                    victim,
                )
            except pytest.fail.Exception as failed:
                pytest.fail(f"{failed.msg}\nstill active there: {active_statements(sessions, names)}")
            if held_work(sessions, daemon_id) != (set(), set()):
                victim.kill_hard()
                gone = any_session.bindparams(names=names)
                wait_until(
                    lambda gone=gone: scalar(sessions, gone) == 0,
                    30,
                    "the server to end the killed victim's sessions",
                    victim,
                )
                return daemon_id, *held_work(sessions, daemon_id)
            os.killpg(victim.pid, signal.SIGCONT)
        time.sleep(0.01)
    pytest.fail(f"the victim never held work; its log ends:\n{victim.tail()}")


def active_statements(sessions: sessionmaker[Session], names: list[str]) -> list[tuple[str, str, str]]:
    """What the sessions of these application names are running at the server, and waiting for: a
    failed wait says which statement a frozen daemon left running (one CI run timed out after 10 s)."""
    query = text(
        "SELECT left(query, 160), coalesce(wait_event_type, '') || ':' || coalesce(wait_event, ''), "
        "(now() - query_start)::text FROM pg_stat_activity WHERE application_name = ANY(:names) AND state = 'active'"
    ).bindparams(names=names)
    with sessions() as session:
        return [tuple(row) for row in session.execute(query)]  # type: ignore[misc]


def held_work(sessions: sessionmaker[Session], daemon_id: int) -> tuple[set[str], set[int]]:
    """The inbox files and the scans ``daemon_id`` holds, as committed."""
    with sessions() as session:
        held = (InboxClaim.daemon_id == daemon_id, InboxClaim.done_at.is_(None))
        paths = set(session.scalars(select(InboxClaim.path).where(*held)))
        scans = set(session.scalars(select(Scan.id).where(Scan.claimed_by == daemon_id)))
    return paths, scans


def test_three_daemons_process_every_file_once_and_take_over_from_one_killed(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    sessions = shared_db
    names = fill_inbox(layout.inbox, FILES)
    farm = start_farm(daemons, postgres_url, 3)
    wait_until(
        lambda: (scalar(sessions, select(func.count()).select_from(Scan)) or 0) >= FILES // 4,
        90,
        "a quarter of the files to be registered",
        farm[0],
    )

    victim_id, held_files, held_scans = kill_while_holding_work(farm[1], sessions)

    def all_archived_and_victim_lost() -> bool:
        """Every scan archived and put away: the victim may have committed an archive step and died
        before its move, which only the takeover after its lease finishes (a wait for the state alone
        stopped the others before it, and found the moves undone). The victim declared lost: when it
        held nothing at its death, the others may finish before its lease runs out."""
        archived = select(func.count()).select_from(Scan).where(Scan.state == "archived")
        unfinished = select(func.count()).select_from(Scan).where(Scan.pending_move_from.is_not(None))
        lost = select(DaemonInstance.state).where(DaemonInstance.id == victim_id)
        return (
            scalar(sessions, archived) == FILES
            and scalar(sessions, unfinished) == 0
            and scalar(sessions, lost) == "lost"
        )

    wait_until(all_archived_and_victim_lost, 180, f"all {FILES} scans archived and moved, the victim lost", farm[0])
    for daemon in (farm[0], farm[2]):
        daemon.signal(signal.SIGTERM)
    assert [farm[0].wait(60), farm[2].wait(60)] == [0, 0]

    with sessions() as session:
        scans = session.scalars(select(Scan)).all()
        twice = [
            (s.id, s.source_name, s.state, s.failure_reason, s.failure_message)
            for s in scans
            if Counter(x.source_name for x in scans)[s.source_name] > 1
        ]
        daemon_rows = [(d.id, d.node, d.state) for d in session.scalars(select(DaemonInstance))]
        assert sorted(s.source_name for s in scans) == names, f"not one scan per file: {twice[:6]} {daemon_rows}"
        assert session.scalar(select(func.count()).select_from(DuplicateArrival)) == 0
        assert session.scalar(select(func.count()).select_from(Result)) == FILES * BUSI_LABELS
        assert session.scalar(select(func.count()).select_from(Report).where(Report.kind == "scan")) == FILES
        steps = Counter(session.execute(select(ScanEvent.scan_id, ScanEvent.state)).all())
        assert stages_run_twice(session) == [], "no stage of any scan ran twice"
        inferred_by = Counter(
            detail.rsplit(" ", 1)[-1]
            for detail in session.scalars(select(ScanEvent.detail).where(ScanEvent.state == "inferred"))
        )
        assert all(steps[(s.id, "inferred")] == 1 for s in scans)
        assert all(s.claimed_by is None and s.pending_move_from is None for s in scans)
        assert all(c.done_at is not None for c in session.scalars(select(InboxClaim))), "no claim left open"
        victim = session.get(DaemonInstance, victim_id)
        survivors = session.scalars(select(DaemonInstance).where(DaemonInstance.id != victim_id)).all()

    assert victim.state == "lost"
    assert victim.stopped_at - victim.heartbeat_at >= LEASE_SECONDS, "taken over only after its lease ran out"
    assert {d.state for d in survivors} == {"stopped"}
    assert len(inferred_by) >= 2 and sum(inferred_by.values()) == FILES, f"the work was shared: {inferred_by}"
    held_names = {str(Path(p).relative_to(layout.inbox)) for p in held_files}
    assert held_names <= set(names)
    assert {s.id for s in scans if s.id in held_scans} == held_scans
    takeover = re.compile(
        rf"daemon {victim_id} \(node node-2, pid {farm[1].pid}\) is lost: its lease ran out; "
        r"released (\d+) scans and (\d+) inbox files \((\d+) kept for their committed moves\)"
    )
    found = [m for d in (farm[0], farm[2]) if (m := takeover.search(d.log_text()))]
    assert len(found) == 1, "one survivor logged the takeover"
    scans_released, files_dropped, files_kept = (int(n) for n in found[0].groups())
    # no more than it held: its inbox claims of files it never read go to the others before the lease
    # runs out (claim_unread_seconds), so the takeover may find fewer
    assert scans_released <= len(held_scans) and files_dropped + files_kept <= len(held_files), "what it held"

    archived = [p for p in files_under(layout.state / "archive") if p.suffix == ".png"]
    assert len(archived) == FILES and files_under(layout.inbox) == []
    assert files_under(layout.state / "work") == []


# -- a daemon that freezes: past its lease, inside a transaction; a lost daemon's unread files ------

SMALL = 60
#: short bounds for the frozen-daemon scenarios: a lease of 4 s, lock waits of 1 s, and the server
#: ending a session idle inside a transaction after 3 s
TIGHT = {"db_lock_timeout_seconds": "1", "db_idle_in_transaction_seconds": "3"}
TIGHT_LEASE = 4.0


def assert_each_file_once(sessions: sessionmaker[Session], layout: Layout, names: list[str]) -> None:
    """One scan per distinct content, each stage once, one report per scan whose PDF is the one its
    row and history name, every claim closed, nothing left in the inbox or in work/."""
    with sessions() as session:
        scans = session.scalars(select(Scan)).all()
        assert sorted(s.source_name for s in scans) == names
        assert len({s.sha256 for s in scans}) == len(names)
        assert {s.state for s in scans} == {"archived"}
        assert session.scalar(select(func.count()).select_from(Result)) == len(names) * BUSI_LABELS
        assert stages_run_twice(session) == [], "no stage of any scan ran twice"
        reported = select(ScanEvent.scan_id, ScanEvent.at).where(ScanEvent.state == "reported")
        reported_at = {scan_id: at for scan_id, at in session.execute(reported)}
        reports = session.scalars(select(Report).where(Report.kind == "scan")).all()
        assert sorted(r.scan_id for r in reports) == sorted(s.id for s in scans), "one report per scan"
        for report in reports:
            pdf = layout.stored_file(report.path)
            assert sha(pdf.read_bytes()) == report.sha256, "the PDF is the one its row names"
            written_apart = abs((report.created_at - reported_at[report.scan_id]).total_seconds())
            assert written_apart < 1.0, f"scan {report.scan_id}: its report was rewritten after it was reported"
        assert all(s.claimed_by is None and s.pending_move_from is None for s in scans)
        assert all(c.done_at is not None and c.daemon_id is None for c in session.scalars(select(InboxClaim)))
    assert files_under(layout.inbox) == [] and files_under(layout.state / "work") == []
    assert len([p for p in files_under(layout.state / "archive") if p.suffix == ".png"]) == len(names)
    assert [p for p in files_under(layout.state / "reports") if p.suffix != ".pdf"] == []


def daemon_id_of(sessions: sessionmaker[Session], daemon: RunningDaemon) -> int:
    wait_until(
        lambda: scalar(sessions, select(DaemonInstance.id).where(DaemonInstance.pid == daemon.pid)) is not None,
        60,
        "the daemon to register",
        daemon,
    )
    return scalar(sessions, select(DaemonInstance.id).where(DaemonInstance.pid == daemon.pid))


def freeze_when(victim: RunningDaemon, holding: Callable[[], bool], what: str, timeout: float = 60) -> float:
    """SIGSTOP the victim's process group at a moment ``holding`` is true while it is stopped: looked
    for while it runs, then stopped and looked at again, until both agree; returns the
    time.monotonic() it was frozen. (Stopped at every look, it ran a fraction of the time, and under
    CI's load the others had done every file before it was once caught in the act.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not holding():
            time.sleep(0.002)
            continue
        os.killpg(victim.pid, signal.SIGSTOP)
        if holding():
            return time.monotonic()
        os.killpg(victim.pid, signal.SIGCONT)
    pytest.fail(f"the victim never was {what}; its log ends:\n{victim.tail()}")


def finish_and_stop(
    farm: list[RunningDaemon],
    victim: RunningDaemon,
    sessions: sessionmaker[Session],
    count: int,
    wake: Callable[[], None] | None = None,
) -> int:
    """Wait for the others to declare the victim lost and archive every scan, wake the victim up
    (``wake``; SIGCONT by default), and stop them all; returns the victim's exit code."""
    survivor = next(d for d in farm if d is not victim)
    victim_state = select(DaemonInstance.state).where(DaemonInstance.pid == victim.pid)
    wait_until(lambda: scalar(sessions, victim_state) == "lost", 60, "the victim to be declared lost", survivor)
    wait_until(
        lambda: scalar(sessions, select(func.count()).select_from(Scan).where(Scan.state == "archived")) == count,
        120,
        f"all {count} scans to be archived by the others",
        survivor,
    )
    if wake is not None:
        wake()
    os.killpg(victim.pid, signal.SIGCONT)
    code = victim.wait(60)
    for daemon in farm:
        if daemon is not victim:
            daemon.signal(signal.SIGTERM)
    assert [d.wait(60) for d in farm if d is not victim] == [0] * (len(farm) - 1)
    return code


def test_a_daemon_stopped_past_its_lease_wakes_up_and_writes_nothing_for_the_scans_taken_over(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    """SIGSTOP while its report process holds scans to report, SIGCONT after the others have
    reported and archived them: no report row, PDF, result or move of it counts, and it exits 4.
    The victim starts alone and the others once it is frozen: started together, a victim slower to
    start than its peers found every scan reported by them and was never caught holding one."""
    sessions = shared_db
    names = fill_inbox(layout.inbox, SMALL)
    [victim] = start_farm(daemons, postgres_url, 1, lease=TIGHT_LEASE, first_node=2, **TIGHT)
    victim_id = daemon_id_of(sessions, victim)

    def reporting() -> bool:
        held = select(func.count()).select_from(Scan).where(Scan.claimed_by == victim_id, Scan.state == "inferred")
        return (scalar(sessions, held) or 0) > 0

    freeze_when(victim, reporting, "holding scans to report")
    others = [
        *start_farm(daemons, postgres_url, 1, lease=TIGHT_LEASE, first_node=1, **TIGHT),
        *start_farm(daemons, postgres_url, 1, lease=TIGHT_LEASE, first_node=3, **TIGHT),
    ]
    code = finish_and_stop([*others, victim], victim, sessions, SMALL)

    assert code == 4, victim.tail()
    assert scalar(sessions, select(DaemonInstance.state).where(DaemonInstance.id == victim_id)) == "lost"
    assert_each_file_once(sessions, layout, names)


def test_a_daemon_frozen_inside_a_transaction_is_declared_lost_within_its_lease_and_the_timeouts(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    """SIGSTOP at a moment its connection is idle inside a transaction that wrote (and so holds
    FOR KEY SHARE on its daemon row): the server ends that session after the idle timeout, the
    others declare it lost after its lease and finish every file; woken up, it exits 4."""
    sessions = shared_db
    names = fill_inbox(layout.inbox, 2 * SMALL)  # work enough to catch it inside a transaction
    farm = start_farm(daemons, postgres_url, 3, lease=TIGHT_LEASE, **TIGHT)
    victim = farm[0]
    victim_id = daemon_id_of(sessions, victim)
    in_transaction = text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
        " AND state = 'idle in transaction' AND backend_xid IS NOT NULL"
    )

    def inside_a_transaction() -> bool:
        with sessions() as session:
            return bool(session.scalar(in_transaction, {"name": f"meddaemon[{victim.pid}]"}))

    frozen_at = freeze_when(victim, inside_a_transaction, "inside a transaction that wrote")
    wait_until(
        lambda: scalar(sessions, select(DaemonInstance.state).where(DaemonInstance.id == victim_id)) == "lost",
        30,
        "the frozen daemon to be declared lost",
        farm[1],
    )
    declared_after = time.monotonic() - frozen_at
    bound = TIGHT_LEASE + float(TIGHT["db_idle_in_transaction_seconds"]) + float(TIGHT["db_lock_timeout_seconds"])
    assert declared_after < bound + 3.0, f"declared lost {declared_after:.1f} s after it froze"
    idle_timeout = float(TIGHT["db_idle_in_transaction_seconds"])
    # declared lost on its lease, it may be before the server's idle timeout has ended its session
    wait_until(
        lambda: not inside_a_transaction(),
        max(0.0, frozen_at + idle_timeout + 3.0 - time.monotonic()),
        "the server to end the frozen daemon's transaction after its idle timeout",
        farm[1],
    )

    code = finish_and_stop(farm, victim, sessions, 2 * SMALL)

    assert code == 4, victim.tail()
    assert_each_file_once(sessions, layout, names)


def test_a_lost_daemons_unread_inbox_files_are_taken_at_once_not_at_the_next_rescan(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    """A daemon (a row here) claimed files and was lost before reading them; the daemon that
    declares it lost rescans the inbox then, although its rescans are 300 s apart."""
    sessions = shared_db
    names = fill_inbox(layout.inbox, 12)
    with transaction(sessions) as session:
        ghost = lease.register(session, "node-ghost", lease_seconds=TIGHT_LEASE, pid=dead_pid())
        claims.claim_inbox_files(session, ghost.daemon_id, [inbox_file(layout.inbox / name) for name in names])
    [daemon] = start_farm(daemons, postgres_url, 1, lease=TIGHT_LEASE, rescan=300.0)
    ready_since = None  # the ghost beats until the daemon has found the files held, then falls silent
    while ready_since is None or time.monotonic() - ready_since < 1.5:
        with transaction(sessions) as session:
            assert lease.heartbeat(session, ghost), daemon.tail()
        if ready_since is None and "report process started" in daemon.log_text():  # then its first rescan
            ready_since = time.monotonic()
        time.sleep(0.2)
    assert scalar(sessions, select(func.count()).select_from(Scan)) == 0, "the files were all held"
    started = time.monotonic()

    wait_until(
        lambda: scalar(sessions, select(func.count()).select_from(Scan).where(Scan.state == "archived")) == len(names),
        60,
        "the lost daemon's files to be processed",
        daemon,
    )
    assert time.monotonic() - started < 60 < 300
    assert "rescanning the inbox now" in daemon.log_text()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    assert_each_file_once(sessions, layout, names)


def test_a_daemon_cut_off_by_a_silent_partition_is_declared_lost_and_writes_nothing_when_it_returns(
    layout: Layout, daemons: Daemons, shared_db: sessionmaker[Session], postgres_url: str
):
    """One daemon reaches the database through a TCP proxy that is frozen (no reset, no FIN) while
    the daemon holds work: the others declare it lost after its lease and finish every file; when
    the network comes back it finds itself lost, writes nothing for the scans taken over, exits 4."""
    sessions = shared_db
    names = fill_inbox(layout.inbox, SMALL)
    database = make_url(postgres_url)
    with tcp_proxy((database.host or "127.0.0.1", database.port or 5432)) as proxy:
        through_proxy = database.set(port=proxy.port).render_as_string(hide_password=False)
        # the others start once the victim holds work: started together, on a loaded machine they
        # could take every file while the victim, frozen most of the time by the probe below, held none
        victim = start_farm(daemons, through_proxy, 1, lease=TIGHT_LEASE, **TIGHT)[0]
        victim_id = daemon_id_of(sessions, victim)

        def holding_work() -> bool:
            proxy.freeze()
            time.sleep(0.2)  # a commit the proxy forwarded just before lands first (it may release the scans)
            held = select(func.count()).select_from(Scan).where(Scan.claimed_by == victim_id)
            if (scalar(sessions, held) or 0) > 0:
                return True
            proxy.thaw()
            return False

        wait_until(holding_work, 60, "the victim to hold scans", victim, every=0.02)
        farm = [victim, *start_farm(daemons, postgres_url, 2, lease=TIGHT_LEASE, first_node=2, **TIGHT)]
        code = finish_and_stop(farm, victim, sessions, SMALL, wake=proxy.thaw)

    assert code == 4, victim.tail()
    assert scalar(sessions, select(DaemonInstance.state).where(DaemonInstance.id == victim_id)) == "lost"
    assert_each_file_once(sessions, layout, names)
