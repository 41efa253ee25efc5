"""The database side of intake: one transaction turns a batch of read files into rows.

Nothing here touches the inbox. It decides, for each file, its row and where the file must go, and
returns those moves for the caller to carry out after the commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session, object_session

from meddaemon import __version__
from meddaemon.daemon import claims, filing
from meddaemon.daemon.intake import Intake
from meddaemon.daemon.stability import StableFile
from meddaemon.db.bulk import insert_missing, insert_returning_ids, insert_rows
from meddaemon.db.models import (
    METADATA_COLUMNS,
    DuplicateArrival,
    Heatmap,
    ModelVersion,
    Result,
    Scan,
    ScanEvent,
    Task,
    utcnow,
)
from meddaemon.dicom import outbox
from meddaemon.engine.tasks import TaskSpec
from meddaemon.failures import FailureReason, ScanFailure
from meddaemon.states import ScanState, check_transition
from meddaemon.stored_paths import stored_file, stored_name, stored_spellings


@dataclass(frozen=True)
class Destinations:
    work_dir: Path
    archive_dir: Path
    failed_dir: Path
    #: paths under it are stored relative to it (``meddaemon.stored_paths``); None: all absolute
    state_dir: Path | None = None

    def stored(self, path: Path) -> str:
        """``path`` as a row keeps it."""
        return stored_name(path, self.state_dir) if self.state_dir is not None else str(Path(os.path.abspath(path)))

    def file(self, stored: str) -> Path:
        """The file a row's path names."""
        return stored_file(stored, self.state_dir) if self.state_dir is not None else Path(stored)

    def spellings(self, path: Path) -> tuple[str, ...]:
        """Every way a row may hold ``path`` (older rows: absolute)."""
        return stored_spellings(path, self.state_dir) if self.state_dir is not None else (self.stored(path),)


@dataclass
class PlannedMove:
    """A committed move still to carry out (``kind`` is ``scan`` or ``duplicate``)."""

    kind: str
    row_id: int
    source: Path
    target: Path
    reason_document: dict[str, object] | None = None
    #: an inbox file as it was read (``filing.finish_move``); None where it is not known (recovery)
    read_as: filing.AsRead | None = None


@dataclass
class IntakeOutcome:
    """What happened to one file, for the log line."""

    source_name: str
    state: str
    sha256: str | None = None
    size: int = 0
    task: str | None = None
    detail: str = ""
    reason: str | None = None
    target: Path | None = None
    scan_id: int | None = None


@dataclass
class BatchRecord:
    moves: list[PlannedMove] = field(default_factory=list)
    outcomes: list[IntakeOutcome] = field(default_factory=list)


def ensure_tasks(session: Session, specs: Mapping[str, TaskSpec]) -> None:
    existing = set(session.scalars(select(Task.name)))
    missing = [{"name": name, "description": specs[name].description} for name in sorted(set(specs) - existing)]
    insert_missing(session, Task, missing)


def record_batch(
    session: Session,
    files: Sequence[tuple[StableFile, PurePosixPath, Intake]],
    destinations: Destinations,
    served_tasks: Collection[str],
    claimed_by: int | None = None,
    why_waiting: Mapping[str, str] | None = None,
) -> BatchRecord:
    """Rows for a batch of read files: a few multi-row statements, whatever the batch's size.

    Routed scans whose task has a served model stay ``routed``, claimed by the daemon ``claimed_by``
    (the caller queues them for inference); the others wait in ``waiting_model``, claimed by nobody,
    saying why (``why_waiting``, by task: a model loading or failing to load; otherwise no active model).
    SQLAlchemy Core, not ORM objects: the unit of work cost about 0.8 ms of CPU per file, most of
    the transaction (benchmarks/README.md, issue 16). Rows are inserted in the batch's order.
    """
    known, failed_before = _scans_of(session, {intake.sha256 for _, _, intake in files if intake.sha256})
    failed_taken: set[Path] = set()
    entries: list[_NewScan | _NewArrival | _Registered] = []
    fresh: dict[str, _NewScan] = {}
    now = utcnow()

    for stable, name, intake in files:
        sha = intake.sha256
        original = (known.get(sha) or fresh.get(sha)) if sha else None
        if isinstance(original, _KnownScan) and original.pending_move_from == destinations.stored(stable.path):
            # this very file, registered by an attempt whose commit's answer never came (the
            # connection lost or timed out after the server had it): that scan, not its duplicate
            entries.append(_Registered(original, stable, name, intake, destinations))
            continue
        if original is not None:
            entries.append(_arrival(stable, name, intake, original, destinations, now))
            continue
        scan = _new_scan(stable, name, intake, now, _attempt_tried_again(failed_before.get(sha or "", []), name))
        entries.append(scan)
        route = intake.route
        if route is not None and route.task is not None:  # refused by its task's input contract too
            scan.values.update(task_name=route.task, routed_at=now)
            scan.step(ScanState.ROUTED, f"{route.task} ({route.why})")
        if intake.failure is not None:
            _fail_new(session, scan, name, intake.failure, destinations, failed_taken)
            continue
        assert route is not None and route.task is not None and sha
        fresh[sha] = scan
        if route.task in served_tasks:
            scan.values["claimed_by"] = claimed_by
        else:
            why = (why_waiting or {}).get(route.task) or f"no active model for task {route.task}"
            scan.step(ScanState.WAITING_MODEL, why)
        scan.target = filing.work_path(destinations.work_dir, sha, name)
        scan.values.update(
            stored_path=destinations.stored(scan.target), pending_move_from=destinations.stored(stable.path)
        )
        scan.outcome = IntakeOutcome(str(name), scan.state, sha, intake.size, route.task, route.why, target=scan.target)

    _insert_new(session, [e for e in entries if isinstance(e, _NewScan)], now)
    _insert_arrivals(session, [e for e in entries if isinstance(e, _NewArrival)])
    return BatchRecord(
        moves=[e.planned_move() for e in entries if e.target is not None],
        outcomes=[e.finished_outcome() for e in entries],
    )


