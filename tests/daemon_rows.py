"""Rows for the tests of daemons sharing a database: members registered, lost daemons looked for,
SYNTHETIC scan rows (made-up hashes and names, no image behind them)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.daemon import lease
from meddaemon.daemon.stability import Signature, StableFile
from meddaemon.db.engine import transaction
from meddaemon.db.models import DaemonInstance, Scan, ScanEvent
from meddaemon.states import ScanState


def join(  # type: ignore[no-untyped-def]
    sessions, node: str = "node-a", lease_seconds: float = 30.0, pid: int | None = None, namespace: str | None = None
) -> lease.Member:
    with transaction(sessions) as session:
        return lease.register(session, node, lease_seconds, pid, namespace)


def look_for_lost(sessions, member: lease.Member) -> list[lease.LostDaemon]:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        return lease.release_lost(session, member)


def daemon_row(sessions, member: lease.Member) -> DaemonInstance:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return session.get(DaemonInstance, member.daemon_id)


def add_scan(session: Session, n: int, state: ScanState = ScanState.ROUTED, **columns: object) -> Scan:
    """A SYNTHETIC scan row, number ``n``, of task busi; ``columns`` override the defaults."""
    values: dict[str, object] = {
        "sha256": f"{n:064x}",
        "state": state,
        "task_name": "busi",
        "source_name": f"busi/synthetic_{n}.png",
        "stored_path": f"/synthetic/work/{n}.png",
    }
    scan = Scan(**{**values, **columns})
    session.add(scan)
    session.flush()
    return scan


def inbox_file(path: Path, inode: int = 1, ctime_ns: int = 1_700_000_000_000_000_000) -> StableFile:
    """A stable inbox file as the tracker hands it over (SYNTHETIC: nothing on disk)."""
    now = datetime.now(UTC)
    return StableFile(path, Signature(100, 1_700_000_000_000_000_000, inode, ctime_ns), now, now)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def stages_run_twice(session: Session) -> list[tuple[int, str]]:
    """The (scan, state) steps recorded more than once. A scan read while its task's model was still
    loading is routed, waits (``waiting_model``) and is routed again once the model is served: that
    second ``routed`` is the one repeat allowed."""
    steps = Counter(session.execute(select(ScanEvent.scan_id, ScanEvent.state)).all())
    waited = {(scan_id, ScanState.ROUTED.value) for scan_id, state in steps if state == ScanState.WAITING_MODEL}
    return [step for step, n in steps.items() if n > 1 and not (n == 2 and step in waited)]
