"""Daemons sharing one database: who is running, kept alive by heartbeats in database time.

Each daemon process registers a row in ``daemons`` at start and refreshes ``heartbeat_at`` from a
thread every quarter of its lease. Any daemon may declare another ``lost`` and release its claims
(``claims.release_daemons``) once that daemon's heartbeat is older than its lease *by the database's
clock*, so a node with a wrong clock cannot steal live work or keep dead work. On its own node a
daemon needs no lease to see that another has died: a row whose process is gone (killed with -9,
or this very process started a daemon before) is lost at once, so a restart takes over without
waiting.

A daemon that finds itself declared lost (it stalled past its lease: a frozen VM, a long swap)
must stop: its claims now belong to others. ``LeaseKeeper.lost`` tells the main loop so; every
commit is also fenced by the claims, so work it finishes meanwhile is not stored twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon import __version__
from meddaemon.config import Settings
from meddaemon.daemon import claims
from meddaemon.daemon.outage import OutageGuard, is_outage
from meddaemon.db.clock import db_clock
from meddaemon.db.engine import ConnectionLimits, is_lock_error, transaction, with_lock_retry
from meddaemon.db.models import DaemonInstance
from meddaemon.processes import process_alive

log = logging.getLogger("meddaemon.lease")

RUNNING, STOPPED, LOST = "running", "stopped", "lost"
#: heartbeats per lease: a daemon survives three missed beats before it can be declared lost
BEATS_PER_LEASE = 4


@dataclass(frozen=True)
class Member:
    """This daemon's registration."""

    daemon_id: int
    node: str
    pid: int
    lease_seconds: float
    pid_namespace: str | None = None


@dataclass(frozen=True)
class LostDaemon:
    daemon_id: int
    node: str
    pid: int
    why: str
    released: claims.Released


@dataclass(frozen=True)
class RunningDaemon:
    """A daemon marked running, as the database's clock sees it now (health, metrics, the web console)."""

    id: int
    node: str
    pid: int
    version: str
    lease_seconds: float
    #: seconds since its last heartbeat, by the database's clock
    heartbeat_age: float
    #: the PID namespace its pid is of (None: not known)
    pid_namespace: str | None = None

    @property
    def alive(self) -> bool:
        """Its lease still runs; past it, any other daemon may declare it lost."""
        return self.heartbeat_age < self.lease_seconds


def running_daemons(session: Session) -> list[RunningDaemon]:
    """Every daemon marked running, in the order they joined, each with its heartbeat's age."""
    rows = session.execute(
        select(
            DaemonInstance.id,
            DaemonInstance.node,
            DaemonInstance.pid,
            DaemonInstance.version,
            DaemonInstance.lease_seconds,
            db_clock() - DaemonInstance.heartbeat_at,
            DaemonInstance.pid_namespace,
        )
        .where(DaemonInstance.state == RUNNING)
        .order_by(DaemonInstance.id)
    )
    return [
        RunningDaemon(int(i), str(n), int(p), str(v), float(lease), float(age), namespace)
        for i, n, p, v, lease, age, namespace in rows
    ]


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The bounds on the waits of a daemon's PostgreSQL connections (``db_*_seconds`` settings)."""
    keepalive = settings.db_keepalive_seconds
    return ConnectionLimits(
        lock_timeout=settings.db_lock_timeout_seconds,
        idle_in_transaction=settings.db_idle_in_transaction_seconds,
        keepalive=keepalive,
        # a silent server is given up on as the keepalives give up on a vanished one, with room to
        # spare, and never before a statement's lock wait is over (that is a lock error, retried)
        connect_timeout=2 * keepalive,
        answer_timeout=max(6 * keepalive, 2 * settings.db_lock_timeout_seconds) if keepalive > 0 else 0.0,
    )


def node_name(configured: str = "") -> str:
    """The name daemons on one machine share: the ``node`` setting, else the host name."""
    return configured or socket.gethostname()


def pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``), None where there is no such thing."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def register(
    session: Session, node: str, lease_seconds: float, pid: int | None = None, namespace: str | None = None
) -> Member:
    """``pid`` and ``namespace`` default to this process's (tests name other ones)."""
    pid = os.getpid() if pid is None else pid
    namespace = pid_namespace() if namespace is None else namespace
    daemon_id = session.scalar(
        insert(DaemonInstance)
        .values(
            node=node,
            pid=pid,
            pid_namespace=namespace,
            version=__version__,
            state=RUNNING,
            lease_seconds=lease_seconds,
            started_at=db_clock(),
            heartbeat_at=db_clock(),
        )
        .returning(DaemonInstance.id)
    )
    assert daemon_id is not None
    return Member(daemon_id, node, pid, lease_seconds, namespace)


