"""The database side of intake: one transaction turns a batch of read files into rows.

Nothing here touches the inbox. It decides, for each file, its row and where the file must go, and
returns those moves for the caller to carry out after the commit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, object_session

from meddaemon import __version__
from meddaemon.daemon import claims, filing
from meddaemon.daemon.intake import Intake
from meddaemon.daemon.stability import StableFile
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
from meddaemon.engine.tasks import TaskSpec
from meddaemon.failures import FailureReason, ScanFailure
from meddaemon.states import ScanState, check_transition


@dataclass(frozen=True)
class Destinations:
    work_dir: Path
    archive_dir: Path
    failed_dir: Path


@dataclass
class PlannedMove:
    """A committed move still to carry out (``kind`` is ``scan`` or ``duplicate``)."""

    kind: str
    row_id: int
    source: Path
    target: Path
    reason_document: dict[str, object] | None = None


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
    for name in sorted(set(specs) - existing):
        session.add(Task(name=name, description=specs[name].description))


def record_batch(
    session: Session,
    files: Sequence[tuple[StableFile, PurePosixPath, Intake]],
    destinations: Destinations,
    served_tasks: Collection[str],
    claimed_by: int | None = None,
) -> BatchRecord:
    """Rows for a batch of read files, flushed once (a flush per file cost 70% of ingest time).

    Routed scans whose task has a served model stay ``routed``, claimed by the daemon ``claimed_by``
    (the caller queues them for inference); the others wait in ``waiting_model``, claimed by nobody.
    """
    shas = {intake.sha256 for _, _, intake in files if intake.sha256}
    known: dict[str, Scan] = (
        {s.sha256: s for s in session.scalars(select(Scan).where(Scan.sha256.in_(shas))) if s.sha256} if shas else {}
    )
    failed_taken: set[Path] = set()
    staged: list[_Staged] = []
    now = utcnow()

    for stable, name, intake in files:
        if intake.sha256 and intake.sha256 in known:
            staged.append(_duplicate(session, stable, name, intake, known[intake.sha256], destinations, now))
            continue
        scan = _register(session, stable, name, intake, now)
        if intake.sha256:
            known[intake.sha256] = scan

        if intake.failure is not None:
            staged.append(_fail(session, scan, stable.path, name, intake.failure, destinations, failed_taken, now))
            continue

        route = intake.route
        assert route is not None and route.task is not None and intake.sha256
        scan.task_name, scan.routed_at = route.task, now
        _advance(scan, ScanState.ROUTED, f"{route.task} ({route.why})", now)
        if route.task in served_tasks:
            scan.claimed_by = claimed_by
        else:
            _advance(scan, ScanState.WAITING_MODEL, f"no active model for task {route.task}", now)
        target = filing.work_path(destinations.work_dir, intake.sha256, name)
        scan.stored_path, scan.pending_move_from = str(target), str(stable.path)
        outcome = IntakeOutcome(str(name), scan.state, intake.sha256, intake.size, route.task, route.why, target=target)
        staged.append(_Staged(scan, stable.path, target, outcome))

    session.flush()
    return BatchRecord(
        moves=[st.planned_move() for st in staged if st.target is not None],
        outcomes=[st.finished_outcome() for st in staged],
    )


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


def _register(session: Session, stable: StableFile, name: PurePosixPath, intake: Intake, now: datetime) -> Scan:
    scan = Scan(
        sha256=intake.sha256,
        state=ScanState.STABLE,
        source_name=str(name),
        size_bytes=intake.size if intake.sha256 else None,
        discovered_at=stable.discovered_at,
        stable_at=stable.stable_at,
        registered_at=now,
        updated_at=now,
    )
    if intake.metadata is not None:
        for column in METADATA_COLUMNS:
            setattr(scan, column, getattr(intake.metadata, column))
    session.add(scan)
    _advance(scan, ScanState.REGISTERED, None, now)
    return scan


def _duplicate(
    session: Session,
    stable: StableFile,
    name: PurePosixPath,
    intake: Intake,
    original: Scan,
    destinations: Destinations,
    now: datetime,
) -> _Staged:
    assert intake.sha256
    target = filing.archive_path(destinations.archive_dir / "duplicates", name, intake.sha256, now)
    arrival = DuplicateArrival(
        scan=original,
        source_name=str(name),
        stored_path=str(target),
        pending_move_from=str(stable.path),
        size_bytes=intake.size,
        arrived_at=now,
    )
    session.add(arrival)
    outcome = IntakeOutcome(str(name), "duplicate", intake.sha256, intake.size, original.task_name, target=target)
    return _Staged(arrival, stable.path, target, outcome)


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
    _advance(scan, ScanState.FAILED, f"{failure.reason.value}: {failure.message}", now)
    target = None
    if failure.reason is not FailureReason.VANISHED:
        target = free_target(session, partial(filing.failed_path, destinations.failed_dir, name), taken)
        scan.stored_path, scan.pending_move_from = str(target), str(source)
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


def free_target(session: Session, pick: Callable[[set[Path]], Path], taken: set[Path]) -> Path:
    """The first name ``pick`` offers that no scan row has yet. The disk alone cannot say: another
    daemon's move to that name may be committed and not yet done. (Two transactions choosing the
    same name at the same moment are kept apart by the unique ``scans.stored_path``: the second
    fails, and its retry sees the first.)"""
    offered: set[Path] = set()
    while True:
        target = pick(taken)
        if target in offered or session.scalar(select(Scan.id).where(Scan.stored_path == str(target))) is None:
            return target
        offered.add(target)
        taken.add(target)


def reason_document(scan: Scan) -> dict[str, object]:
    """The contents of ``failed/<name>.reason.json``: enough to act on without opening the DB."""
    return {
        "scan_id": scan.id,
        "source_name": scan.source_name,
        "reason": scan.failure_reason,
        "message": scan.failure_message,
        "sha256": scan.sha256,
        "size_bytes": scan.size_bytes,
        "failed_at": scan.updated_at or utcnow(),
        "meddaemon_version": __version__,
    }


def _advance(scan: Scan, state: ScanState, detail: str | None, at: datetime) -> None:
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


def clear_pending(session: Session, moves: Sequence[PlannedMove]) -> None:
    """Mark moves as done, so recovery leaves them alone; the files they took out of the inbox are
    no longer claimed."""
    for kind, model in (("scan", Scan), ("duplicate", DuplicateArrival)):
        ids = [m.row_id for m in moves if m.kind == kind]
        if ids:
            session.execute(update(model).where(model.id.in_(ids)).values(pending_move_from=None))
    claims.finish_inbox_files(session, [m.source for m in moves])


def pending_moves(session: Session) -> list[PlannedMove]:
    """Moves committed but maybe not carried out: the journal recovery replays after a crash."""
    moves = [
        PlannedMove(
            "scan",
            s.id,
            Path(s.pending_move_from),  # type: ignore[arg-type]
            Path(s.stored_path),  # type: ignore[arg-type]
            reason_document(s) if s.state == ScanState.FAILED else None,
        )
        for s in session.scalars(select(Scan).where(Scan.pending_move_from.is_not(None)))
    ]
    moves += [
        PlannedMove("duplicate", d.id, Path(d.pending_move_from), Path(d.stored_path))  # type: ignore[arg-type]
        for d in session.scalars(select(DuplicateArrival).where(DuplicateArrival.pending_move_from.is_not(None)))
    ]
    return moves


@dataclass
class HeatmapFile:
    label_index: int
    array_path: Path
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
    """
    now = utcnow()
    labels = list(model.manifest["labels"])
    thresholds = model.manifest.get("thresholds", {})
    scans = claims.scans_held(session, daemon_id, [o.scan_id for o in outcomes])
    staged: list[_Staged] = []
    result_rows: list[dict[str, object]] = []
    heatmap_of_row: list[HeatmapFile | None] = []
    for outcome in outcomes:
        scan = scans.get(outcome.scan_id)
        if scan is None or scan.state != ScanState.ROUTED:
            continue
        scan.claimed_by = None
        if outcome.failure is not None:
            assert scan.stored_path is not None
            name = PurePosixPath(scan.source_name)
            staged.append(_fail(session, scan, Path(scan.stored_path), name, outcome.failure, destinations, set(), now))
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
        by = f" by daemon {daemon_id}" if daemon_id is not None else ""
        _advance(scan, ScanState.INFERRED, f"{model.task_name} {model.version}: top {top}{by}", now)
        staged.append(
            _Staged(
                scan,
                Path(),
                None,
                IntakeOutcome(
                    scan.source_name, ScanState.INFERRED, scan.sha256, 0, model.task_name, f"{model.version}, top {top}"
                ),
            )
        )
    _insert_results(session, result_rows, heatmap_of_row, now)
    session.flush()
    return BatchRecord(
        moves=[st.planned_move() for st in staged if st.target is not None],
        outcomes=[st.finished_outcome() for st in staged],
    )


