"""The stage interface: what the daemon's loop (``service.Daemon.run``) asks of each of its stages.

The loop owns what the stages share (the database through the outage guard, the lease, the decoding
workers, the moves of files, the stop request, the wait for file events) and turns the stages in
order; a stage owns one part of the work and the rows it claims for it. Adding a stage is a module
and one line in ``Daemon._stages``, not branches in the loop. The package docstring
(``meddaemon/daemon/__init__.py``) lists the stages.

A run, for every stage in the list order:

1. ``start()``: threads, processes and servers up (before the daemon logs "watching").
2. ``recover()``: take up what is already there: work a previous run left committed or claimed,
   files already waiting, the models already promoted.
3. ``tick(now, flush)`` at every turn of the loop, until a stop is asked or, with ``--once``, every
   stage is ``idle()`` and none finds more in ``look_again()``. Between turns that moved nothing the
   loop waits for a file event until the earliest ``next_deadline()``.
4. ``finish()``: complete the work in hand (also on SIGTERM).
5. ``drain()``: ``--once`` only, unless stopped: do now what a cadence or a child process would
   have done later in a live daemon (reports, the outbox, archiving).
6. ``close()``: always, in reverse order, even after a failed start.
"""

from __future__ import annotations

import logging
import multiprocessing.process
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from meddaemon.config import Settings

log = logging.getLogger("meddaemon.daemon")

#: how soon the loop looks again while a stage has work in hand outside it (reads in the decoding
#: workers, inputs being prepared, heatmap files being written), instead of waiting for an event (s)
BUSY_POLL = 0.005
#: the longest a stop waits for the reads in hand before it gives them up (systemd's stop timeout is
#: 180 s in the shipped unit; a read that never ends held every stop)
STOP_READ_WAIT_SECONDS = 30.0


class Stage:
    """One stage of the daemon. Every method has a default that does nothing: a stage overrides
    those it needs. Each stage's docstring says what it claims (rows or files held by this daemon
    while it works on them), its cadence, how it stops and how it recovers."""

    name: ClassVar[str] = "stage"

    def start(self) -> None:
        """Start the stage's threads, processes or servers."""

    def recover(self) -> None:
        """Before the first turn: finish or release what a previous run left, take up what waits."""

    def tick(self, now: float, flush: bool) -> bool:
        """One turn: do what is due at ``now`` (``time.monotonic()``); True when it moved work along
        and the loop should turn again at once. ``flush``: ``--once`` and every stage before this one
        is idle, so nothing more will come from them (a partial batch need not wait)."""
        return False

    def next_deadline(self) -> float | None:
        """When this stage next has something due without an event (monotonic); None: nothing."""
        return None

    def idle(self) -> bool:
        """Whether it holds no work in hand (``--once`` ends when every stage is idle)."""
        return True

    def look_again(self) -> int:
        """``--once``, every stage idle: look for work no event announced (a full rescan, a database
        sweep); returns how much was found (0 everywhere: the run ends)."""
        return 0

    def finish(self) -> None:
        """After the last turn: complete the work in hand (reads in flight, queued batches)."""

    def drain(self) -> None:
        """``--once``, after every stage finished and unless a stop was asked: the work a live
        daemon does later on a cadence or in a child process (reports, the outbox, archiving)."""

    def close(self) -> None:
        """Stop threads and processes, release resources; safe after a start that failed or never ran."""


@dataclass
class Cadence:
    """Something a stage does every ``seconds`` of the monotonic clock; due at the first turn."""

    seconds: float
    next: float = float("-inf")

    def due(self, now: float) -> bool:
        return now >= self.next

    def done(self, now: float) -> None:
        self.next = now + self.seconds


class ChildProcess(Protocol):
    """A child process of the daemon with a loop of its own (``ReporterProcess``, ``OutboxProcess``)."""

    @property
    def process(self) -> multiprocessing.process.BaseProcess: ...

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


class ChildProcessStage(Stage):
    """A stage whose work runs in a child process (its own loop, its own database engine, so that it
    never holds the main loop back): started once ``wanted()``, looked at every ``cadence`` seconds
    and restarted if it died, stopped at ``close()`` (it finishes the item in hand). What it claims is
    claimed under this daemon's id, so a daemon declared lost loses its child's claims too.

    With ``--once`` there is no child: ``drain()`` does the same work in the daemon's process after
    the inbox is drained. The cadence is ``model_poll_seconds``.
    """

    #: how the log names the child ("the report process"), and how the metrics do ("report")
    label: ClassVar[str] = "the child process"
    kind: ClassVar[str] = "child"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        daemon_id: int | None,
        should_stop: Callable[[], bool],
        once: bool,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.daemon_id = daemon_id
        self.should_stop = should_stop
        self.once = once
        self.cadence = Cadence(settings.model_poll_seconds)
        self.child: ChildProcess | None = None
        #: told of each restart of a child that died (the daemon's metrics count them)
        self.restarted: Callable[[str], None] = lambda kind: None

    def wanted(self) -> bool:
        """Whether to start the child (looked at until it is started; from then on it is kept)."""
        return True

    def make_child(self) -> ChildProcess:
        raise NotImplementedError

    def start(self) -> None:
        if not self.once:
            self.keep()

    def tick(self, now: float, flush: bool) -> bool:
        if not self.once and self.cadence.due(now):
            self.cadence.done(now)
            self.keep()
        return False

    def next_deadline(self) -> float | None:
        return None if self.once else self.cadence.next

    def close(self) -> None:
        if self.child is not None:
            self.child.stop()

    def keep(self) -> None:
        """Start the child once it is wanted; restart it if it died."""
        if self.child is None and not self.wanted():
            return
        if self.child is not None:
            if self.child.alive():
                return
            log.error("%s exited (code %s); restarting it", self.label, self.child.process.exitcode)
            self.restarted(self.kind)
        self.child = self.make_child()
        self.child.start()


def log_lock_wait(attempt: int, exc: BaseException) -> None:
    """``with_lock_retry``'s report of a wait for another process's lock (logged now and then)."""
    if attempt == 1 or attempt % 10 == 0:
        log.warning("database is locked by another process; waiting (attempt %d)", attempt)