def heartbeat(session: Session, member: Member) -> bool:
    """Renew the lease; False when this daemon has been declared lost (or stopped) meanwhile."""
    renewed = session.execute(
        update(DaemonInstance)
        .where(DaemonInstance.id == member.daemon_id, DaemonInstance.state == RUNNING)
        .values(heartbeat_at=db_clock())
    )
    return renewed.rowcount == 1  # type: ignore[attr-defined]


def declared_lost(session: Session, member: Member) -> bool:
    return session.scalar(select(DaemonInstance.state).where(DaemonInstance.id == member.daemon_id)) == LOST


def sign_off(session: Session, member: Member) -> None:
    """A clean stop: the claims go back at once, nobody has to wait for the lease."""
    session.execute(
        update(DaemonInstance)
        .where(DaemonInstance.id == member.daemon_id, DaemonInstance.state == RUNNING)
        .values(state=STOPPED, stopped_at=db_clock())
    )
    claims.release_daemons(session, [member.daemon_id])


def release_lost(session: Session, member: Member, pid_alive: Callable[[int], bool] | None = None) -> list[LostDaemon]:
    """Declare lost every running daemon whose lease has run out by the database's clock, and those
    on this node (and in this PID namespace) whose process is gone; release what they held, and
    what daemons no longer running still hold (a claim racing the declaration: begun before it,
    committed after). Rows another daemon is checking right now are skipped (``SKIP LOCKED``),
    never waited for.

    The rows are locked ``FOR NO KEY UPDATE``, which does not conflict with the ``FOR KEY SHARE``
    that every claim of a daemon takes on its row (the foreign keys to ``daemons``): a daemon frozen
    inside a claiming transaction is judged like any other, not skipped for as long as it is frozen."""
    pid_alive = pid_alive or process_alive
    expired = DaemonInstance.heartbeat_at + DaemonInstance.lease_seconds < db_clock()
    same_node = and_(
        DaemonInstance.node == member.node,
        DaemonInstance.pid_namespace == member.pid_namespace,  # NULL (unknown) never matches
        DaemonInstance.id != member.daemon_id,
    )
    candidates = session.execute(
        select(DaemonInstance.id, DaemonInstance.node, DaemonInstance.pid, expired.label("expired"))
        .where(DaemonInstance.state == RUNNING, DaemonInstance.id != member.daemon_id)
        .where(or_(expired, same_node))
        .with_for_update(skip_locked=True, key_share=True)
    ).all()
    lost: list[tuple[int, str, int, str]] = []
    for daemon_id, node, pid, is_expired in candidates:
        if is_expired:
            lost.append((daemon_id, node, pid, "its lease ran out"))
        elif pid == member.pid or not pid_alive(pid):
            lost.append((daemon_id, node, pid, f"process {pid} on this node is gone"))
    if lost:
        session.execute(
            update(DaemonInstance)
            .where(DaemonInstance.id.in_([d[0] for d in lost]), DaemonInstance.state == RUNNING)
            .values(state=LOST, stopped_at=db_clock())
        )
    found = [
        LostDaemon(daemon_id, node, pid, why, claims.release_daemons(session, [daemon_id]))
        for daemon_id, node, pid, why in lost
    ]
    late = claims.held_by_the_gone(session)
    if late:  # claimed after the release, by a daemon waking up mid-turn
        rows = session.execute(
            select(DaemonInstance.id, DaemonInstance.node, DaemonInstance.pid).where(DaemonInstance.id.in_(late))
        ).all()
        why = "it claimed work after it was declared lost or stopped"
        found += [LostDaemon(d, node, pid, why, claims.release_daemons(session, [d])) for d, node, pid in rows]
    return found


def log_lost(found: list[LostDaemon]) -> None:
    for daemon in found:
        log.warning(
            "daemon %d (node %s, pid %d) is lost: %s; released %d scans and %d inbox files "
            "(%d kept for their committed moves)",
            daemon.daemon_id,
            daemon.node,
            daemon.pid,
            daemon.why,
            daemon.released.scans,
            daemon.released.inbox_files,
            daemon.released.kept_for_moves,
        )


