"""The outbox: one row per DICOM object and destination, and what became of its delivery.

- Rows are added in the transaction of the state step that makes their object due (``enqueue``).
- A sender claims due rows (``claim_due``: pending, their time come, held by nobody, by itself, or
  by a daemon gone, stopped or lost, for ``takeover_seconds``: the destinations' longest timeout,
  after which that daemon's sender has given up the object in hand, and 5 s; only while its own
  daemon runs, and it stops before each object once that daemon is declared lost), sends, and records each
  answer in a transaction of its own: ``delivered`` as the peer acknowledges it, never sent again
  after that commit; a failure counts an attempt and sets the next one after an exponential backoff
  with jitter; ``dead`` after ``max_attempts`` failures or a permanent refusal, with what the peer said.
- A crash between the acknowledgement and its commit sends the object again: the same bytes, the
  same SOP Instance UID, which a PACS stores once.
- A daemon starting where no other runs makes the rows for destinations it does not configure
  ``dead`` (``settle_unconfigured``), also where it configures none and runs no sender.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import threading
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon.claims import still_running
from meddaemon.db.clock import db_clock, read_db_clock
from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import DaemonInstance, OutboxItem
from meddaemon.dicom.senders import NOT_SENT, Delivery, Sender, make_sender
from meddaemon.processes import child_runs, leave_stopping_to_the_parent, start_child, stop_child
from meddaemon.stored_paths import stored_file

log = logging.getLogger("meddaemon.outbox")

#: added to the destinations' longest timeout: the recording of the last answer of a sender whose
#: daemon is gone, before another daemon may take what it held
TAKEOVER_SLACK = 5.0
#: how often a sender process looks whether its daemon was declared lost (well within the slack)
WATCH_SECONDS = 1.0
T = TypeVar("T")
#: how long an idle sender waits before looking for due rows again (s)
POLL_SECONDS = 0.25

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
STATUSES = (PENDING, DELIVERED, DEAD)


@dataclass(frozen=True)
class NewItem:
    object_key: str
    destination: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    path: str | None = None
    #: set for an object that could not be made: the row is born ``dead`` with this reason
    error: str | None = None


@dataclass(frozen=True)
class Backoff:
    base_seconds: float
    max_seconds: float
    max_attempts: int

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds before attempt ``attempts + 1``: base x 2^(attempts-1) times 0.5-1.5, at most
        ``max_seconds`` (the cap after the jitter: before it, a wait reached 1.5 times the cap)."""
        raw = self.base_seconds * 2 ** max(0, attempts - 1)
        return min(self.max_seconds, raw * (0.5 + (rng or random).random()))


@dataclass(frozen=True)
class Claimed:
    id: int
    scan_id: int
    object_key: str
    destination: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    path: str
    attempts: int


def enqueue(session: Session, scan_id: int, items: Collection[NewItem]) -> int:
    """Add the rows not there yet (a replay adds nothing); returns how many were added."""
    have = set(
        session.execute(
            select(OutboxItem.object_key, OutboxItem.destination).where(OutboxItem.scan_id == scan_id)
        ).all()
    )
    now = read_db_clock(session)
    added = 0
    for item in items:
        if (item.object_key, item.destination) in have:
            continue
        have.add((item.object_key, item.destination))
        session.add(
            OutboxItem(
                scan_id=scan_id,
                object_key=item.object_key,
                destination=item.destination,
                sop_class_uid=item.sop_class_uid,
                sop_instance_uid=item.sop_instance_uid,
                path=item.path,
                status=DEAD if item.error else PENDING,
                attempts=0,
                created_at=now,
                pending_since=now,
                next_attempt_at=now,
                last_error=item.error,
            )
        )
        added += 1
    session.flush()
    return added


def in_hand_seconds(settings: Settings) -> float:
    """How long a sender whose daemon is gone may go on with the object in hand: then it leaves
    (``_process_main``). Each stage of a send has its own bound (the connection, the association's
    answer, each write, the C-STORE's answer), and together they may take several times this."""
    return max((d.timeout_seconds for d in settings.destination), default=0.0)


def takeover_seconds(settings: Settings) -> float:
    """How long after a daemon was found gone its claims are taken: its sender has left by then."""
    return in_hand_seconds(settings) + TAKEOVER_SLACK