@dataclass(frozen=True)
class _KnownScan:
    id: int
    source_name: str
    task_name: str | None
    failure_reason: str | None
    state: str = ""
    stored_path: str | None = None
    pending_move_from: str | None = None
    retried: bool = False


@dataclass
class _NewScan:
    """A scan row to insert (``values``), the states it passes through, and where its file goes."""

    values: dict[str, object]
    source: Path
    outcome: IntakeOutcome
    read_as: filing.AsRead | None = None
    steps: list[tuple[ScanState, str | None]] = field(default_factory=list)
    target: Path | None = None
    id: int = 0

    @property
    def state(self) -> str:
        return str(self.values["state"])

    @property
    def task_name(self) -> str | None:
        return self.values["task_name"]  # type: ignore[return-value]

    @property
    def source_name(self) -> str:
        return str(self.values["source_name"])

    def step(self, state: ScanState, detail: str | None) -> None:
        check_transition(ScanState(self.state), state)
        self.values["state"] = state.value
        self.steps.append((state, detail))

    def planned_move(self) -> PlannedMove:
        assert self.target is not None
        reason = None
        if self.state == ScanState.FAILED:
            v = self.values
            reason = _reason(
                self.id, v["source_name"], v["failure_reason"], v["failure_message"], v["sha256"], v["size_bytes"],
                v["updated_at"],
            )  # fmt: skip
        return PlannedMove("scan", self.id, self.source, self.target, reason, self.read_as)

    def finished_outcome(self) -> IntakeOutcome:
        self.outcome.scan_id = self.id
        return self.outcome


@dataclass
class _NewArrival:
    """A duplicate arrival to insert, of a scan already stored or new in the same batch."""

    values: dict[str, object]
    original: _KnownScan | _NewScan
    source: Path
    target: Path
    outcome: IntakeOutcome
    read_as: filing.AsRead | None = None
    id: int = 0

    def planned_move(self) -> PlannedMove:
        return PlannedMove("duplicate", self.id, self.source, self.target, read_as=self.read_as)

    def finished_outcome(self) -> IntakeOutcome:
        self.outcome.detail = f"same bytes as scan {self.original.id} ({self.original.source_name})"
        return self.outcome


class _Registered:
    """A file already registered as ``scan`` by an earlier attempt of this transaction whose commit
    went through unanswered: its row stands, and its move is the one that row plans."""

    def __init__(
        self, scan: _KnownScan, stable: StableFile, name: PurePosixPath, intake: Intake, destinations: Destinations
    ) -> None:
        assert scan.stored_path is not None
        self.scan = scan
        self.source = stable.path
        self.target = destinations.file(scan.stored_path)
        self.read_as = filing.AsRead(stable.signature, intake.sha256)
        detail = "registered by an attempt whose commit was not answered"
        self.outcome = IntakeOutcome(
            str(name), scan.state, intake.sha256, intake.size, scan.task_name, detail, target=self.target
        )

    def planned_move(self) -> PlannedMove:
        return PlannedMove("scan", self.scan.id, self.source, self.target, None, self.read_as)

    def finished_outcome(self) -> IntakeOutcome:
        self.outcome.scan_id = self.scan.id
        return self.outcome


