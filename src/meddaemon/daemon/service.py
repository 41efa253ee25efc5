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
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, filing
from meddaemon.daemon.bookkeeper import BatchRecord, Destinations, PlannedMove, RoutingPolicy
from meddaemon.daemon.inbox import Inbox
from meddaemon.daemon.intake import Intake, init_worker, quiet_pydicom, read_file
from meddaemon.daemon.stability import Signature, StabilityTracker, StableFile
from meddaemon.daemon.watcher import Hint, install_overflow_alarm, start_observer
from meddaemon.db.engine import create_db_engine, session_factory, transaction, with_lock_retry
from meddaemon.db.migrate import upgrade
from meddaemon.engine.decode import DecodeOptions, decodable_transfer_syntaxes
from meddaemon.failures import FailureReason, ScanFailure

log = logging.getLogger("meddaemon.daemon")


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

    # -- lifecycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Folders, schema, tasks, and an account of what can be decoded."""
        for folder in (self.settings.watch, self.settings.state_dir, *vars(self.destinations).values()):
            Path(folder).mkdir(parents=True, exist_ok=True)
        quiet_pydicom()
        upgrade(self.engine)
        with_lock_retry(self._ensure_tasks, self._log_lock_wait, self.stop_requested.is_set)
        self._log_decoders()

    def run(self, once: bool = False) -> RunStats:
        """Process the inbox until stopped (SIGTERM/SIGINT), or, with ``once``, until it is drained."""
        self.prepare()
        previous_handlers = self._install_signal_handlers()
        alarm = install_overflow_alarm()
        observer = None if once else start_observer(self.settings.watch, self.hints, self.settings.observer)
        self.pool = self._make_pool()
        log.info(
            "watching %s (state in %s, database %s, %s workers)",
            self.settings.watch,
            self.settings.state_dir,
            self.engine.url.render_as_string(hide_password=True),
            self.settings.workers or "no",
        )
        try:
            self.recover()
            self.rescan()
            next_rescan = time.monotonic() + self.settings.rescan_seconds
            while not self.stop_requested.is_set():
                self._drain_hints()
                if alarm.raised.is_set() or time.monotonic() >= next_rescan:
                    if alarm.raised.is_set():
                        log.warning("watch events were lost (queue overflow): rescanning the inbox")
                    alarm.raised.clear()
                    self.recover()
                    self.rescan()
                    next_rescan = time.monotonic() + self.settings.rescan_seconds
                if observer is not None and not observer.is_alive():
                    log.error("the file watcher stopped; restarting it (rescans continue meanwhile)")
                    observer = start_observer(self.settings.watch, self.hints, self.settings.observer)
                ready = self.tracker.pop_stable(self.settings.batch_size)
                if ready:
                    self.process(ready)
                    continue
                if once and len(self.tracker) == 0:
                    if self.rescan() == 0:
                        break
                    continue
                self._wait_for_work(next_rescan)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.engine.dispose()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        log.info(
            "stopped: %d routed, %d duplicates, %d failed in %.1f s",
            self.stats.routed,
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
        intakes = self._read(ready)
        batch: list[tuple[StableFile, PurePosixPath, Intake]] = []
        for stable, intake in zip(ready, intakes, strict=False):
            name = self.inbox.relative_name(stable.path)
            if intake.changed:
                self.tracker.observe(stable.path)
            elif name is not None:
                batch.append((stable, name, intake))
        if not batch:
            return BatchRecord()

        def commit() -> BatchRecord:
            with transaction(self.sessions) as session:
                return bookkeeper.record_batch(session, batch, self.destinations, self.policy)

        record = with_lock_retry(commit, self._log_lock_wait)
        self._carry_out(record.moves)
        self.stats.count(record)
        for outcome in record.outcomes:
            _log_outcome(outcome)
        return record

    # -- helpers -------------------------------------------------------------------------------

    def _read(self, ready: list[StableFile]) -> list[Intake]:
        args = [(f.path, f.signature, self.decode_options) for f in ready]
        if self.pool is None:
            return [read_file(*a) for a in args]
        try:
            return [future.result() for future in [self.pool.submit(read_file, *a) for a in args]]
        except BrokenProcessPool:
            log.error("a decoding worker died; reading this batch again one file at a time to find the culprit")
        return [self._read_alone(*a) for a in args]

    def _read_alone(self, path: Path, expected: Signature, options: DecodeOptions) -> Intake:
        """Read one file in a fresh worker; a file that kills its worker fails as ``decoder_crashed``."""
        self._replace_pool()
        assert self.pool is not None
        try:
            return self.pool.submit(read_file, path, expected, options).result()
        except BrokenProcessPool:
            self._replace_pool()
            return Intake(path, failure=ScanFailure(FailureReason.DECODER_CRASHED, "the decoder crashed on this file"))

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

    def _wait_for_work(self, next_rescan: float) -> None:
        deadline = min(next_rescan, self.tracker.next_deadline() or next_rescan)
        timeout = max(0.0, min(deadline - time.monotonic(), 0.5))
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
            self.settings.workers, mp_context=context, initializer=init_worker, max_tasks_per_child=2000
        )

    def _install_signal_handlers(self) -> dict[int, signal._HANDLER]:
        """SIGTERM and SIGINT ask for a graceful stop; returns the handlers to restore afterwards."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}

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