def _claimable(daemon_id: int | None, takeover_seconds: float) -> Any:
    """Free rows, this daemon's, and those of a daemon gone for ``takeover_seconds``: a daemon
    killed alone leaves its sender process finishing the object in hand (``_process_main``), which
    a successor taking its claims at once would send a second time."""
    gone = select(DaemonInstance.id).where(
        DaemonInstance.state != "running",
        or_(DaemonInstance.stopped_at.is_(None), DaemonInstance.stopped_at <= db_clock() - takeover_seconds),
    )
    free = or_(OutboxItem.claimed_by.is_(None), OutboxItem.claimed_by.in_(gone))
    return free if daemon_id is None else or_(free, OutboxItem.claimed_by == daemon_id)


def claim_due(
    session: Session,
    daemon_id: int | None,
    limit: int,
    destinations: Collection[str] | None = None,
    takeover_seconds: float = 0.0,
) -> list[Claimed]:
    """Up to ``limit`` pending rows whose time has come, oldest first, claimed for ``daemon_id``
    while it is running; those a stopped or lost daemon held, once it is gone for ``takeover_seconds``."""
    query = (
        select(OutboxItem)
        .where(OutboxItem.status == PENDING, OutboxItem.next_attempt_at <= db_clock())
        .where(_claimable(daemon_id, takeover_seconds))
        .where(still_running(daemon_id))
        .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if destinations is not None:
        query = query.where(OutboxItem.destination.in_(list(destinations)))
    claimed = []
    for row in session.scalars(query):
        row.claimed_by = daemon_id
        claimed.append(
            Claimed(
                row.id,
                row.scan_id,
                row.object_key,
                row.destination,
                row.sop_class_uid,
                row.sop_instance_uid,
                row.path or "",
                row.attempts,
            )
        )
    return claimed


def record_delivered(session: Session, item_ids: Collection[int], detail: str | None = None) -> int:
    """The peer acknowledged the objects: ``delivered``, whoever held the claim (they arrived); one
    statement for a round's objects. Returns how many were still pending."""
    if not item_ids:
        return 0
    done = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id.in_(list(item_ids)), OutboxItem.status == PENDING)
        .values(
            status=DELIVERED,
            delivered_at=db_clock(),
            attempts=OutboxItem.attempts + 1,
            claimed_by=None,
            last_error=detail,
        )
    )
    return int(done.rowcount)  # type: ignore[attr-defined]


def record_failure(
    session: Session,
    item_id: int,
    error: str,
    permanent: bool,
    backoff: Backoff,
    holder: int | None,
    rng: random.Random | None = None,
) -> str | None:
    """One failed attempt of ``holder``'s: ``dead`` when refused for good or out of attempts, else
    pending again after a backoff. Returns the new status; None when the row was no longer pending,
    or no longer ``holder``'s (a daemon declared lost, whose claim another took over: its late
    failure would count an attempt, back off or kill a row the other is delivering)."""
    row = session.get(OutboxItem, item_id, with_for_update=True)
    if row is None or row.status != PENDING or row.claimed_by != holder:
        return None
    row.attempts += 1
    row.last_error = error[:2000]
    row.claimed_by = None
    if permanent or row.attempts >= backoff.max_attempts:
        row.status = DEAD
        row.next_attempt_at = read_db_clock(session)  # a dead row's says when it went dead (``recently_dead``)
    else:
        row.next_attempt_at = read_db_clock(session) + backoff.delay(row.attempts, rng)
    return row.status


def settle_unconfigured(session: Session, configured: Collection[str], daemon_id: int) -> dict[str, int]:
    """Pending rows for a destination these settings do not configure: ``dead``, as a sender does
    with those it claims ("not configured"), also where no destination is configured and no sender
    runs, so that their scans are archived instead of waiting for ever. Called once ``daemon_id``
    has registered (and found the daemons of its node that are gone), and only where no other
    daemon runs: daemons sharing a database may configure different destinations (one host sending
    for all), and another's rows are its to send. The rows of a gone daemon are settled too: making
    a row dead sends nothing (a sender of it still finishing an object records nothing on a row no
    longer pending). Returns the rows made dead, by destination."""
    if session.get_bind().dialect.name == "postgresql":
        # a daemon registering meanwhile waits (its INSERT), else its rows could be settled unseen
        session.execute(text("LOCK TABLE daemons IN SHARE MODE"))
    running = select(DaemonInstance.id).where(DaemonInstance.state == "running")
    if session.scalar(running.where(DaemonInstance.id != daemon_id).limit(1)) is not None:
        return {}
    left = and_(
        OutboxItem.status == PENDING, or_(OutboxItem.claimed_by.is_(None), OutboxItem.claimed_by.not_in(running))
    )
    query = select(OutboxItem.destination, func.count()).where(left, OutboxItem.destination.not_in(list(configured)))
    settled = {str(name): int(n) for name, n in session.execute(query.group_by(OutboxItem.destination))}
    for name in settled:
        session.execute(
            update(OutboxItem)
            .where(left, OutboxItem.destination == name)
            .values(status=DEAD, claimed_by=None, last_error=_not_configured(name))
        )
    return settled