def _scans_of(session: Session, shas: Collection[str]) -> tuple[dict[str, _KnownScan], dict[str, list[_KnownScan]]]:
    """The scans of these contents: the one a new arrival is a duplicate of (not failed; at most one,
    ``uq_scans_sha256_live``), and the failed attempts, oldest first, which a new arrival tries again."""
    if not shas:
        return {}, {}
    live: dict[str, _KnownScan] = {}
    failed: dict[str, list[_KnownScan]] = {}
    query = (
        select(
            Scan.id, Scan.sha256, Scan.state, Scan.source_name, Scan.task_name, Scan.failure_reason,
            Scan.stored_path, Scan.pending_move_from, Scan.retried_at,
        )
        .where(Scan.sha256.in_(shas))
        .order_by(Scan.id)
    )  # fmt: skip
    for row in session.execute(query):
        known = _KnownScan(
            row.id, row.source_name, row.task_name, row.failure_reason, row.state, row.stored_path,
            row.pending_move_from, row.retried_at is not None,
        )  # fmt: skip
        if row.state == ScanState.FAILED:
            failed.setdefault(row.sha256, []).append(known)
        else:
            live[row.sha256] = known
    return live, failed


def _attempt_tried_again(attempts: list[_KnownScan], name: PurePosixPath) -> _KnownScan | None:
    """Of the failed attempts at a new arrival's bytes, the one it tries again: the latest sent back
    for retry under this name (as it arrived, or ``__retry<id>``), else the latest. Two files of the
    same bytes failed and retried were both said to try the later one again."""
    sent_back = [
        known
        for known in attempts
        if known.retried and filing.is_return_path(name, known.source_name, known.id, RETURN_NAMES)
    ]
    return (sent_back or attempts or [None])[-1]


#: the names a retry tries in the inbox (``retry.NAME_ATTEMPTS``)
RETURN_NAMES = 100


def _new_scan(
    stable: StableFile, name: PurePosixPath, intake: Intake, now: datetime, failed_before: _KnownScan | None
) -> _NewScan:
    metadata = intake.metadata
    values: dict[str, object] = {
        "sha256": intake.sha256,
        "state": ScanState.STABLE.value,
        "source_name": str(name),
        "size_bytes": intake.size if intake.sha256 else None,
        "discovered_at": stable.discovered_at,
        "stable_at": stable.stable_at,
        "registered_at": now,
        "updated_at": now,
        "task_name": None,
        "routed_at": None,
        "claimed_by": None,
        "stored_path": None,
        "pending_move_from": None,
        "failure_reason": None,
        "failure_message": None,
        **{column: getattr(metadata, column) if metadata is not None else None for column in METADATA_COLUMNS},
    }
    read_as = filing.AsRead(stable.signature, intake.sha256)
    scan = _NewScan(values, stable.path, IntakeOutcome(str(name), ScanState.STABLE), read_as)
    again = None
    if failed_before is not None:
        again = f"a new attempt: scan {failed_before.id} of the same bytes failed ({failed_before.failure_reason})"
    scan.step(ScanState.REGISTERED, again)
    return scan


def _fail_new(
    session: Session,
    scan: _NewScan,
    name: PurePosixPath,
    failure: ScanFailure,
    destinations: Destinations,
    taken: set[Path],
) -> None:
    scan.values.update(failure_reason=failure.reason.value, failure_message=failure.message)
    scan.step(ScanState.FAILED, f"{failure.reason.value}: {failure.message}")
    if failure.reason is not FailureReason.VANISHED:  # a vanished file has no copy to keep
        scan.target = free_target(
            session, partial(filing.failed_path, destinations.failed_dir, name), taken, destinations
        )
        scan.values.update(
            stored_path=destinations.stored(scan.target), pending_move_from=destinations.stored(scan.source)
        )
    v = scan.values
    scan.outcome = IntakeOutcome(
        str(name),
        ScanState.FAILED,
        v["sha256"],  # type: ignore[arg-type]
        v["size_bytes"] or 0,  # type: ignore[arg-type]
        v.get("task_name"),  # type: ignore[arg-type]
        failure.message,
        failure.reason.value,
        scan.target,
    )


def _arrival(
    stable: StableFile,
    name: PurePosixPath,
    intake: Intake,
    original: _KnownScan | _NewScan,
    destinations: Destinations,
    now: datetime,
) -> _NewArrival:
    assert intake.sha256
    target = filing.archive_path(destinations.archive_dir / "duplicates", name, intake.sha256, now)
    values: dict[str, object] = {
        "source_name": str(name),
        "stored_path": destinations.stored(target),
        "pending_move_from": destinations.stored(stable.path),
        "size_bytes": intake.size,
        "arrived_at": now,
    }
    outcome = IntakeOutcome(str(name), "duplicate", intake.sha256, intake.size, original.task_name, target=target)
    return _NewArrival(values, original, stable.path, target, outcome, filing.AsRead(stable.signature, intake.sha256))