class LeaseKeeper:
    """The heartbeat thread: renews the lease every ``lease / BEATS_PER_LEASE`` seconds while the
    main loop shows it is alive (``tick``); beside it, a thread that looks for lost daemons as often
    and releases their claims. Two threads: a look waits on other processes' locks (each statement up
    to the lock timeout, and a look has several), and one heartbeat thread doing both went a whole
    10 s lease without renewing under a DBA's table lock on scans: a live daemon declared lost.

    A main loop that stops ticking for ``stall_seconds`` (stuck: a hung mount, a deadlock) stops the
    heartbeats too: its work is then taken over instead of being held forever. The heartbeats are
    not tied to each turn of the loop, so a long model load or forward pass does not lose the lease.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        member: Member,
        stall_seconds: float = 300.0,
        outage: OutageGuard | None = None,
    ) -> None:
        self.sessions = sessions
        #: the daemon's view of the database: heartbeats that fail for want of it are reported there
        #: (logged once per outage, not at every beat)
        self.outage = outage
        self.member = member
        self.stall_seconds = max(stall_seconds, member.lease_seconds)
        self.lost = threading.Event()
        #: set when lost daemons' inbox files were released: the main loop rescans the inbox at once
        self.inbox_released = threading.Event()
        self.stop_requested = threading.Event()
        self.last_tick = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(self.renew,), name="meddaemon-lease", daemon=True)
        self.looker = threading.Thread(
            target=self._run, args=(self.look_for_lost,), name="meddaemon-lost-daemons", daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        self.looker.start()

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def stop(self, wait_seconds: float = 10.0) -> None:
        """Stop the heartbeats, waiting up to ``wait_seconds`` for one in progress (the thread is a
        daemon thread: one still waiting on the database then ends with the process)."""
        self.stop_requested.set()
        deadline = time.monotonic() + wait_seconds
        for thread in (self.thread, self.looker):
            if thread.ident is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def beat(self) -> None:
        """One heartbeat, then one look for lost daemons (the threads' steps, in turn; tests call it)."""
        self.renew()
        if not self.lost.is_set():
            self.look_for_lost()

    def _stalled(self) -> bool:
        return time.monotonic() - self.last_tick > self.stall_seconds

    def renew(self) -> bool:
        """One heartbeat, unless the main loop has stalled; True when it was written. A lease found
        taken sets ``lost``."""
        if self._stalled():
            log.error("the main loop has not moved for %.0f s: heartbeats paused", self.stall_seconds)
            return False

        def renew() -> bool:
            with transaction(self.sessions) as session:
                return heartbeat(session, self.member)

        if not with_lock_retry(renew, should_stop=self.stop_requested.is_set):
            log.error(
                "this daemon (%d) was declared lost by another: its claims are gone; stopping",
                self.member.daemon_id,
            )
            self.lost.set()
            return False
        return True

    def try_a_beat(self) -> bool:
        """One heartbeat, not waiting past the database's own busy timeout for a lock held
        elsewhere (the loop's probe of an unwritable database: ``Daemon._probe_a_write``, which must
        neither hang on a lock nor keep a stop waiting); True when it was written. A lease found
        taken sets ``lost``. Raises the database's error (an outage), lock errors aside."""
        try:
            with transaction(self.sessions) as session:
                renewed = heartbeat(session, self.member)
        except OperationalError as exc:
            if is_lock_error(exc):
                return False
            raise
        if not renewed:
            self.lost.set()
        return renewed

    def look_for_lost(self) -> None:
        """One look for lost daemons, releasing their claims (not while the main loop has stalled:
        its own work is then about to be taken over)."""
        if self._stalled():
            return

        def look() -> list[LostDaemon]:
            with transaction(self.sessions) as session:
                claims.forget_finished(session)
                return release_lost(session, self.member)

        try:
            found = look()
        except OperationalError as exc:
            if not is_lock_error(exc):
                raise
            log.info("looking for lost daemons met a lock held elsewhere; again at the next heartbeat")
            return
        log_lost(found)
        if any(d.released.inbox_files for d in found):
            self.inbox_released.set()

    def _run(self, step: Callable[[], object]) -> None:
        """``step`` (``renew`` or ``look_for_lost``) ``interval`` apart from start to start: a step
        that waits on a lock delays the next by that wait, not by the wait and a whole interval more."""
        interval = self.member.lease_seconds / BEATS_PER_LEASE
        pause = interval
        while not self.stop_requested.wait(pause) and not self.lost.is_set():
            started = time.monotonic()
            try:
                wrote = step() is True  # a heartbeat written (``renew``), not a look (``look_for_lost``)
            except Exception as exc:  # the database away for a moment: try again at the next beat
                if self.outage is not None and is_outage(exc):
                    self.outage.failed(exc)
                else:
                    what = "heartbeat" if step == self.renew else "looking for lost daemons"
                    log.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__, interval)
            else:
                if self.outage is not None:
                    self.outage.succeeded(wrote=wrote)
            pause = max(0.0, interval - (time.monotonic() - started))