def _not_configured(destination: str) -> str:
    return f"destination {destination!r} is not configured"


def release(session: Session, item_ids: Collection[int], holder: int | None) -> None:
    """Give back the rows ``holder`` claimed and did not attempt (a stop request came first); those
    another daemon took over meanwhile stay its."""
    if item_ids and holder is not None:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(list(item_ids)), OutboxItem.claimed_by == holder)
            .values(claimed_by=None)
        )


# -- what `medcli outbox` and health/metrics read and do -----------------------------------------


@dataclass(frozen=True)
class QueueSummary:
    counts: dict[str, int]
    #: seconds the oldest pending row has waited since it became pending (None: nothing pending)
    oldest_pending_seconds: float | None
    #: seconds until the earliest pending row is due (<= 0: due now)
    next_due_seconds: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "counts": self.counts,
            "oldest_pending_seconds": self.oldest_pending_seconds,
            "next_due_seconds": self.next_due_seconds,
        }


def pending_since() -> Any:
    """When a row last became pending: a row a daemon from before migration 0014 queued has no
    ``pending_since``, and waits since its creation."""
    return func.coalesce(OutboxItem.pending_since, OutboxItem.created_at)


def summary(session: Session) -> QueueSummary:
    counts = {status: 0 for status in STATUSES}
    counts.update(dict(session.execute(select(OutboxItem.status, func.count()).group_by(OutboxItem.status)).all()))
    now = read_db_clock(session)
    oldest, due = session.execute(
        select(func.min(pending_since()), func.min(OutboxItem.next_attempt_at)).where(OutboxItem.status == PENDING)
    ).one()
    return QueueSummary(
        counts,
        None if oldest is None else max(0.0, now - oldest),
        None if due is None else due - now,
    )


@dataclass(frozen=True)
class DeadLately:
    """A destination's objects that went dead lately: refused for good, or out of attempts."""

    destination: str
    count: int
    #: the latest one's answer from the destination
    last_error: str | None


def recently_dead(session: Session, seconds: float) -> list[DeadLately]:
    """The objects sent and refused that went dead in the last ``seconds``, by destination (those
    that could not be made are left out: dead from their creation, the report says why)."""
    since = read_db_clock(session) - seconds
    went = and_(
        OutboxItem.status == DEAD,
        OutboxItem.path.is_not(None),
        OutboxItem.attempts > 0,
        OutboxItem.next_attempt_at >= since,
        # a destination taken out of the configuration refused nothing: its rows are settled dead
        or_(OutboxItem.last_error.is_(None), OutboxItem.last_error.not_like(_not_configured("%"))),
    )
    by_destination = select(OutboxItem.destination, func.count(), func.max(OutboxItem.id)).where(went)
    counts = session.execute(by_destination.group_by(OutboxItem.destination)).all()
    latest = select(OutboxItem.id, OutboxItem.last_error).where(OutboxItem.id.in_([c[2] for c in counts]))
    errors = {row_id: error for row_id, error in session.execute(latest)}
    return [DeadLately(str(name), int(n), errors.get(last)) for name, n, last in sorted(counts)]


def list_items(session: Session, status: str | None = None, limit: int = 100) -> list[OutboxItem]:
    query = select(OutboxItem).order_by(OutboxItem.id.desc()).limit(limit)
    if status is not None:
        query = query.where(OutboxItem.status == status)
    return list(session.scalars(query))


def retry(session: Session, ids: Collection[int] = (), all_dead: bool = False) -> int:
    """Dead rows (those of ``ids``, or all) pending again, due now, with their attempts reset.
    Rows born dead (the object could not be made) have no file and stay dead."""
    query = update(OutboxItem).where(OutboxItem.status == DEAD, OutboxItem.path.is_not(None))
    if not all_dead:
        query = query.where(OutboxItem.id.in_(list(ids)))
    now = db_clock()
    done = session.execute(
        query.values(status=PENDING, attempts=0, pending_since=now, next_attempt_at=now, claimed_by=None)
    )
    return done.rowcount  # type: ignore[attr-defined,no-any-return]