def _insert_new(session: Session, scans: list[_NewScan], now: datetime) -> None:
    """The scans as one multi-row INSERT (ids back in order), then their history as another."""
    if not scans:
        return
    # an inbox name is one file: no two scans of a batch share it
    ids = insert_returning_ids(session, Scan, [s.values for s in scans], key=("source_name",))
    for scan, scan_id in zip(scans, ids, strict=True):
        scan.id = scan_id
    events = [
        {"scan_id": scan.id, "state": state.value, "detail": detail, "at": now}
        for scan in scans
        for state, detail in scan.steps
    ]
    insert_rows(session, ScanEvent, events)


def _insert_arrivals(session: Session, arrivals: list[_NewArrival]) -> None:
    if not arrivals:
        return
    rows = [{**a.values, "scan_id": a.original.id} for a in arrivals]
    ids = insert_returning_ids(session, DuplicateArrival, rows, key=("stored_path",))
    for arrival, arrival_id in zip(arrivals, ids, strict=True):
        arrival.id = arrival_id


@dataclass
class _Staged:
    """A row added to the session whose id (and so its move) is known only after the flush."""

    row: Scan | DuplicateArrival
    source: Path
    target: Path | None
    outcome: IntakeOutcome

    def planned_move(self) -> PlannedMove:
        assert self.target is not None
        if isinstance(self.row, DuplicateArrival):
            return PlannedMove("duplicate", self.row.id, self.source, self.target)
        failed = self.row.state == ScanState.FAILED
        return PlannedMove("scan", self.row.id, self.source, self.target, reason_document(self.row) if failed else None)

    def finished_outcome(self) -> IntakeOutcome:
        if isinstance(self.row, DuplicateArrival):
            self.outcome.detail = f"same bytes as scan {self.row.scan.id} ({self.row.scan.source_name})"
        else:
            self.outcome.scan_id = self.row.id
        return self.outcome


def _fail(
    session: Session,
    scan: Scan,
    source: Path,
    name: PurePosixPath,
    failure: ScanFailure,
    destinations: Destinations,
    taken: set[Path],
    now: datetime,
) -> _Staged:
    scan.failure_reason, scan.failure_message = failure.reason.value, failure.message
    advance(scan, ScanState.FAILED, f"{failure.reason.value}: {failure.message}", now)
    target = None
    if failure.reason is FailureReason.VANISHED:
        scan.stored_path = None  # the copy in work/ is gone; its name is a new attempt's to take
    else:
        target = free_target(session, partial(filing.failed_path, destinations.failed_dir, name), taken, destinations)
        scan.stored_path, scan.pending_move_from = destinations.stored(target), destinations.stored(source)
    outcome = IntakeOutcome(
        str(name),
        ScanState.FAILED,
        scan.sha256,
        scan.size_bytes or 0,
        None,
        failure.message,
        failure.reason.value,
        target,
    )
    return _Staged(scan, source, target, outcome)


def free_target(
    session: Session, pick: Callable[[set[Path]], Path], taken: set[Path], destinations: Destinations
) -> Path:
    """The first name ``pick`` offers that no scan row has yet. The disk alone cannot say: another
    daemon's move to that name may be committed and not yet done. (Two transactions choosing the
    same name at the same moment are kept apart by the unique ``scans.stored_path``: the second
    fails, and its retry sees the first.)"""
    offered: set[Path] = set()
    while True:
        target = pick(taken)
        spellings = destinations.spellings(target)
        if target in offered or session.scalar(select(Scan.id).where(Scan.stored_path.in_(spellings))) is None:
            return target
        offered.add(target)
        taken.add(target)


def free_targets(
    session: Session, picks: Sequence[Callable[[set[Path]], Path]], taken: set[Path], destinations: Destinations
) -> list[Path]:
    """``free_target`` for several rows: every row's first offer checked in one query (a name is
    almost never taken); a row whose offer is taken goes on offering, one query a name."""
    offers = [pick(taken) for pick in picks]
    spellings = [destinations.spellings(offer) for offer in offers]
    wanted = [spelling for each in spellings for spelling in each]
    used = set(session.scalars(select(Scan.stored_path).where(Scan.stored_path.in_(wanted))))
    return [
        free_target(session, pick, taken, destinations) if used.intersection(each) else offer
        for pick, offer, each in zip(picks, offers, spellings, strict=True)
    ]


