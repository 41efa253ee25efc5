"""The intake stage: inbox files found (watch hints, rescans), followed until stable, read in the
decoding workers (``intake.read_files``, a few files a task), then recorded in one transaction per
group and moved (commit, then move, then mark the move done: ``Daemon._carry_out``).

Claims: the inbox files it reads (``claims.claim_inbox_files``, under this daemon's id) from before
their read until their group is recorded; files another daemon holds are left to it. Cadence: a
full rescan every ``rescan_seconds``, at once after a watch-queue overflow or when a lost daemon's
files are released (``rescan_triggers``); a file is read once its stability window has passed or
as soon as it is renamed into place. Recovery: the files waiting are noted at ``start`` (one scan of
the inbox), and the committed moves a previous run did not carry out are finished
(``Daemon.recover``) before the first read and before every later rescan. Stop: the reads
in flight are recorded (``finish``); a file not yet claimed stays in the inbox for the next run.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.exc import DataError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, claims
from meddaemon.daemon.bookkeeper import BatchRecord, Destinations, PlannedMove
from meddaemon.daemon.filing import CarriedOut
from meddaemon.daemon.inbox import Inbox, folder_words, is_folder, rename_to_utf8
from meddaemon.daemon.inference import Commit, InferenceStage
from meddaemon.daemon.intake import Intake, IntakeContext, read_file, read_files
from meddaemon.daemon.metrics import DaemonMetrics
from meddaemon.daemon.outage import OutageGuard, StoppedWhileWaiting
from meddaemon.daemon.router import RoutingPolicy
from meddaemon.daemon.stability import Signature, StabilityTracker, StableFile, signature
from meddaemon.daemon.stages import BUSY_POLL, STOP_READ_WAIT_SECONDS, Cadence, Stage, log_lock_wait
from meddaemon.daemon.watcher import Hint
from meddaemon.daemon.workers import DecodingPool, RunningSince, StopWaiting, wait_for
from meddaemon.db.engine import is_lock_error, is_lock_timeout, transaction, with_lock_retry
from meddaemon.engine.decode import DecodeOptions
from meddaemon.failures import FailureReason, ScanFailure
from meddaemon.names import is_utf8, shown_name

log = logging.getLogger("meddaemon.daemon")

#: files claimed but not yet read, per warm decoding worker: what the workers start on at once. Until
#: the pool has proved warm (its workers answered, or a read came back), one per worker: a cold
#: daemon holds nothing it cannot start, and its peers read the rest meanwhile
READ_AHEAD_PER_WORKER = 16
#: the most files a decoding task reads (``intake.read_files``): a group is cut into tasks of up to
#: this many, at least one per worker, so a slow file holds back few others
FILES_PER_TASK = 4


@dataclass
class RunStats:
    routed: int = 0
    #: scans that got their result in this run (routed now or by an earlier run; those not inferred wait for a model)
    inferred: int = 0
    duplicates: int = 0
    failed: int = 0
    #: ``--once``: whether the run emptied the inbox (False: a stop came first, or files could not be
    #: moved out of it) and the files left in it
    drained: bool = True
    left: int = 0
    #: ``--once``: files recorded whose move out of the inbox failed (each logged), left in it
    held: int = 0
    #: ``--once``: inbox folders it could not list (each logged), their files left unread
    unlisted: int = 0
    #: ``--once``: scans, and studies, whose report could not be written or built (each logged), left
    #: ``inferred`` for a later run
    unreported: int = 0
    unreported_studies: int = 0
    #: the active model versions (``task/version``) this run refused (each logged with its reason):
    #: their tasks' scans wait, or a predecessor served them
    refused_models: list[str] = field(default_factory=list)
    #: ``--once``: DICOM outputs still pending in the outbox at its end (a destination down or
    #: refusing for now: retried by the daemon or the next run; not a failure)
    outputs_waiting: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def files(self) -> int:
        """Files taken from the inbox and recorded, whatever became of them."""
        return self.routed + self.duplicates + self.failed

    def count(self, record: BatchRecord) -> None:
        for outcome in record.outcomes:
            if outcome.state == "duplicate":
                self.duplicates += 1
            elif outcome.state == "failed":
                self.failed += 1
            else:
                self.routed += 1


@dataclass
class _ReadGroup:
    """Files handed to the workers together, recorded together in one transaction."""

    files: list[tuple[StableFile, PurePosixPath]]
    #: one per decoding task, each reading the next ``sizes[i]`` of ``files`` (``intake.read_files``)
    futures: list[Future]
    sizes: list[int]

    def unread(self) -> int:
        return sum(size for future, size in zip(self.futures, self.sizes, strict=True) if not future.done())


@dataclass(frozen=True)
class RescanTrigger:
    """An event that calls for a full rescan at the next turn (then cleared), and what to log."""

    event: threading.Event
    level: int
    message: str


class IntakeStage(Stage):
    name = "intake"

    def __init__(
        self,
        settings: Settings,
        destinations: Destinations,
        decode_options: DecodeOptions,
        inference: InferenceStage,
        workers: DecodingPool,
        sessions: sessionmaker[Session],
        outage: OutageGuard,
        should_stop: Callable[[], bool],
        commit: Commit,
        carry_out: Callable[[list[PlannedMove]], CarriedOut],
        recover: Callable[[], None],
        metrics: DaemonMetrics,
    ) -> None:
        self.settings = settings
        self.inbox = Inbox(settings.watch, settings.ignore, exclude=[settings.state_dir])
        #: the folders it could not list that the log has named (each once, until it can list it)
        self.unlisted_named: set[PurePosixPath] = set()
        self.tracker = StabilityTracker(settings.stable_seconds)
        # queue.Queue, not SimpleQueue: on CPython 3.11 a SimpleQueue.get(timeout) that a signal
        # interrupts near its deadline blocks until the next put (the loop then missed SIGTERM)
        self.hints: queue.Queue[Hint] = queue.Queue()
        #: inbox files whose committed move failed: not to be read again while they wait for it
        self.blocked: set[Path] = set()
        #: inbox files whose name is not UTF-8 and could not be renamed: left to the next periodic
        #: rescan (``--once`` ends with them in the inbox), named in a warning the first time only
        self.unrenamed: set[Path] = set()
        self._warned_unrenamed: set[PurePosixPath] = set()
        self.policy = RoutingPolicy(settings.routing_rules, set(settings.task_specs), settings.default_task)
        self.destinations = destinations
        self.decode_options = decode_options
        self.inference = inference
        self.workers = workers
        self.sessions = sessions
        self.outage = outage
        self.should_stop = should_stop
        self.commit = commit
        self.carry_out = carry_out
        self.recover_moves = recover
        self.metrics = metrics
        self.stats = RunStats()
        self.reading: list[_ReadGroup] = []
        #: when each read began to run in a worker (its timeout counts from there)
        self.running = RunningSince()
        self.rescans = Cadence(settings.rescan_seconds)
        self.rescan_triggers: list[RescanTrigger] = []
        #: told (files recorded, files recorded + files seen and not yet recorded) at every turn
        self.progress: Callable[[int, int], None] | None = None
        #: this daemon's id among those sharing the database (``lease.register``), set at start
        self.daemon_id: int | None = None

    # -- the stage -------------------------------------------------------------------------------

    def start(self) -> None:
        """Note the files already waiting, so that their stability window runs while the stages
        after this one start and the model stage loads (seconds: torch, the model); nothing is read
        before ``recover`` has finished the moves a previous run left."""
        self.rescan()

    def recover(self) -> None:
        """Finish the moves a previous run left (a file moved is forgotten by the tracker); the inbox
        was scanned at ``start``, and what arrives later comes as a hint or with the next rescan."""
        self.recover_moves()
        for path in self.blocked:  # a committed move that failed again: never read meanwhile
            self.tracker.forget(path)
        self.rescans.done(time.monotonic())

    def tick(self, now: float, flush: bool) -> bool:
        self._drain_hints()
        fired = [trigger for trigger in self.rescan_triggers if trigger.event.is_set()]
        if fired or self.rescans.due(now):
            for trigger in fired:
                log.log(trigger.level, trigger.message)
            for trigger in self.rescan_triggers:
                trigger.event.clear()
            self.recover_moves()
            self.unrenamed.clear()  # tried again once a rescan period
            self.rescan()
            self.rescans.done(now)
        room = self._read_room()
        if room > 0:
            self._submit_reads(self.tracker.pop_stable(min(room, self.settings.batch_size)))
        recorded = self._harvest_reads()
        in_hand = self.files_in_hand()
        if self.progress is not None:
            self.progress(self.stats.files, self.stats.files + in_hand)
        self.metrics.inbox_waiting(in_hand)
        return recorded > 0

    def next_deadline(self) -> float | None:
        reads = time.monotonic() + BUSY_POLL if self.reading else None
        deadlines = [d for d in (self.tracker.next_deadline(), self.rescans.next, reads) if d is not None]
        return min(deadlines, default=None)

    def idle(self) -> bool:
        return not self.reading and len(self.tracker) == 0

    def look_again(self) -> int:
        return self.rescan()

    def finish(self) -> None:
        """Record the reads in hand, waiting for them at most ``STOP_READ_WAIT_SECONDS`` (and their
        ``read_timeout_seconds``): a stop always ends. Reads that have not ended then are given up,
        their workers killed and their files left in the inbox, unclaimed, for the next run."""
        deadline = time.monotonic() + STOP_READ_WAIT_SECONDS
        while self.reading:
            group = self.reading.pop(0)
            if self._wait_for(group, deadline):
                self._harvest_group(group, block=True)
            else:
                self._give_up([group, *self.reading])
                self.reading.clear()

    # -- finding files ---------------------------------------------------------------------------

    def rescan(self) -> int:
        """Find every candidate file; returns how many are new to the tracker."""
        new = 0
        for path in self.inbox.scan():
            if path not in self.tracker and path not in self.blocked and path not in self.unrenamed:
                self.tracker.observe(path)
                new += path in self.tracker
        self._note_unlisted()
        return new

    def _note_unlisted(self) -> None:
        """A folder the scan could not list: a warning when it first could not, once; a line when it
        can again. Kept by what the log has said, not by the scan before: a ``--once`` run's first
        look at the inbox (whether to start workers) met the folder first, and it was never named."""
        for name, why in self.inbox.unlisted.items():
            if name not in self.unlisted_named:
                log.warning("cannot list %s (%s): its files wait there, unread", folder_words(name), why)
        for name in sorted(self.inbox.relisted & self.unlisted_named):
            log.info("%s can be listed again: its files will be read", folder_words(name))
        self.unlisted_named = set(self.inbox.unlisted)
        self.metrics.inbox_unlisted(len(self.inbox.unlisted))

    def files_in_hand(self) -> int:
        """Files seen in the inbox and not recorded yet: waiting to settle, or being read."""
        return len(self.tracker) + sum(len(g.files) for g in self.reading)

    def _drain_hints(self) -> None:
        for _ in range(100_000):
            try:
                hint = self.hints.get_nowait()
            except queue.Empty:
                return
            path = self.inbox.canonical(hint.path)
            if path is None or path in self.blocked or path in self.unrenamed:
                continue
            if self.inbox.is_candidate(path) and not is_folder(path):
                self.tracker.observe(path, complete=hint.renamed_in)

    # -- reading in workers ----------------------------------------------------------------------

    def process(self, ready: list[StableFile]) -> BatchRecord:
        """Read, record and file a batch of stable files, waiting for the reads (tests)."""
        self._submit_reads(ready)
        records = []
        while self.reading:
            records.append(self._harvest_group(self.reading.pop(0), block=True))
        merged = BatchRecord()
        for record in records:
            merged.moves += record.moves
            merged.outcomes += record.outcomes
        return merged

    def intake_context(self) -> IntakeContext:
        return IntakeContext(self.decode_options, self.policy, self.inference.contracts())

    def _submit_reads(self, ready: list[StableFile]) -> None:
        ready = self._with_utf8_names(ready)
        files = [(f, name) for f in ready if (name := self.inbox.relative_name(f.path)) is not None]
        if not files:
            return
        mine = self._claim_inbox_files([f for f, _ in files])
        files = [(f, name) for f, name in files if f.path in mine]
        if not files:
            return
        context = self.intake_context()
        items = [(f.path, name, f.signature) for f, name in files]
        size = max(1, min(FILES_PER_TASK, -(-len(items) // max(1, self.settings.workers))))
        tasks = [items[i : i + size] for i in range(0, len(items), size)]
        futures = [self.workers.submit(read_files, task, context) for task in tasks]
        self.reading.append(_ReadGroup(files, futures, [len(task) for task in tasks]))

    def _with_utf8_names(self, ready: list[StableFile]) -> list[StableFile]:
        """``ready``, each file whose name inside the inbox is not valid UTF-8 (a Latin-1 share, an
        old archive) renamed in place first (``rename_to_utf8``): no database stores such a name,
        and storing it stopped the daemon. The same file under its new name, its signature taken
        again (the rename changed its change time: read against the old one, it was "changed");
        one that cannot be renamed waits in the inbox, unread, until the next periodic rescan
        (``unrenamed``), and is named in a warning the first time."""
        named: list[StableFile] = []
        for file in ready:
            name = self.inbox.relative_name(file.path)
            if name is None or is_utf8(name):
                named.append(file)
                continue
            try:
                new = rename_to_utf8(self.inbox.root, name)
            except FileNotFoundError:
                continue  # gone meanwhile: another daemon sharing the inbox renamed it first
            except OSError as exc:
                self.unrenamed.add(file.path)
                if name not in self._warned_unrenamed:
                    self._warned_unrenamed.add(name)
                    log.warning(
                        "cannot give inbox file %s a UTF-8 name (%s): it waits there, unread (tried again each rescan)",
                        shown_name(name),
                        exc.strerror or exc,
                    )
                continue
            self._warned_unrenamed.discard(name)
            log.info("renamed inbox file %s to %s: its name was not UTF-8", shown_name(name), new)
            renamed = self.inbox.root / new
            after = signature(renamed)  # the rename changed its change time, nothing else
            if after is not None:
                named.append(replace(file, path=renamed, signature=after))
        return named

    def _read_room(self) -> int:
        """How many more inbox files to claim now: two batches in hand at most, and no more unread
        than the decoding workers can start on (``READ_AHEAD_PER_WORKER``; one each while cold)."""
        room = 2 * self.settings.batch_size - sum(len(g.files) for g in self.reading)
        if self.workers.executor is None:
            return room
        self.workers.warm = self.workers.warm or any(f.done() for g in self.reading for f in g.futures)
        per_worker = READ_AHEAD_PER_WORKER if self.workers.warm else 1
        unread = sum(g.unread() for g in self.reading)
        return min(room, self.settings.workers * per_worker - unread)

    def _claim_inbox_files(self, files: list[StableFile]) -> set[Path]:
        """The files this daemon may read: those no other daemon sharing the database holds.
        The others are left to their holder (a rescan finds them again if it dies, at once when
        this daemon is the one that declares it lost).
        The claim does not wait for a peer frozen in the middle of claiming the same files: past
        the lock timeout they go back to the tracker, to be tried again once stable."""
        assert self.daemon_id is not None
        me = self.daemon_id
        unread_after = self.settings.claim_unread_seconds

        def claim() -> set[Path]:
            with transaction(self.sessions) as session:
                return claims.claim_inbox_files(session, me, files, unread_after)

        def claim_without_waiting() -> set[Path]:
            return with_lock_retry(claim, log_lock_wait, self.should_stop, retry_lock_timeouts=False)

        try:
            return self.outage.run(claim_without_waiting, self.should_stop)
        except OperationalError as exc:
            if self.should_stop() and is_lock_error(exc):
                raise StoppedWhileWaiting("the database was locked by another process") from exc
            if not is_lock_timeout(exc):
                raise
            log.info("claiming %d inbox files waited past the lock timeout; trying again later", len(files))
            for stable in files:
                self.tracker.observe(stable.path)
            return set()

    def _harvest_reads(self) -> int:
        """Record every group of reads that has finished, oldest first, and the oldest one of whose
        reads has run for longer than ``read_timeout_seconds`` (its files read again one at a time:
        a read that never ends held every file read after it, and every stop); returns files recorded."""
        recorded = 0
        timeout = self.settings.read_timeout_seconds
        for group in self.reading[1:]:  # when each read began to run is noted at every turn
            self.running.overdue(group.futures, timeout)
        while self.reading and (
            all(f.done() for f in self.reading[0].futures) or self.running.overdue(self.reading[0].futures, timeout)
        ):
            group = self.reading.pop(0)
            recorded += len(self._harvest_group(group, block=False).outcomes)
        return recorded

    def _wait_for(self, group: _ReadGroup, deadline: float) -> bool:
        """Wait until ``group``'s reads have ended, until ``deadline`` at most; whether they have."""
        _, pending = wait(group.futures, timeout=max(0.0, deadline - time.monotonic()))
        return not pending

    def _give_up(self, groups: list[_ReadGroup]) -> None:
        """Reads a stop does not wait for: their workers killed, their files left in the inbox with
        their claims dropped, to be read by the next run (or by another daemon)."""
        self.workers.replace(kill=True)
        paths = [stable.path for group in groups for stable, _ in group.files]

        def release() -> None:
            with transaction(self.sessions) as session:
                claims.release_inbox_files(session, paths, held_by=self.daemon_id)

        with contextlib.suppress(SQLAlchemyError):  # unreleased, they are taken over after claim_unread_seconds
            with_lock_retry(release, should_stop=lambda: True)
        for path in paths:
            self.tracker.forget(path)
        log.warning("stopping: %d inbox files whose reads had not ended are left in the inbox, unread", len(paths))

    def _harvest_group(self, group: _ReadGroup, block: bool) -> BatchRecord:
        self.running.forget(group.futures)
        try:
            intakes = self._intakes(group, block)
        except StopWaiting:
            self._give_up([group])
            return BatchRecord()
        batch: list[tuple[StableFile, PurePosixPath, Intake]] = []
        changed: list[Path] = []
        left_alone: list[Path] = []
        for (stable, name), intake in zip(group.files, intakes, strict=True):
            if intake.read_later is not None:
                log.warning("%s: %s; it is read again later", shown_name(name), intake.read_later)
            if intake.left_alone is not None:
                log.warning("%s: %s: not read, left where it is", shown_name(name), intake.left_alone)
                left_alone.append(stable.path)
            elif intake.changed:
                changed.append(stable.path)
            else:
                batch.append((stable, name, intake))
        record_ = self._record(batch, [*changed, *left_alone])
        for path in changed:
            self.tracker.observe(path)
        for path in left_alone:
            self.tracker.forget(path)
        # each file's line as its row is committed: a daemon killed in a long move (a copy to another
        # file system) had said nothing of the batch, and recovery finishes the moves without names
        for outcome in record_.outcomes:
            log_outcome(outcome)
        vanished = self.carry_out(record_.moves).vanished
        record_.outcomes = [_as_vanished(o) if o.scan_id in vanished else o for o in record_.outcomes]
        self.stats.count(record_)
        for outcome in record_.outcomes:
            self.metrics.files_recorded(outcome.state, outcome.reason)
        by_name = {str(name): (stable, intake) for stable, name, intake in batch}
        for outcome in record_.outcomes:
            stable, intake = by_name[outcome.source_name]
            if outcome.state == "routed" and outcome.scan_id is not None and intake.model_input is not None:
                self.inference.enqueue(
                    outcome.scan_id,
                    outcome.task or "",
                    intake.model_input,
                    stable.discovered_at,
                    outcome.sha256,
                    intake.prepared_for,
                )
        return record_

    def _record(self, batch: list[tuple[StableFile, PurePosixPath, Intake]], changed: list[Path]) -> BatchRecord:
        """The batch's rows in one transaction. One the database refuses (a value its schema cannot
        hold: PostgreSQL's DataError) is recorded file by file instead, and a file refused alone fails
        as ``internal_error``, its header left out: one file's header stopped the daemon at every
        start, the good files of its batch with it."""
        try:
            return self.commit(self._record_rows(batch, changed))
        except DataError as exc:
            log.error("the database refused a batch of %d files (%s); recording them one by one", len(batch), _why(exc))
        record = BatchRecord()
        for i, (stable, name, intake) in enumerate(batch):
            try:
                one = self.commit(self._record_rows([(stable, name, intake)], changed if i == 0 else []))
            except DataError as exc:
                refused = ScanFailure(
                    FailureReason.INTERNAL_ERROR,
                    f"the database refused this file's header ({_why(exc)}); the file is kept: please report it",
                )
                bare = Intake(stable.path, intake.size, intake.sha256, failure=refused)
                one = self.commit(self._record_rows([(stable, name, bare)], changed if i == 0 else []))
            record.moves += one.moves
            record.outcomes += one.outcomes
        return record

    def _record_rows(
        self, batch: list[tuple[StableFile, PurePosixPath, Intake]], changed: list[Path]
    ) -> Callable[[Session], BatchRecord]:
        served = set(self.inference.served)
        why_waiting = self.inference.why_waiting()
        assert self.daemon_id is not None
        me = self.daemon_id

        def record(session: Session) -> BatchRecord:
            """The batch's rows, for the files this daemon still holds; claims end for the files
            that are not leaving the inbox (changed while read, vanished)."""
            held = claims.held_inbox_files(session, me, [stable.path for stable, _, _ in batch])
            kept = [item for item in batch if str(item[0].path) in held]
            record_ = bookkeeper.record_batch(
                session, kept, self.destinations, served, claimed_by=me, why_waiting=why_waiting
            )
            leaving = {str(move.source) for move in record_.moves}
            staying = [*changed, *(stable.path for stable, _, _ in kept if str(stable.path) not in leaving)]
            claims.release_inbox_files(session, staying, held_by=me)  # a changed file may be another's by now
            return record_

        return record

    def _intakes(self, group: _ReadGroup, block: bool) -> list[Intake]:
        """What each file of ``group`` read as (waited for with ``block``); read again one at a time
        where a worker died, or a read did not end (the workers killed first). ``StopWaiting``: a
        stop came while a read was waited for."""
        try:
            results = [self._wait(future) if block else future.result(0) for future in group.futures]
            return [intake for result in results for intake in result]
        except (BrokenProcessPool, CancelledError):  # cancelled: its pool replaced after another's worker died
            log.error("a decoding worker died; reading this batch again one file at a time to find the culprit")
        except TimeoutError:
            log.error(
                "a read of %d inbox files had not ended after %.0f s (read_timeout_seconds); the decoding workers "
                "are killed and the files read again one at a time",
                len(group.files),
                self.settings.read_timeout_seconds,
            )
            self.workers.replace(kill=True)
        return [self._read_alone(f.path, name, f.signature) for f, name in group.files]

    def _wait(self, future: Future) -> Any:
        """``future``'s result, waited for at most ``read_timeout_seconds``, the daemon kept alive
        meanwhile and a stop ending the wait (``workers.wait_for``)."""
        return wait_for(
            future,
            self.settings.read_timeout_seconds,
            keep_alive=self.outage.while_waiting,
            should_stop=self.should_stop,
        )

    def _read_alone(self, path: Path, name: PurePosixPath, expected: Signature) -> Intake:
        """Read one file in a fresh worker; a file that kills its worker fails as ``decoder_crashed``,
        one whose read has not ended after ``read_timeout_seconds`` as ``decode_timeout``."""
        self.workers.replace()
        timeout = self.settings.read_timeout_seconds
        try:
            if (started := self.workers.started()) is not None:
                self._wait(started)
        except (BrokenProcessPool, TimeoutError):  # no worker starts: the host's trouble, not the file's
            self.workers.replace(kill=True)
            return Intake(path, changed=True, read_later="no decoding worker could be started")
        try:
            return self._wait(self.workers.submit(read_file, path, name, expected, self.intake_context()))
        except BrokenProcessPool:
            self.workers.replace()
            return Intake(path, failure=ScanFailure(FailureReason.DECODER_CRASHED, "the decoder crashed on this file"))
        except TimeoutError:
            self.workers.replace(kill=True)
            why = f"its read had not ended after {timeout:.0f} s (read_timeout_seconds); its decoding worker was killed"
            return Intake(path, failure=ScanFailure(FailureReason.DECODE_TIMEOUT, why))


