"""The daemon: discover -> stable -> read (in workers) -> record (one transaction) -> move.

One loop owns the stability tracker, the database writes and the moves; watchdog threads only
feed it hints, worker processes only read files. Order of effects for every batch: commit the rows
(and the moves they imply), then move the files, then mark the moves done. A crash anywhere leaves
either an untouched file in the inbox (rediscovered at start) or a committed move that recovery
finishes.

The loop turns a list of stages (``Daemon._stages``; the interface is ``daemon/stages.py``, the
list is in the package docstring). What they share lives here: the database through the outage
guard, the lease among daemons, the decoding workers, the moves of files, signals and the stop
request, and the wait for file events between turns.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, filing, lease
from meddaemon.daemon.archiving import ArchiveStage
from meddaemon.daemon.bookkeeper import BatchRecord, Destinations, PlannedMove
from meddaemon.daemon.inbox import ensure_watch_folder
from meddaemon.daemon.inference import InferenceStage
from meddaemon.daemon.intake import IntakeContext
from meddaemon.daemon.intake_stage import IntakeStage, RescanTrigger, RunStats, log_outcome
from meddaemon.daemon.metrics import DaemonMetrics, MetricsStage
from meddaemon.daemon.outage import OutageGuard, StoppedWhileWaiting, is_outage
from meddaemon.daemon.outbox_stage import OutboxStage
from meddaemon.daemon.receiver_stage import ReceiverStage
from meddaemon.daemon.reporter import ReportStage
from meddaemon.daemon.sdnotify import Watchdog
from meddaemon.daemon.serving import ModelStage
from meddaemon.daemon.stability import StableFile
from meddaemon.daemon.stages import ChildProcess, Stage, log_lock_wait
from meddaemon.daemon.watcher import WatcherStage
from meddaemon.daemon.workers import FORKSERVER_PRELOAD, DecodingPool, wait_for
from meddaemon.db.engine import (
    create_db_engine,
    is_lock_error,
    is_sqlite,
    session_factory,
    shown_url,
    transaction,
    with_lock_retry,
    with_unique_retry,
)
from meddaemon.db.migrate import head_revision, upgrade
from meddaemon.engine.decode import decodable_transfer_syntaxes
from meddaemon.files import file_identity
from meddaemon.logs import quiet_libraries
from meddaemon.names import shown_name

__all__ = ["Daemon", "LeaseLost", "RunStats"]

log = logging.getLogger("meddaemon.daemon")


class LeaseLost(RuntimeError):
    """Another daemon declared this one lost (it stalled past its lease) and took over its work."""


class StateDirectoryGone(RuntimeError):
    """The state directory, or its SQLite database, was removed or replaced while the daemon ran."""


T = TypeVar("T")

#: the longest wait for a file event between two turns of the loop (s)
IDLE_WAIT = 0.5
OVERFLOW_RESCAN = "watch events were lost (queue overflow): rescanning the inbox"
#: while the database is found unwritable, the loop tries a write (a heartbeat) this often
WRITE_PROBE_SECONDS = 1.0
RELEASED_RESCAN = "a lost daemon's inbox files were released: rescanning the inbox now"


class Daemon:
    def __init__(self, settings: Settings, stop_requested: threading.Event | None = None) -> None:
        """``stop_requested``: an event a stop request sets (the command's, which notes one that came
        while it was starting: ``cli.starting``)."""
        self.settings = settings
        #: the state directory and its SQLite database, and their identity at start (``_state_identity``)
        self.state_paths: tuple[Path, ...] = ()
        self.state_identity: tuple[tuple[int, int] | None, ...] = ()
        self.stop_requested = stop_requested if stop_requested is not None else threading.Event()
        self.destinations = Destinations(
            settings.work_dir, settings.archive_dir, settings.failed_dir, state_dir=settings.state_dir
        )
        self.decode_options = settings.decode_options
        self.engine = create_db_engine(settings.db_url, settings.busy_timeout, lease.connection_limits(settings))
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        #: the decoding workers (started by ``run``; until then reads are done in this process), forked
        #: with torch already imported unless the receiver's or the sender's process waits to be forked
        preload = FORKSERVER_PRELOAD if not settings.dicom_port and not settings.destination else ()
        self.workers = DecodingPool(settings.workers, preload=preload)
        #: this daemon's place among those sharing the database (registered by ``prepare``)
        self.member: lease.Member | None = None
        self.lease: lease.LeaseKeeper | None = None
        self.metrics = DaemonMetrics()
        #: systemd's notifications (READY, the watchdog's keep-alives); silent outside systemd
        self.watchdog = Watchdog()
        #: the database's reachability: every transaction of the loop waits out an outage through it
        self.outage = OutageGuard(
            settings.db_outage_seconds,
            on_change=self._database_changed,
            while_waiting=self._keep_alive,
            writes_reported=True,  # the heartbeat's, and the loop's probes (``_probe_a_write``)
        )
        self._write_probed_at = 0.0
        self.stage = InferenceStage(
            settings,
            self.sessions,
            self.destinations,
            self.decode_options,
            self.workers.submit,
            self._commit,
            after_store=self._after_store,
            metrics=self.metrics,
            kill_workers=lambda: self.workers.replace(kill=True),
            wait_for_worker=lambda future, timeout: wait_for(
                future, timeout, keep_alive=self._keep_alive, should_stop=self.stop_requested.is_set
            ),
        )
        self.intake = IntakeStage(
            settings,
            self.destinations,
            self.decode_options,
            self.stage,
            self.workers,
            self.sessions,
            self.outage,
            self.stop_requested.is_set,
            self._commit,
            self._carry_out,
            self.recover,
            self.metrics,
        )
        # the intake's, shared with the moves (a file moved is forgotten; one whose move failed is blocked)
        self.inbox = self.intake.inbox
        self.tracker = self.intake.tracker
        self.hints = self.intake.hints
        self.blocked = self.intake.blocked
        #: blocked inbox files as they were read: another renamed over one meanwhile is not moved in its place
        self.read_as: dict[Path, filing.AsRead] = {}
        self.stats: RunStats = self.intake.stats
        #: the stages of the current (or last) run, in the order they turn
        self.stages: list[Stage] = []
        self.reports: ReportStage | None = None
        self.outbox: OutboxStage | None = None

    @property
    def reporter(self) -> ChildProcess | None:
        """The report process of the current (or last) run, if one was started."""
        return self.reports.child if self.reports is not None else None

    # -- lifecycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Folders, schema, tasks, this daemon's registration, and an account of what can be decoded."""
        ensure_watch_folder(self.inbox.root, self.settings.create_watch)
        destinations = self.destinations
        for folder in (
            self.settings.state_dir,
            destinations.work_dir,
            destinations.archive_dir,
            destinations.failed_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        quiet_libraries()
        self._past_locks(self._upgrade_schema)
        self._past_locks(self._ensure_tasks)
        self.state_paths = self._state_paths()
        self.state_identity = self._state_identity()
        self._join()
        self._past_locks(self._settle_unconfigured_outputs)
        self._log_decoders()

    def _count_what_is_left(self, once: bool) -> None:
        """A ``--once`` run a stop cut short, that could not move files out of the inbox (a folder
        it may not write: a move is retried at a rescan, and ``--once`` has no other), or that could
        not list a folder of it (its files unread), is not drained: a script must not read it as if
        it were."""
        held = sum(1 for path in self.blocked if not path.is_relative_to(self.settings.state_dir))  # not work/'s
        if once and (self.stop_requested.is_set() or held or self.inbox.unlisted):
            self.stats.drained, self.stats.left = False, sum(1 for _ in self.inbox.scan())  # its scan lists again
            self.stats.held, self.stats.unlisted = held, len(self.inbox.unlisted)

    def _state_paths(self) -> tuple[Path, ...]:
        """The state directory, and its SQLite database when it has one."""
        database = make_url(self.settings.db_url).database
        if is_sqlite(self.settings.db_url) and database and database != ":memory:":
            return self.settings.state_dir, Path(database)
        return (self.settings.state_dir,)

    def _state_identity(self) -> tuple[tuple[int, int] | None, ...]:
        """The device and inode of the state directory and of its SQLite database (None: gone).
        Removed or replaced under a running daemon (``rm -rf``, ``mv state state.old``), the folders
        were made again by path while the rows went on into the deleted database it held open: the
        files it took then lay in work/ with no row, never processed after a restart."""
        return tuple(file_identity(path) for path in self.state_paths)

    def _past_locks(self, work: Callable[[], T]) -> T:
        """``work`` at start, tried again past a lock another process holds (``medcli db upgrade``, a
        retry, a backup): the schema's upgrade went through once, and the daemon exited 3 after the
        busy timeout, restarted in a loop by systemd. A stop asked meanwhile ends the start
        (``StoppedWhileWaiting``, exit 0). An unreachable database is not waited for here: at start
        it is more likely a wrong URL than an outage."""
        try:
            return with_lock_retry(work, log_lock_wait, self.stop_requested.is_set)
        except OperationalError as exc:
            if self.stop_requested.is_set() and is_lock_error(exc):
                raise StoppedWhileWaiting("the database was locked by another process") from exc
            raise

    def _join(self) -> None:
        """Register among the daemons sharing the database; take over from those found lost."""

        def join(session: Session) -> tuple[lease.Member, list[lease.LostDaemon]]:
            member = lease.register(session, lease.node_name(self.settings.node), self.settings.lease_seconds)
            return member, lease.release_lost(session, member)

        self.member, found = self._commit(join)
        self.stage.daemon_id = self.intake.daemon_id = self.member.daemon_id
        lease.log_lost(found)
        log.info(
            "daemon %d on node %s (pid %d, lease %.0f s)",
            self.member.daemon_id,
            self.member.node,
            self.member.pid,
            self.member.lease_seconds,
        )

    def _stages(self, once: bool) -> list[Stage]:
        """The stages of a run, in the order they start, turn, finish and drain (closed in reverse).
        Adding a stage is one line here."""
        assert self.member is not None and self.lease is not None
        settings, me, stop, live = self.settings, self.member.daemon_id, self.stop_requested.is_set, not once
        watcher = WatcherStage(self.inbox.root, self.hints, settings.observer) if live else None

        def served() -> bool:
            return bool(self.stage.served)

        self.reports = ReportStage(settings, self.sessions, me, stop, once, served) if settings.reports else None
        self.outbox = outbox = OutboxStage(settings, self.sessions, me, stop, once) if settings.destination else None
        for child in (self.reports, outbox):
            if child is not None:
                child.restarted = self.metrics.child_restarted
                self.metrics.watch_child(child.kind)
        stages = [
            MetricsStage(settings.metrics_host, settings.metrics_port, self.engine, self.metrics, settings.busy_timeout)
            if settings.metrics_port and live
            else None,
            ModelStage(self.stage, self.sessions, self.guarded, stop, settings.model_poll_seconds, once),
            ReceiverStage(settings, self.member.node, self.metrics) if settings.dicom_port and live else None,
            watcher,
            self.intake,
            self.stage,
            self.reports,
            outbox,
            ArchiveStage(
                self.destinations,
                settings.batch_size,
                self._commit,
                self._carry_out,
                me,
                settings.model_poll_seconds,
                after_reports=settings.reports,
            ),
        ]
        overflow = [] if watcher is None else [RescanTrigger(watcher.alarm.raised, logging.WARNING, OVERFLOW_RESCAN)]
        self.intake.rescan_triggers = [
            *overflow,
            RescanTrigger(self.lease.inbox_released, logging.INFO, RELEASED_RESCAN),
        ]
        return [stage for stage in stages if stage is not None]

    def run(self, once: bool = False, progress: Callable[[int, int], None] | None = None) -> RunStats:
        """Process the inbox until stopped (SIGTERM/SIGINT), or, with ``once``, until it is drained.

        ``progress`` is told (files recorded, files recorded + files seen and not yet recorded) as
        the loop goes.
        """
        previous_handlers = self._install_signal_handlers()  # first: a SIGTERM during start-up stops cleanly too
        try:
            self.prepare()
        except StoppedWhileWaiting as exc:
            self._restore_signal_handlers(previous_handlers)
            self.engine.dispose()
            log.warning("stopping as asked while starting: %s; nothing was taken from the inbox", exc)
            self._count_what_is_left(once)
            return self.stats
        except BaseException:
            self._restore_signal_handlers(previous_handlers)
            raise
        assert self.member is not None

        def files_waiting() -> bool:
            return next(iter(self.inbox.scan()), None) is not None

        # --once on an empty inbox starts no worker process and loads no model
        self.workers.start(warm_up=not once or files_waiting())
        self.lease = lease.LeaseKeeper(self.sessions, self.member, outage=self.outage)
        self.lease.start()
        self.stages = self._stages(once)
        self.intake.progress = progress
        if once:
            self.stage.load_when(files_waiting)
        waiting_when_stopped: StoppedWhileWaiting | None = None
        try:
            for stage in self.stages:
                stage.start()
            log.info(
                "watching %s (state in %s, database %s, %s workers)",
                self.inbox.root,
                self.settings.state_dir,
                shown_url(self.engine.url),
                self.settings.workers or "no",
            )
            for stage in self.stages:
                stage.recover()
            self.watchdog.ready(f"watching {self.settings.watch}")
            self._turn(once)
            self.watchdog.stopping()
            for stage in self.stages:
                stage.finish()
            if once and not self.stop_requested.is_set():
                for stage in self.stages:
                    stage.drain()
                if self.reports is not None:
                    self.stats.unreported, self.stats.unreported_studies = self.reports.unreported
                if self.outbox is not None:
                    self.stats.outputs_waiting = self.outbox.waiting
        except StoppedWhileWaiting as exc:
            waiting_when_stopped = exc
            self.watchdog.stopping()
            log.warning(
                "stopping as asked while %s: the work in hand was not recorded; its files stay and are taken "
                "at the next start",
                exc,
            )
        except Exception as exc:
            if not isinstance(exc, LeaseLost) and self._declared_lost():
                self.lease.lost.set()
                raise LeaseLost(
                    f"daemon {self.member.daemon_id} was declared lost by another daemon "
                    f"(found on waking up, after {type(exc).__name__})"
                ) from exc
            raise
        finally:
            self._close_stages()
            # stopped while waiting for the database: its heartbeat may be waiting too, and a sign-off
            # would wait as long (a lock held elsewhere, busy_timeout) to fail; the lease runs out instead
            self.lease.stop(wait_seconds=1.0 if waiting_when_stopped else 10.0)
            self.workers.shutdown()
            if waiting_when_stopped:
                log.warning("not signing off (%s); the other daemons take over after the lease", waiting_when_stopped)
            elif not self.lease.lost.is_set():
                self._sign_off()
            self.engine.dispose()
            self._restore_signal_handlers(previous_handlers)
        self.stats.inferred = self.stage.inferred
        self.stats.refused_models = sorted(self.stage.refused_active())
        self._count_what_is_left(once)
        log.info(
            "stopped: %d routed, %d inferred, %d duplicates, %d failed in %.1f s",
            self.stats.routed,
            self.stats.inferred,
            self.stats.duplicates,
            self.stats.failed,
            time.monotonic() - self.stats.started,
        )
        return self.stats

    def _turn(self, once: bool) -> None:
        """Turn the stages until a stop is asked, or with ``once`` until none holds or finds work.

        Each turn: keep the lease and the watchdog fed (and stop if another daemon declared this one
        lost), tick every stage in order, and wait for a file event until the earliest deadline
        when no stage moved work along."""
        assert self.lease is not None and self.member is not None
        while not self.stop_requested.is_set():
            self._keep_alive()
            if self.lease.lost.is_set():
                raise LeaseLost(f"daemon {self.member.daemon_id} was declared lost by another daemon")
            if self.outage.unwritable:
                self._probe_a_write()
            if self.outage.given_up():  # the heartbeat's writes failing that long, the loop's reads not
                raise self.outage.unavailable()
            if self._state_identity() != self.state_identity:
                raise StateDirectoryGone(
                    f"the state directory {self.settings.state_dir} (or its database) was removed or replaced "
                    "while the daemon ran: stopping before another file is taken"
                )
            now = time.monotonic()
            progressed = False
            idle_so_far = once  # --once: every stage before the next one holds nothing
            for stage in self.stages:
                progressed = stage.tick(now, flush=idle_so_far) or progressed
                idle_so_far = idle_so_far and stage.idle()
            if idle_so_far:
                if not any(stage.look_again() for stage in self.stages):
                    return
                continue
            if not progressed:
                self._wait_for_work()

    def _wait_for_work(self, next_event: float | None = None) -> None:
        """Wait for a file event (a hint) until ``next_event`` or the earliest stage deadline, and
        never longer than ``IDLE_WAIT``; the hint is left in the queue for the intake."""
        deadlines = [d for d in (next_event, *(stage.next_deadline() for stage in self.stages)) if d is not None]
        now = time.monotonic()
        timeout = max(0.0, min(min(deadlines, default=now + IDLE_WAIT) - now, IDLE_WAIT))
        try:
            hint = self.hints.get(timeout=timeout)
        except queue.Empty:
            return
        self.hints.put(hint)

    def _close_stages(self) -> None:
        """Close every stage, the last first; one that fails to close does not keep the others open."""
        for stage in reversed(self.stages):
            try:
                stage.close()
            except Exception:
                log.exception("closing the %s stage failed", stage.name)

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stop_requested.set()

    # -- the intake's, for tests and tools ---------------------------------------------------------

    def rescan(self) -> int:
        """Find every candidate file; returns how many are new to the tracker."""
        return self.intake.rescan()

    def process(self, ready: list[StableFile]) -> BatchRecord:
        """Read, record and file a batch of stable files, waiting for the reads (tests)."""
        return self.intake.process(ready)

    def intake_context(self) -> IntakeContext:
        return self.intake.intake_context()

    # -- what the stages share: the database, the moves ------------------------------------------

    def _database_changed(self, up: bool) -> None:
        """The metrics' ``database_up``, and the status line ``systemctl status`` shows, which said
        "watching" through an outage."""
        self.metrics.database_reachable(up)
        down = self.outage.down
        if up or down is None:
            self.watchdog.status(f"watching {self.settings.watch}")
            return
        since = datetime.now(UTC) - timedelta(seconds=self.outage.down_for())
        self.watchdog.status(
            f"database {down.what} since {since:%H:%M:%S} UTC ({down.error}); retrying for up to "
            f"{self.settings.db_outage_seconds:g} s"
        )

    def recover(self) -> None:
        """Finish the moves that were committed but not carried out (after a crash or a failed move)."""
        moves = self.outage.run(
            lambda: with_lock_retry(self._pending_moves, log_lock_wait, self.stop_requested.is_set),
            self.stop_requested.is_set,
        )
        if moves:
            again = sum(move.source in self.blocked for move in moves)
            # moves that failed before are tried at every rescan: said once, when they first failed
            log.log(
                logging.DEBUG if again == len(moves) else logging.INFO,
                "recovery: finishing %d committed moves%s",
                len(moves),
                f" ({again} blocked before)" if again else "",
            )
            for unfinished in filing.remove_unfinished_copies(move.target for move in moves):
                log.info("recovery: removed %s, a copy a killed daemon left half made", unfinished)
            self._carry_out(moves)

    def _carry_out(self, moves: list[PlannedMove]) -> filing.CarriedOut:
        """Carry out committed moves, then mark them done; only those still due and this daemon's
        (``bookkeeper.moves_still_due``): one declared lost that wakes up moves nothing another took
        over. Returns how many files were moved (others are held back, or were gone) and the scans
        failed because their file was gone."""
        if not moves:
            return filing.CarriedOut(0)
        me = self.member.daemon_id if self.member else None
        due = self._commit(lambda session: bookkeeper.moves_still_due(session, moves, self.destinations, me))
        for move in moves:
            if move not in due:
                skipped = "move of %s to %s: no longer this daemon's to make; skipped"
                log.info(skipped, shown_name(move.source), shown_name(move.target))
                self.tracker.forget(move.source)
                self.read_as.pop(move.source, None)
        done: list[PlannedMove] = []
        not_kept: list[PlannedMove] = []
        for move in due:
            self._keep_alive()  # a batch of copies to another file system outlasted the watchdog's minute
            try:
                if move.reason_document is not None:
                    filing.write_reason(move.target, move.reason_document)
                read_as = move.read_as or self.read_as.get(move.source)
                outcome = filing.finish_move(move.source, move.target, self._keep_alive, read_as)
            except OSError as exc:
                log.log(
                    logging.DEBUG if move.source in self.blocked else logging.ERROR,
                    "could not move %s to %s (%s); will retry at each rescan",
                    shown_name(move.source),
                    shown_name(move.target),
                    exc.strerror or exc,
                )
                self.blocked.add(move.source)
                if move.read_as is not None:  # recovery, which retries it, knows only the row
                    self.read_as[move.source] = move.read_as
                continue
            if move.source in self.blocked:
                log.info("moved %s to %s, blocked before", shown_name(move.source), shown_name(move.target))
            if outcome in (filing.MoveOutcome.LOST, filing.MoveOutcome.REPLACED):
                not_kept.append(move)
                if move.reason_document is not None:  # written for a file that is not coming
                    filing.reason_path(move.target).unlink(missing_ok=True)
            if outcome is filing.MoveOutcome.LOST:
                log.error(
                    "%s is neither at %s nor at %s: it was removed by someone else",
                    self._shown(move.source),
                    shown_name(move.source),
                    shown_name(move.target),
                )
            if outcome is filing.MoveOutcome.REPLACED:
                log.error(
                    "%s was replaced by other bytes before it could be moved to %s: the file read is "
                    "gone, and the new one is taken as a new arrival",
                    self._shown(move.source),
                    shown_name(move.target),
                )
            self.blocked.discard(move.source)
            self.read_as.pop(move.source, None)
            self.tracker.forget(move.source)
            filing.remove_emptied_shard(move.source.parent, self.destinations.work_dir)
            done.append(move)
        if done:

            def clear() -> list[int]:
                with transaction(self.sessions) as session:
                    bookkeeper.clear_pending(session, done, me)
                    return bookkeeper.forget_files_not_kept(session, not_kept, me)

            vanished = frozenset(self.guarded(clear))
            for scan_id in sorted(vanished):
                log.error("scan %d failed as vanished: its file left the inbox before its copy was kept", scan_id)
            return filing.CarriedOut(len(done) - len(not_kept), vanished)
        return filing.CarriedOut(0)

    def _shown(self, path: Path) -> str:
        """A moved file as the log names it: an inbox file by its name in the inbox, as its other
        lines do (``busi/scan.png``, not ``scan.png``), any other by its path; escaped."""
        watch = self.settings.watch
        return shown_name(path.relative_to(watch).as_posix() if path.is_relative_to(watch) else path)

    def _after_store(self, record: BatchRecord) -> None:
        self._carry_out(record.moves)
        for outcome in record.outcomes:
            log_outcome(outcome)

    def _commit(self, work: Callable[[Session], T]) -> T:
        """One transaction, retried past locks held by other processes, and again when another
        daemon registered the same bytes at the same moment (the retry sees its scan: a duplicate)."""

        def attempt() -> T:
            with transaction(self.sessions) as session:
                return work(session)

        return with_unique_retry(lambda: self.guarded(attempt), _log_recorded_first)

    def guarded(self, work: Callable[[], T]) -> T:
        """``work`` (one whole transaction or read), tried again past other processes' locks and
        while the database is unreachable (``OutageGuard``): the one way the loop touches the database.
        Waiting, the daemon tells systemd's watchdog and its lease that it is alive; a stop asked for
        meanwhile raises :class:`StoppedWhileWaiting` (a SQLite lock held elsewhere for a minute had the
        watchdog restart the daemon, and SIGTERM waited for the lock)."""
        stopping = self.stop_requested.is_set

        def waiting_for_a_lock(attempt: int, exc: BaseException) -> None:
            log_lock_wait(attempt, exc)
            self._keep_alive()

        try:
            return self.outage.run(lambda: with_lock_retry(work, waiting_for_a_lock, stopping), stopping)
        except Exception as exc:
            if stopping() and (is_lock_error(exc) or is_outage(exc)):
                why = "locked by another process" if is_lock_error(exc) else "unreachable"
                raise StoppedWhileWaiting(f"the database was {why}") from exc
            raise

    def _probe_a_write(self) -> None:
        """While the database is found unwritable, a heartbeat from the loop, at most every
        ``WRITE_PROBE_SECONDS``: a write that goes through ends the outage at once. The lease's own
        beats come a quarter of a lease apart: with a long lease, a brief outage long over outlasted
        ``db_outage_seconds`` and the daemon gave up on a database that took its writes."""
        assert self.lease is not None
        if time.monotonic() - self._write_probed_at < WRITE_PROBE_SECONDS:
            return
        self._write_probed_at = time.monotonic()
        try:
            wrote = self.lease.try_a_beat()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.outage.failed(exc)
        else:
            if wrote:
                self.outage.succeeded(wrote=True)

    def _keep_alive(self) -> None:
        """While the loop waits out a database outage, or moves files (a copy to another file system
        can be long): it is alive, not stuck (lease, watchdog)."""
        if self.lease is not None:
            self.lease.tick()
        self.watchdog.tick()

    def _pending_moves(self) -> list[PlannedMove]:
        with transaction(self.sessions) as session:
            return bookkeeper.pending_moves(session, self.destinations, self.member.daemon_id if self.member else None)

    def _upgrade_schema(self) -> None:
        """The schema upgraded on connections whose answers are not timed (``answer_timeout``): a
        migration's statement (an index built over millions of rows) may run for minutes."""
        limits = dataclasses.replace(lease.connection_limits(self.settings), answer_timeout=0.0)
        engine = create_db_engine(self.settings.db_url, self.settings.busy_timeout, limits)
        try:
            before = upgrade(engine)
        finally:
            engine.dispose()
        head = head_revision()
        if before is None:
            log.info("database schema created at revision %s", head)
        elif before != head:
            log.info(
                "database schema upgraded from revision %s to %s (an older meddaemon refuses it from its next start)",
                before,
                head,
            )

    def _ensure_tasks(self) -> None:
        with transaction(self.sessions) as session:
            bookkeeper.ensure_tasks(session, self.settings.task_specs)

    def _settle_unconfigured_outputs(self) -> None:
        from meddaemon.dicom import outbox

        assert self.member is not None
        configured = [d.name for d in self.settings.destination]
        with transaction(self.sessions) as session:
            settled = outbox.settle_unconfigured(session, configured, self.member.daemon_id)
        for name, count in settled.items():
            log.warning(
                "%d DICOM output(s) queued for destination %r, which is not configured, are dead "
                "(`medcli outbox retry --all-dead` sends them once it is configured again)",
                count,
                name,
            )

    def _declared_lost(self) -> bool:
        """Whether another daemon declared this one lost: what a database error met on waking up
        from a freeze (the server ended the session meanwhile) most likely means."""
        assert self.member is not None
        try:
            with self.sessions() as session:
                return lease.declared_lost(session, self.member)
        except Exception:
            return False

    def _sign_off(self) -> None:
        assert self.member is not None
        member = self.member
        try:
            self._commit(lambda session: lease.sign_off(session, member))
        except Exception as exc:  # the database is away: the lease runs out instead
            log.warning("could not sign off (%s); the other daemons take over after the lease", exc)

    def _install_signal_handlers(self) -> dict[int, signal._HANDLER]:
        """SIGTERM, SIGINT and SIGHUP (the terminal a daemon started from closed: by default it
        killed the daemon at once, its decoding workers left running) ask for a graceful stop;
        returns the handlers to restore afterwards."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        stopping = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        return {signum: signal.signal(signum, self.request_stop) for signum in stopping}

    @staticmethod
    def _restore_signal_handlers(handlers: dict[int, signal._HANDLER]) -> None:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    def _log_decoders(self) -> None:
        support = decodable_transfer_syntaxes()
        able = [s for s in support if s.decodable]
        log.info(
            "DICOM decoding: %d of %d transfer syntaxes decodable: %s",
            len(able),
            len(support),
            "; ".join(s.name for s in able),
        )
        for s in support:
            log.debug(
                "  %-4s %s (%s)%s",
                "yes" if s.decodable else "no",
                s.name,
                s.uid,
                f" via {', '.join(s.plugins)}" if s.plugins else "",
            )


def _log_recorded_first(exc: IntegrityError) -> None:
    log.info("another daemon recorded the same row first (%s); recording again", type(exc.orig).__name__)