def reason_document(scan: Scan) -> dict[str, object]:
    """The contents of ``failed/<name>.reason.json``: enough to act on without opening the DB."""
    return _reason(
        scan.id, scan.source_name, scan.failure_reason, scan.failure_message, scan.sha256, scan.size_bytes,
        scan.updated_at,
    )  # fmt: skip


def _reason(
    scan_id: int, source_name: object, reason: object, message: object, sha256: object, size: object, at: object
) -> dict[str, object]:
    return {
        "scan_id": scan_id,
        "source_name": source_name,
        "reason": reason,
        "message": message,
        "sha256": sha256,
        "size_bytes": size,
        "failed_at": at or utcnow(),
        "meddaemon_version": __version__,
    }


def advance(scan: Scan, state: ScanState, detail: str | None, at: datetime) -> None:
    """Move a scan along the state machine and record the step in its history.

    The step of a stored scan is added by its id: appending to ``scan.events`` would load the
    whole history first, one SELECT per scan and batch.
    """
    check_transition(ScanState(scan.state), state)
    scan.state = state.value
    event = ScanEvent(state=state.value, detail=detail, at=at)
    session = object_session(scan)
    if scan.id is None or session is None:
        scan.events.append(event)
    else:
        event.scan_id = scan.id
        session.add(event)


def clear_pending(session: Session, moves: Sequence[PlannedMove], daemon_id: int | None = None) -> None:
    """Mark moves as done, so recovery leaves them alone; the files they took out of the inbox are
    no longer claimed, and archived scans are nobody's any more. Fenced like results: the moves of
    scans another daemon holds (taken over after this one was declared lost) are not touched."""
    scan_ids = [m.row_id for m in moves if m.kind == "scan"]
    if scan_ids:
        fence = claims.claimable_by(daemon_id)
        session.execute(update(Scan).where(Scan.id.in_(scan_ids), fence).values(pending_move_from=None))
        session.execute(
            update(Scan)
            .where(Scan.id.in_(scan_ids), Scan.state == ScanState.ARCHIVED, Scan.claimed_by == daemon_id)
            .values(claimed_by=None)
        )
    duplicate_ids = [m.row_id for m in moves if m.kind == "duplicate"]
    if duplicate_ids:
        session.execute(
            update(DuplicateArrival).where(DuplicateArrival.id.in_(duplicate_ids)).values(pending_move_from=None)
        )
    claims.finish_inbox_files(session, [m.source for m in moves])


def forget_files_not_kept(session: Session, moves: Sequence[PlannedMove], daemon_id: int | None) -> list[int]:
    """Moves that found their file gone from the inbox (removed, or its folder renamed) or replaced
    by other bytes: nothing was kept at their target. A scan whose copy in work/ never came fails as
    ``vanished`` now, its name in work/ freed: left as it was, it waited for a copy that would never
    come, and the same bytes found again (the renamed folder) were filed as a duplicate of it, never
    inferred. A failed scan keeps no file (a duplicate arrival's row stays as it is: the arrival was
    seen, and its name in the archive is the row's). Fenced like ``clear_pending``; returns the
    scans failed."""
    failed: list[int] = []
    scan_ids = [m.row_id for m in moves if m.kind == "scan"]
    if scan_ids:
        scans = session.scalars(select(Scan).where(Scan.id.in_(scan_ids), claims.claimable_by(daemon_id)))
        for scan in scans:
            if scan.state == ScanState.ARCHIVED:
                continue
            scan.stored_path = None
            if scan.state != ScanState.FAILED:
                why = "the file left the inbox before its copy was kept (removed, or its folder renamed)"
                scan.failure_reason, scan.failure_message = FailureReason.VANISHED.value, why
                advance(scan, ScanState.FAILED, f"{FailureReason.VANISHED.value}: {why}", utcnow())
                failed.append(scan.id)
    return failed