def _as_vanished(outcome: bookkeeper.IntakeOutcome) -> bookkeeper.IntakeOutcome:
    """A routed file's outcome once its move found it gone (``bookkeeper.forget_files_not_kept``):
    failed, as its scan is; counted routed, a ``--once`` run's summary said 0 failed."""
    return replace(outcome, state="failed", reason=FailureReason.VANISHED.value, detail="gone before its move")


def _why(exc: DataError) -> str:
    """The server's own first line: never SQLAlchemy's rendering, which quotes the statement's
    parameters, the header's values (patient data) among them."""
    lines = str(exc.orig).splitlines() or [""]
    return f"{type(exc.orig).__name__}: {lines[0][:200]}"


def log_outcome(outcome: bookkeeper.IntakeOutcome) -> None:
    """A file's line, logged as its row is committed: before its move, which the line therefore
    names as to come (a move that fails is an error line of its own)."""
    sha = (outcome.sha256 or "-")[:12]
    if outcome.state == "failed":
        log.warning(
            "%s -> failed: %s (%s); its file goes to %s",
            outcome.source_name,
            outcome.reason,
            outcome.detail,
            outcome.target or "nowhere: the file is gone",
        )
    elif outcome.state == "duplicate":
        log.info(
            "%s (sha256 %s) -> duplicate: %s; its file goes to %s",
            outcome.source_name,
            sha,
            outcome.detail,
            outcome.target,
        )
    elif outcome.state == "inferred":
        log.info(
            "%s (sha256 %s) -> inferred, task %s, model %s", outcome.source_name, sha, outcome.task, outcome.detail
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