def _insert_results(
    session: Session, rows: list[dict[str, object]], heatmaps: list[HeatmapFile | None], now: datetime
) -> None:
    """Results and their heatmaps as two multi-row INSERTs: a batch of 16 scans x 14 labels is one
    statement, not 224 ORM objects flushed one by one."""
    if not rows:
        return
    ids = session.scalars(insert(Result).returning(Result.id, sort_by_parameter_order=True), rows).all()
    heatmap_rows = [
        {
            "result_id": result_id,
            "method": h.method,
            "array_path": str(h.array_path),
            "overlay_path": str(h.overlay_path),
            "height": h.height,
            "width": h.width,
            "created_at": now,
        }
        for result_id, h in zip(ids, heatmaps, strict=True)
        if h is not None
    ]
    if heatmap_rows:
        session.execute(insert(Heatmap), heatmap_rows)


def claim_for_archive(session: Session, destinations: Destinations, limit: int) -> list[PlannedMove]:
    """Reported scans whose file is still in work/: ``archived`` in this transaction, with the move
    to ``archive/<day>/<name as received>`` journalled, to be carried out after the commit."""
    now = utcnow()
    taken: set[Path] = set()
    moves: list[PlannedMove] = []
    query = (
        select(Scan)
        .where(Scan.state == ScanState.REPORTED, Scan.pending_move_from.is_(None), Scan.stored_path.is_not(None))
        .order_by(Scan.id)
        .limit(limit)
        .with_for_update(of=Scan, skip_locked=True)
    )
    for scan in session.scalars(query):
        source = Path(scan.stored_path)  # type: ignore[arg-type]
        name = PurePosixPath(scan.source_name)
        target = free_target(
            session, partial(filing.archive_path, destinations.archive_dir, name, scan.sha256 or "", now), taken
        )
        scan.pending_move_from, scan.stored_path = str(source), str(target)
        _advance(scan, ScanState.ARCHIVED, None, now)
        moves.append(PlannedMove("scan", scan.id, source, target))
    return moves


@dataclass(frozen=True)
class ScanToInfer:
    scan_id: int
    task: str
    stored_path: Path
    discovered_at: datetime | None


def claim_for_inference(
    session: Session, tasks: Collection[str], exclude: Collection[int], limit: int, daemon_id: int | None = None
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
            _advance(scan, ScanState.ROUTED, f"a model for {scan.task_name} is now served", now)
        scan.claimed_by = daemon_id
        claimed.append(ScanToInfer(scan.id, scan.task_name or "", Path(scan.stored_path), scan.discovered_at))
        if len(claimed) >= limit:
            break
    return claimed