def moves_still_due(
    session: Session, moves: Sequence[PlannedMove], destinations: Destinations, daemon_id: int | None = None
) -> list[PlannedMove]:
    """Of ``moves``, those still journalled as they are (same source, same target) and, for scans,
    held by ``daemon_id`` or by nobody: the ones this daemon may carry out. A daemon declared lost
    that wakes up finds its moves done or taken over by another, and moves nothing."""
    scan_ids = [m.row_id for m in moves if m.kind == "scan"]
    duplicate_ids = [m.row_id for m in moves if m.kind == "duplicate"]
    rows: list[tuple[str, int, str, str]] = []
    if scan_ids:
        rows += [
            ("scan", *row)
            for row in session.execute(
                select(Scan.id, Scan.pending_move_from, Scan.stored_path).where(
                    Scan.id.in_(scan_ids), Scan.pending_move_from.is_not(None), claims.claimable_by(daemon_id)
                )
            )
        ]
    if duplicate_ids:
        rows += [
            ("duplicate", *row)
            for row in session.execute(
                select(DuplicateArrival.id, DuplicateArrival.pending_move_from, DuplicateArrival.stored_path).where(
                    DuplicateArrival.id.in_(duplicate_ids), DuplicateArrival.pending_move_from.is_not(None)
                )
            )
        ]
    due = {(kind, i, destinations.file(source), destinations.file(target)) for kind, i, source, target in rows}
    return [m for m in moves if (m.kind, m.row_id, _absolute(m.source), _absolute(m.target)) in due]


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def pending_moves(session: Session, destinations: Destinations, daemon_id: int | None = None) -> list[PlannedMove]:
    """Moves committed but maybe not carried out: the journal recovery replays after a crash. The
    moves of scans a live peer holds (its archive moves in flight) are left to it."""
    moves = [
        PlannedMove(
            "scan",
            s.id,
            destinations.file(s.pending_move_from),  # type: ignore[arg-type]
            destinations.file(s.stored_path),  # type: ignore[arg-type]
            reason_document(s) if s.state == ScanState.FAILED else None,
        )
        for s in session.scalars(
            select(Scan).where(Scan.pending_move_from.is_not(None), claims.claimable_by(daemon_id))
        )
    ]
    moves += [
        PlannedMove("duplicate", d.id, destinations.file(d.pending_move_from), destinations.file(d.stored_path))  # type: ignore[arg-type]
        for d in session.scalars(select(DuplicateArrival).where(DuplicateArrival.pending_move_from.is_not(None)))
    ]
    return moves


@dataclass
class HeatmapFile:
    """A result's heatmap as its row keeps it: the map's grid (``.npy`` bytes), the size it is read
    at (the model input's), and where its overlay JPEG is kept once drawn."""

    label_index: int
    grid: bytes
    overlay_path: Path
    height: int
    width: int
    method: str


@dataclass
class InferenceOutcome:
    """What the engine produced for one queued scan, with its heatmap files already written."""

    scan_id: int
    probabilities: Sequence[float]
    positive: Sequence[bool]
    failure: ScanFailure | None = None
    heatmaps: list[HeatmapFile] = field(default_factory=list)
    latency_ms: float | None = None