def left_as_they_are(session: Session, ids: Collection[int]) -> list[tuple[int, str]]:
    """(id, why) of the named rows ``retry`` leaves as they are: pending or delivered, or dead with no
    object to send (it could not be made), which ``retry`` passed over without a word."""
    if not ids:
        return []
    rows = select(OutboxItem.id, OutboxItem.status, OutboxItem.path, OutboxItem.last_error).where(
        OutboxItem.id.in_(list(ids)), or_(OutboxItem.status != DEAD, OutboxItem.path.is_(None))
    )
    return [
        (int(i), f"is {status}, not dead" if status != DEAD else f"is dead with no object to send ({error})")
        for i, status, path, error in session.execute(rows.order_by(OutboxItem.id))
    ]


def pending_unconfigured(session: Session, configured: Collection[str]) -> dict[str, int]:
    """Pending rows by destination, of the destinations these settings do not configure: a daemon
    sends them only where it configures them (another sharing the database, or this one once its
    configuration names them again); until then their scans are not archived."""
    query = (
        select(OutboxItem.destination, func.count())
        .where(OutboxItem.status == PENDING, OutboxItem.destination.not_in(list(configured)))
        .group_by(OutboxItem.destination)
    )
    return {str(name): int(n) for name, n in session.execute(query)}


def unknown_items(session: Session, ids: Collection[int]) -> list[int]:
    """Of ``ids``, those no outbox row has."""
    known = set(session.scalars(select(OutboxItem.id).where(OutboxItem.id.in_(list(ids))))) if ids else set()
    return sorted(set(ids) - known)


@dataclass(frozen=True)
class Purged:
    """What ``purge`` deleted: how many rows, and the object files no remaining row names (the
    caller removes them after the commit)."""

    items: int
    unreferenced: list[str]


def purge(session: Session, statuses: Collection[str] = (DELIVERED,), older_than_seconds: float = 0.0) -> Purged:
    """Delete rows in ``statuses`` (never pending ones) created more than ``older_than_seconds`` ago."""
    kept = [s for s in statuses if s != PENDING]
    if not kept:
        return Purged(0, [])
    gone = OutboxItem.status.in_(kept), OutboxItem.created_at <= db_clock() - older_than_seconds
    paths = set(session.scalars(select(OutboxItem.path).where(*gone, OutboxItem.path.is_not(None))))
    deleted = session.execute(delete(OutboxItem).where(*gone)).rowcount  # type: ignore[attr-defined]
    still = set(session.scalars(select(OutboxItem.path).where(OutboxItem.path.in_(sorted(paths))))) if paths else set()
    return Purged(int(deleted), sorted(p for p in paths if p is not None and p not in still))


def nothing_pending(scan_id_column: Any) -> Any:
    """True for scans with no object still pending: the archive waits for the others."""
    return ~select(OutboxItem.id).where(OutboxItem.scan_id == scan_id_column, OutboxItem.status == PENDING).exists()


# -- the sender ------------------------------------------------------------------------------------


