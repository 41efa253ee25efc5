"""Several daemons on one PostgreSQL database and one inbox (DESIGN.md section 9), as real processes.

Three daemons, each under its own node name as if on three hosts, share the inbox, the state
directory and the database. One is killed with SIGKILL while it holds work; the others take that
work over once its lease has run out by the database's clock, and every file is processed exactly
once: one scan, one set of results, one report, one archived file.

Every file here is SYNTHETIC (seeded noise PNGs); the model is an untrained SYNTHETIC small CNN.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from daemon_harness import TASK, Daemons, Layout, RunningDaemon, files_under, wait_until
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import DaemonInstance, DuplicateArrival, InboxClaim, Report, Result, Scan, ScanEvent
from model_factory import promote_into, write_model

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

FILES = 240
LEASE_SECONDS = 3.0
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


def start_farm(daemons: Daemons, url: str, count: int) -> list[RunningDaemon]:
    return [
        daemons.start(
            stable=0.3,
            rescan=1.0,
            workers=0,
            batch_size=16,
            extra=("--db", url),
            env={"MEDDAEMON_NODE": f"node-{i + 1}", "MEDDAEMON_LEASE_SECONDS": str(LEASE_SECONDS)},
        )
        for i in range(count)
    ]


def scalar(sessions: sessionmaker[Session], query):  # type: ignore[no-untyped-def]
    with sessions() as session:
        return session.scalar(query)


def kill_while_holding_work(victim: RunningDaemon, sessions: sessionmaker[Session]) -> tuple[int, set[str], set[int]]:
    """Freeze the victim (SIGSTOP) until the database shows it holding work, then SIGKILL it.
    Returns its daemon id, the inbox files and the scans it held."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        daemon_id = scalar(sessions, select(DaemonInstance.id).where(DaemonInstance.pid == victim.pid))
        if daemon_id is not None:
            os.killpg(victim.pid, signal.SIGSTOP)
            with sessions() as session:
                paths = set(session.scalars(select(InboxClaim.path).where(InboxClaim.daemon_id == daemon_id)))
                scans = set(session.scalars(select(Scan.id).where(Scan.claimed_by == daemon_id)))
            if paths or scans:
                victim.kill_hard()
                return daemon_id, paths, scans
            os.killpg(victim.pid, signal.SIGCONT)
        time.sleep(0.05)
    pytest.fail(f"the victim never held work; its log ends:\n{victim.tail()}")


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

    def all_archived() -> bool:
        return scalar(sessions, select(func.count()).select_from(Scan).where(Scan.state == "archived")) == FILES

    wait_until(all_archived, 180, f"all {FILES} scans to be archived", farm[0])
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
        inferred_by = Counter(
            detail.rsplit(" ", 1)[-1]
            for detail in session.scalars(select(ScanEvent.detail).where(ScanEvent.state == "inferred"))
        )
        assert set(steps.values()) == {1}, "no stage of any scan ran twice"
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
    takeover = f"daemon {victim_id} (node node-2, pid {farm[1].pid}) is lost: its lease ran out"
    assert any(takeover in d.log_text() for d in (farm[0], farm[2])), "a survivor logged the takeover"

    archived = [p for p in files_under(layout.state / "archive") if p.suffix == ".png"]
    assert len(archived) == FILES and files_under(layout.inbox) == []
    assert files_under(layout.state / "work") == []
