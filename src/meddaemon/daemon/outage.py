"""Riding out a database outage: the daemon waits for the database instead of exiting.

Every transaction of the daemon's main loop runs through one ``OutageGuard``. While the database
answers, the guard only runs the work. When it stops answering (connection refused, a connection
cut by the server or the network, a SQLite file that cannot be opened), the guard goes ``down``:
it logs that once, retries the same transaction with capped, jittered exponential backoff, and
logs once more when the database is back. The loop is held inside the retry meanwhile, so it
claims nothing new and keeps what it holds in hand (reads in flight, queued inferences), recorded
once the database answers. Only past ``limit_seconds`` of continuous outage does the guard give
up with ``DatabaseUnavailable`` (the daemon exits 3 and its supervisor restarts it).

Retrying is safe because nothing is moved on disk before a commit (``db.engine.with_lock_retry``).
The guard is thread-safe: the heartbeat thread reports what it sees too (``failed``/``succeeded``),
so an idle daemon notices the outage at its next heartbeat.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from meddaemon.db.engine import is_lock_error
from meddaemon.logs import error_line

log = logging.getLogger("meddaemon.daemon")

T = TypeVar("T")

#: the first retry waits about this long; each next one twice as long, up to ``BACKOFF_MAX``
BACKOFF_FIRST = 0.25
#: the longest wait between two tries (short enough to keep systemd's watchdog and the lease fed)
BACKOFF_MAX = 5.0


class DatabaseUnavailable(RuntimeError):
    """The database stayed unreachable longer than the daemon may wait (``db_outage_seconds``)."""


class StoppedWhileWaiting(RuntimeError):
    """A stop was asked for while the daemon waited for the database (away, or locked by another
    process): the work in hand was never committed, so nothing of it happened; its files stay where
    they are and are taken again at the next start."""


def is_outage(exc: BaseException) -> bool:
    """The database could not be reached, or dropped the connection: an error a retry may cure.

    Lock waits are not outages (``with_lock_retry`` handles them), nor are errors of the statement
    itself (a constraint, a bad query), which a retry would only repeat.
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, OperationalError) and not is_lock_error(exc)


#: SQLite's primary result codes for a database file that answers but cannot be written
_UNWRITABLE = {8: "unwritable (read-only)", 10: "unwritable (disk I/O error)", 13: "unwritable (disk full)"}


def what_failed(exc: BaseException) -> str:
    """``unreachable``, or for a SQLite file that cannot be written (its disk full, read-only or
    failing) which of these: a full state directory was logged as an unreachable database."""
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return _UNWRITABLE.get(code & 0xFF, "unreachable") if isinstance(code, int) else "unreachable"


@dataclass(frozen=True)
class Down:
    """The database has not answered since ``since`` (the guard's clock); ``what``: unreachable, or
    unwritable and why (``what_failed``)."""

    since: float
    error: str
    what: str = "unreachable"


class OutageGuard:
    """``up`` -> ``down(since)`` -> ``up`` again, or given up past ``limit_seconds``.

    ``clock``, ``sleep`` and ``jitter`` are injectable for tests; ``on_change(up)`` is called on every
    change of state (the metrics' ``database_up``), ``while_waiting()`` between two tries (the
    daemon keeps its lease and systemd's watchdog fed there); ``logger`` names the process that
    waits (the daemon, its report process).

    ``writes_reported``: another thread reports its writes (``succeeded(wrote=True)``: the daemon's
    heartbeat). A SQLite file that cannot be written still answers reads, so a transaction of
    ``run`` that succeeded, which may have read alone, does not end an outage found ``unwritable``;
    only a write does (it said "database back" every few seconds while every write failed, the
    metric read up, and the clock towards ``limit_seconds`` started again each time).
    """

    def __init__(
        self,
        limit_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        jitter: Callable[[], float] = random.random,
        on_change: Callable[[bool], None] = lambda up: None,
        while_waiting: Callable[[], None] = lambda: None,
        logger: logging.Logger = log,
        writes_reported: bool = False,
    ) -> None:
        self.log = logger
        self.writes_reported = writes_reported
        self.limit_seconds = limit_seconds
        self.clock = clock
        self.sleep = sleep
        self.jitter = jitter
        self.on_change = on_change
        self.while_waiting = while_waiting
        self.down: Down | None = None
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.down is None

    @property
    def unwritable(self) -> bool:
        """Down, the database found answering but refusing writes (a SQLite file: ``what_failed``)."""
        down = self.down
        return down is not None and down.what != "unreachable"

    def down_for(self) -> float:
        """Seconds since the database stopped answering; 0 while it answers."""
        down = self.down
        return 0.0 if down is None else self.clock() - down.since

    def failed(self, exc: BaseException) -> None:
        """The database did not answer: goes down (logged once) unless it already is."""
        with self._lock:
            if self.down is not None:
                return
            self.down = Down(self.clock(), error_line(exc), what_failed(exc))
        self.log.error(
            "database %s: %s; retrying for up to %.0f s (db_outage_seconds)",
            self.down.what,
            self.down.error,
            self.limit_seconds,
        )
        self.on_change(False)

    def succeeded(self, wrote: bool = True) -> None:
        """The database answered (``wrote``: a write went through): back up (logged once) if it was
        down, unless it was found unwritable and this proves nothing of writing."""
        with self._lock:
            down = self.down
            if down is None or (not wrote and self.unwritable):
                return
            self.down = None
        self.log.warning("database back after %.1f s", self.clock() - down.since)
        self.on_change(True)

    def delay(self, attempt: int) -> float:
        """The wait before try ``attempt + 1``: doubling from ``BACKOFF_FIRST``, capped at
        ``BACKOFF_MAX``, between half and all of that (jitter, so that daemons cut off together do
        not all come back at the same instant), and never past the end of ``limit_seconds``."""
        full = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempt - 1))
        wait = full * (0.5 + 0.5 * self.jitter())
        left = self.limit_seconds - self.down_for()
        return max(0.0, min(wait, left))

    def run(self, work: Callable[[], T], should_stop: Callable[[], bool] = lambda: False) -> T:
        """``work()`` (one whole transaction), tried again while the database is unreachable.

        Raises ``DatabaseUnavailable`` once the outage has lasted ``limit_seconds``, and the
        original error at once when ``should_stop()`` (a stop requested while the database is away).
        """
        attempt = 0
        while True:
            try:
                result = work()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.failed(exc)
                if should_stop():
                    raise
                if self.given_up():
                    raise self.unavailable() from exc
                attempt += 1
                self.while_waiting()
                self.sleep(self.delay(attempt))
                continue
            self.succeeded(wrote=not self.writes_reported)
            return result

    def given_up(self) -> bool:
        """Whether the outage has lasted ``limit_seconds``: seen by the heartbeat alone too (a daemon
        whose SQLite file cannot be written reads on, idle, and never met a failure of its own)."""
        return self.down is not None and self.down_for() >= self.limit_seconds

    def unavailable(self) -> DatabaseUnavailable:
        """The error the daemon gives up with, naming the outage and its limit."""
        down = self.down
        what, error = (down.what, down.error) if down is not None else ("unreachable", "")
        return DatabaseUnavailable(
            f"the database has been {what} for {self.down_for():.0f} s, longer than "
            f"db_outage_seconds ({self.limit_seconds:g} s): {error}"
        )