def record_results(
    session: Session,
    model: ModelVersion,
    outcomes: Sequence[InferenceOutcome],
    destinations: Destinations,
    daemon_id: int | None = None,
) -> BatchRecord:
    """Tidy result rows (one per label) and heatmaps; ``routed`` -> ``inferred``, or ``failed``.

    Only scans still ``routed`` and held by ``daemon_id`` or by nobody are stored (rows locked meanwhile):
    a scan done by an earlier run, failed meanwhile, or taken over by another daemon after this one
    was declared lost is left alone, so no result is ever doubled. Stored scans are free again
    for the next stage.

    SQLAlchemy Core on the way every batch takes (one SELECT, one UPDATE, three multi-row INSERTs);
    the ORM only for the rare failed scan, whose move and reason file need the whole row.
    """
    now = utcnow()
    labels = list(model.manifest["labels"])
    thresholds = model.manifest.get("thresholds", {})
    held = _held_routed(session, daemon_id, [o.scan_id for o in outcomes])
    failed = {o.scan_id for o in outcomes if o.failure is not None and o.scan_id in held}
    failing = claims.scans_held(session, daemon_id, failed) if failed else {}
    staged: list[_Staged] = []
    inferred: list[IntakeOutcome] = []
    events: list[dict[str, object]] = []
    result_rows: list[dict[str, object]] = []
    heatmap_of_row: list[HeatmapFile | None] = []
    by = f" by daemon {daemon_id}" if daemon_id is not None else ""
    check_transition(ScanState.ROUTED, ScanState.INFERRED)
    for outcome in outcomes:
        scan = held.get(outcome.scan_id)
        if scan is None:
            continue
        if outcome.failure is not None:
            row = failing[outcome.scan_id]
            row.claimed_by = None
            assert row.stored_path is not None
            source = destinations.file(row.stored_path)
            name = PurePosixPath(row.source_name)
            staged.append(_fail(session, row, source, name, outcome.failure, destinations, set(), now))
            continue
        for index, label in enumerate(labels):
            result_rows.append(
                {
                    "scan_id": scan.id,
                    "model_version_id": model.id,
                    "label": label,
                    "probability": float(outcome.probabilities[index]),
                    "threshold": float(thresholds.get(label, 0.5)),
                    "positive": bool(outcome.positive[index]),
                    "latency_ms": outcome.latency_ms,
                    "created_at": now,
                }
            )
            heatmap_of_row.append(next((h for h in outcome.heatmaps if h.label_index == index), None))
        top = labels[int(max(range(len(labels)), key=lambda i: outcome.probabilities[i]))]
        detail = f"{model.task_name} {model.version}: top {top}{by}"
        events.append({"scan_id": scan.id, "state": ScanState.INFERRED.value, "detail": detail, "at": now})
        inferred.append(
            IntakeOutcome(
                scan.source_name,
                ScanState.INFERRED,
                scan.sha256,
                0,
                model.task_name,
                f"{model.version}, top {top}",
                scan_id=scan.id,
            )
        )
    if events:
        session.execute(
            update(Scan)
            .where(Scan.id.in_([e["scan_id"] for e in events]))
            .values(state=ScanState.INFERRED.value, claimed_by=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        insert_rows(session, ScanEvent, events)
    insert_results(session, result_rows, heatmap_of_row, now, destinations.stored)
    session.flush()
    failures = [st.finished_outcome() for st in staged]
    return BatchRecord(
        moves=[st.planned_move() for st in staged if st.target is not None],
        outcomes=_in_order(outcomes, [*inferred, *failures]),
    )


@dataclass(frozen=True)
class _HeldScan:
    id: int
    sha256: str | None
    source_name: str


def _held_routed(session: Session, daemon_id: int | None, scan_ids: Sequence[int]) -> dict[int, _HeldScan]:
    """Of ``scan_ids``, the scans still ``routed`` and held by ``daemon_id`` or by nobody, locked
    (in id order) until the transaction ends; ``claims.scans_held`` without loading whole rows."""
    if not scan_ids:
        return {}
    query = (
        select(Scan.id, Scan.sha256, Scan.source_name)
        .where(Scan.id.in_(list(scan_ids)), claims.claimable_by(daemon_id), Scan.state == ScanState.ROUTED)
        .order_by(Scan.id)
        .with_for_update(of=Scan)
    )
    return {row.id: _HeldScan(row.id, row.sha256, row.source_name) for row in session.execute(query)}


def _in_order(outcomes: Sequence[InferenceOutcome], done: list[IntakeOutcome]) -> list[IntakeOutcome]:
    position = {outcome.scan_id: i for i, outcome in enumerate(outcomes)}
    return sorted(done, key=lambda o: position.get(o.scan_id or 0, 0))


def insert_results(
    session: Session,
    rows: Sequence[Mapping[str, object]],
    heatmaps: Sequence[HeatmapFile | None],
    now: datetime,
    stored: Callable[[Path], str],
) -> None:
    """Results and their heatmaps (``heatmaps[i]`` is the map of ``rows[i]``, or None) as two
    multi-row INSERTs: a batch of 16 scans x 14 labels is one statement, not 224 ORM objects
    flushed one by one. ``stored`` writes a heatmap's path as rows keep it (``stored_paths``)."""
    if not any(heatmaps):
        insert_rows(session, Result, rows)
        return
    ids = insert_returning_ids(session, Result, rows, key=("scan_id", "model_version_id", "label"))
    insert_heatmaps(session, list(zip(ids, heatmaps, strict=True)), now, stored)


def insert_heatmaps(
    session: Session, heatmaps: Sequence[tuple[int, HeatmapFile | None]], now: datetime, stored: Callable[[Path], str]
) -> None:
    """Heatmap rows, one multi-row INSERT: (the id of the result each maps, its map or None)."""
    rows = [
        {
            "result_id": result_id,
            "method": h.method,
            "grid": h.grid,
            "overlay_path": stored(h.overlay_path),
            "height": h.height,
            "width": h.width,
            "created_at": now,
        }
        for result_id, h in heatmaps
        if h is not None
    ]
    insert_rows(session, Heatmap, rows)


def claim_for_archive(
    session: Session, destinations: Destinations, limit: int, daemon_id: int | None = None
) -> list[PlannedMove]:
    """Reported scans whose file is still in work/ and whose DICOM outputs are no longer pending
    (delivered or dead): ``archived`` in this transaction, with the move to
    ``archive/<day>/<name as received>`` journalled, to be carried out after the commit by the
    daemon ``daemon_id``, which holds the scans until then (``clear_pending``).

    Core statements for the batch at once (its rows read and locked, their free names checked, the
    rows changed, their steps inserted): as ORM objects, with a query per name, the claim cost
    1.2 to 1.3 ms of CPU a scan, 0.2 so (benchmarks/README.md, issue 16's twelfth pass)."""
    check_transition(ScanState.REPORTED, ScanState.ARCHIVED)
    now = utcnow()
    rows = session.execute(
        select(Scan.id, Scan.stored_path, Scan.source_name, Scan.sha256)
        .where(Scan.state == ScanState.REPORTED, Scan.pending_move_from.is_(None), Scan.stored_path.is_not(None))
        .where(claims.claimable_by(daemon_id))
        .where(outbox.nothing_pending(Scan.id))  # DICOM outputs delivered or dead first (issue 14)
        .order_by(Scan.id)
        .limit(limit)
        .with_for_update(of=Scan, skip_locked=True)
    ).all()
    if not rows:
        return []
    picks = [
        partial(filing.archive_path, destinations.archive_dir, PurePosixPath(row.source_name), row.sha256 or "", now)
        for row in rows
    ]
    targets = free_targets(session, picks, set(), destinations)
    moves = [
        PlannedMove("scan", row.id, destinations.file(row.stored_path), target)
        for row, target in zip(rows, targets, strict=True)
    ]
    session.execute(
        update(Scan.__table__).where(Scan.__table__.c.id == bindparam("scan_id")),
        [
            {
                "scan_id": move.row_id,
                "pending_move_from": destinations.stored(move.source),
                "stored_path": destinations.stored(move.target),
                "claimed_by": daemon_id,
                "state": ScanState.ARCHIVED.value,
                "updated_at": now,
            }
            for move in moves
        ],
    )
    insert_rows(
        session,
        ScanEvent,
        [{"scan_id": move.row_id, "state": ScanState.ARCHIVED.value, "detail": None, "at": now} for move in moves],
    )
    return moves


@dataclass(frozen=True)
class ScanToInfer:
    scan_id: int
    task: str
    stored_path: Path
    discovered_at: datetime | None
    sha256: str | None = None


def wait_for_a_model(
    session: Session,
    served_tasks: Collection[str],
    daemon_id: int | None = None,
    stopped: Mapping[str, str] | None = None,
) -> int:
    """Routed scans of tasks without an active version (it was retired with scans queued or being
    read), and of the tasks in ``stopped`` (task -> why: this daemon stopped serving their retired
    version, its successor refused or loading), wait for a model: ``waiting_model``, unclaimed.
    They stayed routed and claimed: not counted as waiting by ``meddaemon status``, a stuck queue
    for ``meddaemon health``. Only these: a task another daemon serves, or one whose model this
    daemon is still loading at its start, keeps its routed scans. Returns how many."""
    stopped = stopped or {}
    active = select(ModelVersion.task_name).where(ModelVersion.status == "active")
    query = (
        select(Scan)
        .where(Scan.state == ScanState.ROUTED, Scan.pending_move_from.is_(None))
        .where(or_(Scan.task_name.not_in(active), Scan.task_name.in_(list(stopped))))
        .where(claims.claimable_by(daemon_id))
        .limit(1000)
        .with_for_update(of=Scan, skip_locked=True)
    )
    if served_tasks:
        query = query.where(Scan.task_name.not_in(list(served_tasks)))
    now = utcnow()
    settled = 0
    for scan in session.scalars(query):
        why = stopped.get(scan.task_name or "", f"no active model for task {scan.task_name}")
        advance(scan, ScanState.WAITING_MODEL, why, now)
        scan.claimed_by = None
        settled += 1
    return settled


def claim_for_inference(
    session: Session,
    tasks: Collection[str],
    exclude: Collection[int],
    limit: int,
    daemon_id: int | None = None,
    destinations: Destinations | None = None,
) -> list[ScanToInfer]:
    """Registered scans whose task now has a served model (after a restart, a model's promotion, or
    taken over from a lost daemon), claimed by ``daemon_id``; rows other daemons are claiming at
    this moment are skipped, not waited for."""
    if not tasks or limit <= 0:
        return []
    query = (
        select(Scan)
        .where(Scan.state.in_([ScanState.ROUTED, ScanState.WAITING_MODEL]), Scan.task_name.in_(list(tasks)))
        .where(Scan.pending_move_from.is_(None), claims.claimable_by(daemon_id))
        .order_by(Scan.id)
        .limit(limit + len(exclude))
        .with_for_update(of=Scan, skip_locked=True)
    )
    now = utcnow()
    claimed: list[ScanToInfer] = []
    for scan in session.scalars(query):
        if scan.id in exclude or scan.stored_path is None:
            continue
        if scan.state == ScanState.WAITING_MODEL:
            advance(scan, ScanState.ROUTED, f"a model for {scan.task_name} is now served", now)
        scan.claimed_by = daemon_id
        stored = destinations.file(scan.stored_path) if destinations is not None else Path(scan.stored_path)
        claimed.append(ScanToInfer(scan.id, scan.task_name or "", stored, scan.discovered_at, scan.sha256))
        if len(claimed) >= limit:
            break
    return claimed