class OutboxSender:
    """Empties the outbox: a thread of the daemon (``start``/``stop``), or ``drain`` for ``--once``.

    Each round claims up to ``batch`` due rows, sends them grouped by destination (a sender per
    destination, kept between rounds: a C-STORE association stays open while objects keep coming;
    the destinations at once, each in a thread, so that one that hangs holds up no other), and
    records every answer in one transaction per group.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], daemon_id: int | None, batch: int = 32):
        self.settings = settings
        self.sessions = sessions
        self.daemon_id = daemon_id
        self.batch = batch
        self.backoff = Backoff(
            settings.outbox_retry_seconds, settings.outbox_max_retry_seconds, settings.outbox_max_attempts
        )
        self.destinations = {d.name: d for d in settings.destination}
        self.takeover_seconds = takeover_seconds(settings)
        self.senders: dict[str, Sender] = {}
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0
        self._counting = threading.Lock()

    def round(self) -> int:
        """One claim, send, record; returns the rows attempted."""
        me = self.daemon_id

        def claim() -> list[Claimed]:
            # the destinations configured here only: another daemon sharing the database may send to
            # others (one host sending for all); rows no daemon configures are settled at a start
            # (``settle_unconfigured``). They were claimed and made dead here, the other's outputs lost.
            configured, takeover = list(self.destinations), self.takeover_seconds
            with transaction(self.sessions) as session:
                return claim_due(session, me, self.batch, destinations=configured, takeover_seconds=takeover)

        claimed = with_lock_retry(claim)
        groups: dict[str, list[Claimed]] = {}
        for item in claimed:
            groups.setdefault(item.destination, []).append(item)

        def deliver(name: str, items: list[Claimed]) -> None:
            if self.stop_event.is_set():
                self._commit(lambda session: release(session, [i.id for i in items], me))
                return
            self._deliver(name, items)

        if len(groups) <= 1:
            for name, items in groups.items():
                deliver(name, items)
        else:  # each destination in a thread of its own: one that hangs delays none of the others
            with ThreadPoolExecutor(len(groups), thread_name_prefix="outbox-destination") as destinations:
                for done in [destinations.submit(deliver, name, items) for name, items in groups.items()]:
                    done.result()
        return len(claimed)

    def _deliver(self, name: str, items: list[Claimed]) -> None:
        destination = self.destinations[name]  # only configured destinations are claimed
        answers: list[Delivery]
        stored: dict[int, Delivery] = {}  # the answers of the objects acknowledged, by item id
        recorded: set[int] = set()  # of those, the ones recorded at once
        paths = [stored_file(i.path, self.settings.state_dir) for i in items]
        by_path = dict(zip(paths, items, strict=True))

        def record_acknowledged(path: Path, answer: Delivery) -> None:
            """Recorded at once: the daemon killed before the send's end, its successor does not
            send an object the peer already has. A database that fails it (a dropped connection)
            fails neither the send nor the other objects: it is recorded with the round's answers."""
            item = by_path[path]
            stored[item.id] = answer
            try:
                self._commit(lambda session: record_delivered(session, [item.id], answer.detail or None))
            except SQLAlchemyError as exc:
                key, why = item.object_key, type(exc).__name__
                log.warning("scan %d: %s delivered, to be recorded with the round (%s)", item.scan_id, key, why)
            else:
                recorded.add(item.id)

        try:  # a sender that cannot be made (a client refusing its URL) fails its objects too
            sender = self.senders.get(name)
            if sender is None:
                sender = self.senders[name] = make_sender(destination)
            answers = sender.send(paths, self._should_stop, record_acknowledged)
        except Exception as exc:  # a bug (each object's own failure is its answer)
            log.exception("sending to %s failed", name)
            failed = Delivery(False, f"{type(exc).__name__} in the sender")
            answers = [stored.get(item.id, failed) for item in items]

        def record(session: Session) -> list[str | None]:
            acknowledged: dict[str, list[int]] = {}  # by the peer's warning, if any: a statement each
            outcomes: list[str | None] = []
            for item, answer in zip(items, answers, strict=True):
                if answer == NOT_SENT:
                    outcomes.append(None)
                elif answer.acknowledged:
                    if item.id not in recorded:
                        acknowledged.setdefault(answer.detail, []).append(item.id)
                    outcomes.append(DELIVERED)
                else:
                    outcomes.append(
                        record_failure(session, item.id, answer.detail, answer.permanent, self.backoff, self.daemon_id)
                    )
            for detail, ids in acknowledged.items():
                record_delivered(session, ids, detail or None)
            unsent = [item.id for item, answer in zip(items, answers, strict=True) if answer == NOT_SENT]
            release(session, unsent, self.daemon_id)
            return outcomes

        outcomes = self._commit(record)
        for item, answer, status in zip(items, answers, outcomes, strict=True):
            if answer == NOT_SENT:
                continue
            if answer.acknowledged:
                with self._counting:
                    self.delivered += 1
                log.info("scan %d: %s delivered to %s", item.scan_id, item.object_key, name)
            else:
                with self._counting:
                    self.failed += 1
                log.warning(
                    "scan %d: %s not delivered to %s (attempt %d): %s%s",
                    item.scan_id,
                    item.object_key,
                    name,
                    item.attempts + 1,
                    answer.detail,
                    "; given up (dead)" if status == DEAD else "; will retry",
                )

    def _should_stop(self) -> bool:
        """Asked before each object: stop when asked to, or once this sender's daemon is no longer
        running. Declared lost (it stalled past its lease, or was frozen), its claims are another
        daemon's: a sender that went on sent every object twice, and after a SIGCONT sent again
        objects the other had delivered. A database that cannot say stops the round too."""
        return self.stop_event.is_set() or self.daemon_running() is not True

    def daemon_running(self) -> bool | None:
        """This sender's daemon is recorded as running (always, without a daemon); None when the
        database cannot say."""
        if self.daemon_id is None:
            return True
        try:
            with self.sessions() as session:
                return bool(session.scalar(select(still_running(self.daemon_id))))
        except SQLAlchemyError:
            return None

    def _commit(self, work: Callable[[Session], T]) -> T:
        def attempt() -> T:
            with transaction(self.sessions) as session:
                return work(session)

        return with_lock_retry(attempt, should_stop=lambda: False)

    def drain(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Send until nothing is due now (``--once``; rows backing off wait for the next run)."""
        try:
            while not should_stop() and self.round():
                pass
        finally:
            self.close_senders()

    def serve(self) -> None:
        while not self.stop_event.is_set():
            try:
                attempted = self.round()
            except Exception:
                log.exception("the outbox sender failed a round; trying again shortly")
                attempted = 0
            for sender in self.senders.values():  # those with nothing due this while let go
                sender.release_idle()
            if not attempted:
                self.stop_event.wait(POLL_SECONDS)

    def close_senders(self) -> None:
        for sender in self.senders.values():
            sender.close()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve, name="outbox-sender", daemon=True)
        self.thread.start()
        log.info("outbox sender started: %s", ", ".join(f"{d.name} ({d.kind})" for d in self.destinations.values()))

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.close_senders()


class OutboxProcess:
    """The sender in a child process of the daemon, at the report stage's niceness: pynetdicom polls
    its sockets in tight loops, which in a thread would take the GIL from the daemon's main loop.
    Started with the daemon when destinations are configured, stopped with it; a child whose daemon
    was killed with -9 sends no other object once the one in hand is answered, and leaves if it is
    not within ``in_hand_seconds`` (``_process_main``); the restarted daemon takes over its claims
    only after that (``takeover_seconds``): before, both sent the same objects."""

    def __init__(self, settings: Settings, daemon_id: int | None) -> None:
        self.settings = settings
        context = multiprocessing.get_context("forkserver")
        self.stop_event = context.Event()
        self.process = context.Process(
            target=_process_main, args=(settings, self.stop_event, daemon_id), name="meddaemon-outbox", daemon=False
        )

    def start(self) -> None:
        start_child(self.process)
        log.info(
            "outbox sender process started (pid %s): %s",
            self.process.pid,
            ", ".join(f"{d.name} ({d.kind})" for d in self.settings.destination),
        )

    def alive(self) -> bool:
        return child_runs(self.process)

    def stop(self, timeout: float = 60.0) -> None:
        stop_child(self.process, self.stop_event, timeout, "the outbox sender", log)


def _process_main(settings: Settings, stop: Any, daemon_id: int | None) -> None:
    leave_stopping_to_the_parent(sigterm=True)  # the daemon stops it through ``stop``
    parent = multiprocessing.parent_process()
    from meddaemon.db.engine import create_db_engine, session_factory
    from meddaemon.logs import setup_logging

    setup_logging(settings.log_level)
    with contextlib.suppress(OSError):
        os.nice(settings.reports_nice)
    from meddaemon.daemon.lease import connection_limits

    # the daemon's bounds: a frozen link hung the sender, and its watch on the daemon, for as long as it lasted
    engine = create_db_engine(settings.db_url, settings.busy_timeout, connection_limits(settings))
    sender = OutboxSender(settings, session_factory(engine), daemon_id)

    served = threading.Event()

    def watch() -> None:
        """The sender stops when asked, or once its daemon is gone (killed with -9) or declared lost
        (frozen past its lease): the object in hand is finished and recorded, no other is sent
        (``NOT_SENT``), and its claims go back for the daemon taking over, which would otherwise
        send the same objects alongside it. The object in hand has ``in_hand_seconds`` to be
        answered: then the process leaves (its association aborted, nothing recorded), before the
        other daemon takes that object over; an answer recorded after would be a second delivery of
        what the other sends."""
        while not stop.is_set():
            if parent is None:
                stop.wait(WATCH_SECONDS)
            elif not parent.is_alive():
                break
            else:
                parent.join(WATCH_SECONDS)  # returns at once when the parent ends
            if sender.daemon_running() is False:
                break
        sender.stop_event.set()
        if stop.is_set() or served.wait(in_hand_seconds(settings)):
            return
        log.warning(
            "the daemon is gone or declared lost and the object in hand was not answered within %.0f s: the "
            "sender leaves it to the daemon that takes over",
            in_hand_seconds(settings),
        )
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        sender.serve()
    finally:
        served.set()
        sender.close_senders()
        engine.dispose()
