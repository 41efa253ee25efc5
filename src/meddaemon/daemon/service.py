"""The daemon: discover -> stable -> read (in workers) -> record (one transaction) -> move.

One loop owns the stability tracker, the database writes and the moves; watchdog threads only
feed it hints, worker processes only read files. Order of effects for every batch: commit the rows
(and the moves they imply), then move the files, then mark the moves done. A crash anywhere leaves
either an untouched file in the inbox (rediscovered at start) or a committed move that recovery
finishes.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, claims, filing, lease
from meddaemon.daemon.bookkeeper import BatchRecord, Destinations, PlannedMove
from meddaemon.daemon.inbox import Inbox
from meddaemon.daemon.inference import InferenceStage
from meddaemon.daemon.intake import Intake, IntakeContext, init_worker, quiet_pydicom, read_file
from meddaemon.daemon.metrics import DaemonMetrics, MetricsServer, start_metrics_server
from meddaemon.daemon.reporter import Reporter, ReporterProcess
from meddaemon.daemon.router import RoutingPolicy
from meddaemon.daemon.sdnotify import Watchdog
from meddaemon.daemon.stability import Signature, StabilityTracker, StableFile
from meddaemon.daemon.watcher import Hint, install_overflow_alarm, start_observer
from meddaemon.db.engine import create_db_engine, session_factory, transaction, with_lock_retry
from meddaemon.db.migrate import upgrade
from meddaemon.engine.decode import DecodeOptions, decodable_transfer_syntaxes
from meddaemon.failures import FailureReason, ScanFailure

log = logging.getLogger("meddaemon.daemon")


class LeaseLost(RuntimeError):
    """Another daemon declared this one lost (it stalled past its lease) and took over its work."""


T = TypeVar("T")

#: batches of reported scans archived per poll at most, before the loop turns to new files again
ARCHIVE_BATCHES_PER_POLL = 8
#: retries of a transaction that met a row another daemon committed meanwhile (same SHA-256)
UNIQUE_RETRIES = 3


@dataclass
class _ReadGroup:
    """Files handed to the workers together, recorded together in one transaction."""

    files: list[tuple[StableFile, PurePosixPath]]
    futures: list[Future]


@dataclass
class RunStats:
    routed: int = 0
    duplicates: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, record: BatchRecord) -> None:
        for outcome in record.outcomes:
            if outcome.state == "duplicate":
                self.duplicates += 1
            elif outcome.state == "failed":
                self.failed += 1
            else:
                self.routed += 1


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_requested = threading.Event()
        self.stats = RunStats()
        self.inbox = Inbox(settings.watch, settings.ignore, exclude=[settings.state_dir])
        self.tracker = StabilityTracker(settings.stable_seconds)
        self.hints: queue.SimpleQueue[Hint] = queue.SimpleQueue()
        self.destinations = Destinations(settings.work_dir, settings.archive_dir, settings.failed_dir)
        self.policy = RoutingPolicy(settings.routing_rules, set(settings.task_specs), settings.default_task)
        self.decode_options = DecodeOptions(frame_policy=settings.frame_policy, max_pixels=settings.max_pixels)  # type: ignore[arg-type]
        self.engine = create_db_engine(settings.db_url, settings.busy_timeout)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        #: inbox files whose committed move failed: not to be read again while they wait for it
        self.blocked: set[Path] = set()
        self.pool: Executor | None = None
        #: this daemon's place among those sharing the database (registered by ``prepare``)
        self.member: lease.Member | None = None
        self.lease: lease.LeaseKeeper | None = None
        self.reporter: ReporterProcess | None = None
        self.reading: list[_ReadGroup] = []
        self.metrics = DaemonMetrics()
        self.metrics_server: MetricsServer | None = None
        #: systemd's notifications (READY, the watchdog's keep-alives); silent outside systemd
        self.watchdog = Watchdog()
        self.stage = InferenceStage(
            settings,
            self.sessions,
            self.destinations,
            self.decode_options,
            self._submit,
            self._commit,
            after_store=self._after_store,
            metrics=self.metrics,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Folders, schema, tasks, this daemon's registration, and an account of what can be decoded."""
        for folder in (self.settings.watch, self.settings.state_dir, *vars(self.destinations).values()):
            Path(folder).mkdir(parents=True, exist_ok=True)
        quiet_pydicom()
        upgrade(self.engine)
        with_lock_retry(self._ensure_tasks, self._log_lock_wait, self.stop_requested.is_set)
        self._join()
        self._log_decoders()

    def _join(self) -> None:
        """Register among the daemons sharing the database; take over from those found lost."""

        def join(session: Session) -> tuple[lease.Member, list[lease.LostDaemon]]:
            member = lease.register(session, lease.node_name(self.settings.node), self.settings.lease_seconds)
            return member, lease.release_lost(session, member)

        self.member, found = self._commit(join)
        self.stage.daemon_id = self.member.daemon_id
        lease.log_lost(found)
        log.info(
            "daemon %d on node %s (pid %d, lease %.0f s)",
            self.member.daemon_id,
            self.member.node,
            self.member.pid,
            self.member.lease_seconds,
        )

    def run(self, once: bool = False) -> RunStats:
        """Process the inbox until stopped (SIGTERM/SIGINT), or, with ``once``, until it is drained."""
        previous_handlers = self._install_signal_handlers()  # first: a SIGTERM during start-up stops cleanly too
        try:
            self.prepare()
        except BaseException:
            self._restore_signal_handlers(previous_handlers)
            raise
        if self.settings.metrics_port and not once:
            self.metrics_server = start_metrics_server(
                self.settings.metrics_host,
                self.settings.metrics_port,
                self.engine,
                self.metrics,
                busy_timeout=self.settings.busy_timeout,
            )
            log.info("metrics on %s", self.metrics_server.url)
        alarm = install_overflow_alarm()
        observer = None if once else start_observer(self.settings.watch, self.hints, self.settings.observer)
        self.pool = self._make_pool()
        assert self.member is not None
        self.lease = lease.LeaseKeeper(self.sessions, self.member)
        self.lease.start()
        log.info(
            "watching %s (state in %s, database %s, %s workers)",
            self.settings.watch,
            self.settings.state_dir,
            self.engine.url.render_as_string(hide_password=True),
            self.settings.workers or "no",
        )
        try:
            self.stage.refresh_models()
            if not once:
                self._keep_reporter()
            self.recover()
            self.rescan()
            self.watchdog.ready(f"watching {self.settings.watch}")
            now = time.monotonic()
            next_rescan, next_poll = now + self.settings.rescan_seconds, now
            while not self.stop_requested.is_set():
                self.lease.tick()
                self.watchdog.tick()
                if self.lease.lost.is_set():
                    raise LeaseLost(f"daemon {self.member.daemon_id} was declared lost by another daemon")
                self._drain_hints()
                now = time.monotonic()
                if alarm.raised.is_set() or now >= next_rescan:
                    if alarm.raised.is_set():
                        log.warning("watch events were lost (queue overflow): rescanning the inbox")
                    alarm.raised.clear()
                    self.recover()
                    self.rescan()
                    next_rescan = now + self.settings.rescan_seconds
                if now >= next_poll:
                    self.stage.refresh_models()
                    self.stage.sweep()
                    next_poll = now + self.settings.model_poll_seconds
                    for _ in range(ARCHIVE_BATCHES_PER_POLL):
                        if self.archive_reported() < self.settings.batch_size:
                            break
                    if not once:
                        self._keep_reporter()
                if observer is not None and not observer.is_alive():
                    log.error("the file watcher stopped; restarting it (rescans continue meanwhile)")
                    observer = start_observer(self.settings.watch, self.hints, self.settings.observer)
                room = 2 * self.settings.batch_size - sum(len(g.files) for g in self.reading)
                if room > 0:
                    self._submit_reads(self.tracker.pop_stable(min(room, self.settings.batch_size)))
                progressed = self._harvest_reads()
                self.stage.harvest_prepared()
                draining = once and not self.reading and len(self.tracker) == 0
                progressed += self.stage.run_ready(flush=draining)
                if draining and self.stage.idle():
                    if self.rescan() == 0 and self.stage.sweep() == 0:
                        break
                    continue
                if not progressed:
                    self.metrics.inbox_waiting(len(self.tracker) + sum(len(g.files) for g in self.reading))
                    self._wait_for_work(min(next_rescan, next_poll))
            self.watchdog.stopping()
            self._finish_in_hand()
            if self.settings.reports and once and not self.stop_requested.is_set():
                # --once: the reports after the drain, here (no batch is left to stall)
                Reporter(self.settings, self.sessions, self.member.daemon_id).drain(self.stop_requested.is_set)
                while self.archive_reported():
                    pass
        finally:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.lease.stop()
            if self.reporter is not None:
                self.reporter.stop()
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.stage.close()
            if not self.lease.lost.is_set():
                self._sign_off()
            self.engine.dispose()
            self._restore_signal_handlers(previous_handlers)
        log.info(
            "stopped: %d routed, %d inferred, %d duplicates, %d failed in %.1f s",
            self.stats.routed,
            self.stage.inferred,
            self.stats.duplicates,
            self.stats.failed,
            time.monotonic() - self.stats.started,
        )
        return self.stats

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stop_requested.set()

    # -- the stages ----------------------------------------------------------------------------

    def rescan(self) -> int:
        """Find every candidate file; returns how many are new to the tracker."""
        new = 0
        for path in self.inbox.scan():
            if path not in self.tracker and path not in self.blocked:
                self.tracker.observe(path)
                new += path in self.tracker
        return new

    def recover(self) -> None:
        """Finish the moves that were committed but not carried out (after a crash or a failed move)."""
        moves = with_lock_retry(self._pending_moves, self._log_lock_wait, self.stop_requested.is_set)
        if moves:
            log.info("recovery: finishing %d committed moves", len(moves))
            self._carry_out(moves)

    def process(self, ready: list[StableFile]) -> BatchRecord:
        """Read, record and file a batch of stable files, waiting for the reads (tests, ``--once``)."""
        self._submit_reads(ready)
        records = []
        while self.reading:
            records.append(self._harvest_group(self.reading.pop(0), block=True))
        merged = BatchRecord()
        for record in records:
            merged.moves += record.moves
            merged.outcomes += record.outcomes
        return merged

    # -- reading in workers --------------------------------------------------------------------

    def _submit_reads(self, ready: list[StableFile]) -> None:
        files = [(f, name) for f in ready if (name := self.inbox.relative_name(f.path)) is not None]
        if not files:
            return
        mine = self._claim_inbox_files([f for f, _ in files])
        files = [(f, name) for f, name in files if f.path in mine]
        if not files:
            return
        context = self.intake_context()
        futures = [self._submit(read_file, f.path, name, f.signature, context) for f, name in files]
        self.reading.append(_ReadGroup(files, futures))

    def _harvest_reads(self) -> int:
        """Record every group of reads that has finished, oldest first; returns files recorded."""
        recorded = 0
        while self.reading and all(f.done() for f in self.reading[0].futures):
            group = self.reading.pop(0)
            recorded += len(self._harvest_group(group, block=False).outcomes)
        return recorded

    def _harvest_group(self, group: _ReadGroup, block: bool) -> BatchRecord:
        try:
            intakes = [future.result() for future in group.futures]
        except BrokenProcessPool:
            log.error("a decoding worker died; reading this batch again one file at a time to find the culprit")
            intakes = [self._read_alone(f.path, name, f.signature) for f, name in group.files]
        batch: list[tuple[StableFile, PurePosixPath, Intake]] = []
        changed: list[Path] = []
        for (stable, name), intake in zip(group.files, intakes, strict=True):
            if intake.changed:
                changed.append(stable.path)
            else:
                batch.append((stable, name, intake))
        served = set(self.stage.served)
        assert self.member is not None
        me = self.member.daemon_id

        def record(session: Session) -> BatchRecord:
            """The batch's rows, for the files this daemon still holds; claims end for the files
            that are not leaving the inbox (changed while read, vanished)."""
            held = claims.held_inbox_files(session, me, [stable.path for stable, _, _ in batch])
            kept = [item for item in batch if str(item[0].path) in held]
            record_ = bookkeeper.record_batch(session, kept, self.destinations, served, claimed_by=me)
            leaving = {str(move.source) for move in record_.moves}
            claims.release_inbox_files(
                session, [*changed, *(stable.path for stable, _, _ in kept if str(stable.path) not in leaving)]
            )
            return record_

        record_ = self._commit(record)
        for path in changed:
            self.tracker.observe(path)
        self._carry_out(record_.moves)
        self.stats.count(record_)
        for outcome in record_.outcomes:
            self.metrics.files_recorded(outcome.state, outcome.reason)
        by_name = {str(name): (stable, intake) for stable, name, intake in batch}
        for outcome in record_.outcomes:
            _log_outcome(outcome)
            stable, intake = by_name[outcome.source_name]
            if outcome.state == "routed" and outcome.scan_id is not None and intake.model_input is not None:
                self.stage.enqueue(outcome.scan_id, outcome.task or "", intake.model_input, stable.discovered_at)
        return record_

    def _read_alone(self, path: Path, name: PurePosixPath, expected: Signature) -> Intake:
        """Read one file in a fresh worker; a file that kills its worker fails as ``decoder_crashed``."""
        self._replace_pool()
        try:
            return self._submit(read_file, path, name, expected, self.intake_context()).result()
        except BrokenProcessPool:
            self._replace_pool()
            return Intake(path, failure=ScanFailure(FailureReason.DECODER_CRASHED, "the decoder crashed on this file"))

    def intake_context(self) -> IntakeContext:
        return IntakeContext(self.decode_options, self.policy, self.stage.contracts())

    def _submit(self, fn: Callable[..., object], *args: object) -> Future:
        """Run ``fn`` in a decoding worker, or right here (as a finished future) with ``workers = 0``."""
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def _claim_inbox_files(self, files: list[StableFile]) -> set[Path]:
        """The files this daemon may read: those no other daemon sharing the database holds.
        The others are left to their holder (a rescan finds them again if it dies)."""
        assert self.member is not None
        me = self.member.daemon_id
        return self._commit(lambda session: claims.claim_inbox_files(session, me, files))

    def _sign_off(self) -> None:
        assert self.member is not None
        member = self.member
        try:
            self._commit(lambda session: lease.sign_off(session, member))
        except Exception as exc:  # the database is away: the lease runs out instead
            log.warning("could not sign off (%s); the other daemons take over after the lease", exc)

    def _commit(self, work: Callable[[Session], T]) -> T:
        """One transaction, retried past locks held by other processes, and again when another
        daemon registered the same bytes at the same moment (the retry sees its scan: a duplicate)."""

        def attempt() -> T:
            with transaction(self.sessions) as session:
                return work(session)

        for _ in range(UNIQUE_RETRIES):
            try:
                return with_lock_retry(attempt, self._log_lock_wait)
            except IntegrityError as exc:
                log.info("another daemon recorded the same row first (%s); recording again", type(exc.orig).__name__)
        return with_lock_retry(attempt, self._log_lock_wait)

    def _after_store(self, record: BatchRecord) -> None:
        self._carry_out(record.moves)
        for outcome in record.outcomes:
            _log_outcome(outcome)

    def _finish_in_hand(self) -> None:
        """On a stop request: record the reads in flight and run what is queued, then return."""
        while self.reading:
            self._harvest_group(self.reading.pop(0), block=True)
        while self.stage.preparing:
            self.stage.harvest_prepared()
            time.sleep(0.01)
        self.stage.run_ready(flush=True)

    def _keep_reporter(self) -> None:
        """The report process (daemon/reporter.py): started once a model is served, restarted if it died."""
        if not self.settings.reports or (self.reporter is None and not self.stage.served):
            return
        if self.reporter is not None:
            if self.reporter.alive():
                return
            log.error("the report process exited (code %s); restarting it", self.reporter.process.exitcode)
        self.reporter = ReporterProcess(self.settings, self.member.daemon_id if self.member else None)
        self.reporter.start()

    def _replace_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._make_pool()

    def _carry_out(self, moves: list[PlannedMove]) -> None:
        done: list[PlannedMove] = []
        for move in moves:
            try:
                if move.reason_document is not None:
                    filing.write_reason(move.target, move.reason_document)
                outcome = filing.finish_move(move.source, move.target)
            except OSError as exc:
                log.error("could not move %s to %s (%s); will retry", move.source, move.target, exc.strerror or exc)
                self.blocked.add(move.source)
                continue
            if outcome is filing.MoveOutcome.LOST:
                log.error(
                    "%s is neither at %s nor at %s: it was removed by someone else",
                    move.source.name,
                    move.source,
                    move.target,
                )
            self.blocked.discard(move.source)
            self.tracker.forget(move.source)
            done.append(move)
        if done:

            def clear() -> None:
                with transaction(self.sessions) as session:
                    bookkeeper.clear_pending(session, done)

            with_lock_retry(clear, self._log_lock_wait)

    def archive_reported(self) -> int:
        """Move up to a batch of reported scans from work/ to archive/ (commit, then move); returns how many."""

        def claim(session: Session) -> list[PlannedMove]:
            return bookkeeper.claim_for_archive(session, self.destinations, self.settings.batch_size)

        moves = self._commit(claim)
        if moves:
            self._carry_out(moves)
            log.info("archived %d reported scans", len(moves))
        return len(moves)

    def _pending_moves(self) -> list[PlannedMove]:
        with transaction(self.sessions) as session:
            return bookkeeper.pending_moves(session)

    def _ensure_tasks(self) -> None:
        with transaction(self.sessions) as session:
            bookkeeper.ensure_tasks(session, self.settings.task_specs)

    def _drain_hints(self) -> None:
        for _ in range(100_000):
            try:
                hint = self.hints.get_nowait()
            except queue.Empty:
                return
            if hint.path not in self.blocked and self.inbox.is_candidate(hint.path) and not hint.path.is_dir():
                self.tracker.observe(hint.path, complete=hint.renamed_in)

    def _wait_for_work(self, next_event: float) -> None:
        deadlines = [next_event, self.tracker.next_deadline(), self.stage.next_deadline()]
        deadline = min(d for d in deadlines if d is not None)
        busy = self.reading or self.stage.preparing
        timeout = max(0.0, min(deadline - time.monotonic(), 0.005 if busy else 0.5))
        try:
            hint = self.hints.get(timeout=timeout)
        except queue.Empty:
            return
        self.hints.put(hint)

    def _make_pool(self) -> Executor | None:
        if self.settings.workers == 0:
            return None
        context = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(
            # no max_tasks_per_child: on Python 3.11 a retired worker is not replaced while work is
            # queued (CPython gh-115634), and the pool stalls after workers x limit files
            self.settings.workers,
            mp_context=context,
            initializer=init_worker,
        )

    def _install_signal_handlers(self) -> dict[int, signal._HANDLER]:
        """SIGTERM and SIGINT ask for a graceful stop; returns the handlers to restore afterwards."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(handlers: dict[int, signal._HANDLER]) -> None:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    def _log_lock_wait(self, attempt: int, exc: BaseException) -> None:
        if attempt == 1 or attempt % 10 == 0:
            log.warning("database is locked by another process; waiting (attempt %d)", attempt)

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


def _log_outcome(outcome: bookkeeper.IntakeOutcome) -> None:
    sha = (outcome.sha256 or "-")[:12]
    if outcome.state == "failed":
        log.warning(
            "%s -> failed: %s (%s); kept at %s",
            outcome.source_name,
            outcome.reason,
            outcome.detail,
            outcome.target or "nowhere: the file is gone",
        )
    elif outcome.state == "duplicate":
        log.info(
            "%s (sha256 %s) -> duplicate: %s; kept at %s", outcome.source_name, sha, outcome.detail, outcome.target
        )
    else:
        log.info(
            "%s (sha256 %s, %d bytes) -> %s, task %s by %s",
            outcome.source_name,
            sha,
            outcome.size,
            outcome.state,
            outcome.task,
            outcome.detail,
        )
