"""Read-side questions the CLI asks: how many scans in each state, what failed lately, how fast."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ScalarSelect, and_, func, outerjoin, select
from sqlalchemy.orm import Session, aliased

from meddaemon.db.models import DuplicateArrival, ModelVersion, Result, Scan, ScanEvent, Task, utcnow


def newest_version_of(scan_id: Any) -> ScalarSelect[Any]:
    """The model version whose results are a scan's results, wherever they are shown (reports, the
    console, the summary, DICOM outputs): the newest that ran on it, the highest version id,
    whatever order the results were stored in (``medcli evaluate --model v2`` after v3's run stores
    v2's last; the report showed v2, the console v3). ``scan_id``: an id, or the enclosing query's column."""
    other = aliased(Result)
    return select(func.max(other.model_version_id)).where(other.scan_id == scan_id).scalar_subquery()


@dataclass
class RecentFailure:
    at: datetime
    source_name: str
    reason: str
    message: str
    #: what ``medcli retry`` takes (a script read the failures and could not name one to retry)
    scan_id: int | None = None


@dataclass
class StatusSummary:
    states: dict[str, int]
    duplicates: int
    failures_by_reason: dict[str, int]
    last_failures: list[RecentFailure]
    registered_last_minute: int
    registered_last_hour: int
    pending_moves: int
    first_registered_at: datetime | None = None
    last_registered_at: datetime | None = None
    #: the tasks without an active model version, each with how many scans wait for one
    waiting_model: dict[str, int] = field(default_factory=dict)
    #: the tasks whose scans wait though they have an active version (refused, or failing to load
    #: wherever a daemon runs: the log says why), with how many wait
    waiting_active_model: dict[str, int] = field(default_factory=dict)
    #: the tasks whose active version a daemon refused (``refused_active_versions``): task ->
    #: version, refusal and when
    refused_active_model: dict[str, dict[str, object]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.states.values())

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["total"] = self.total
        return data


def status_summary(session: Session, recent: int = 10, now: datetime | None = None) -> StatusSummary:
    now = now or utcnow()
    states = dict(session.execute(select(Scan.state, func.count()).group_by(Scan.state)).all())
    reasons = dict(
        session.execute(
            select(Scan.failure_reason, func.count())
            .where(Scan.failure_reason.is_not(None))
            .group_by(Scan.failure_reason)
        ).all()
    )
    failures = [
        RecentFailure(s.updated_at, s.source_name, s.failure_reason or "", s.failure_message or "", s.id)
        for s in session.scalars(
            select(Scan)
            .where(Scan.state == "failed", Scan.retried_at.is_(None))  # a retried one is another scan's now
            .order_by(Scan.updated_at.desc(), Scan.id.desc())
            .limit(recent)
        )
    ]
    first, last = session.execute(select(func.min(Scan.registered_at), func.max(Scan.registered_at))).one()

    def registered_since(delta: timedelta) -> int:
        return session.scalar(select(func.count()).where(Scan.registered_at >= now - delta)) or 0

    pending, _ = moves_waiting(session)
    return StatusSummary(
        states={str(k): int(v) for k, v in states.items()},
        duplicates=session.scalar(select(func.count()).select_from(DuplicateArrival)) or 0,
        failures_by_reason={str(k): int(v) for k, v in reasons.items()},
        last_failures=failures,
        registered_last_minute=registered_since(timedelta(minutes=1)),
        registered_last_hour=registered_since(timedelta(hours=1)),
        pending_moves=pending,
        first_registered_at=first,
        last_registered_at=last,
        waiting_model=tasks_without_model(session),
        waiting_active_model={task: count for task, (count, _) in waiting_for_an_active_model(session).items()},
        refused_active_model={
            row.task_name: {"version": row.version, "refusal": row.refusal, "refused_at": row.refused_at}
            for row in refused_active_versions(session)
        },
    )


def moves_waiting(session: Session) -> tuple[int, datetime | None]:
    """Files whose move is committed and not yet carried out (into archive/ or failed/, or out of the
    inbox), and since when the oldest has waited (since its scan entered its state: the step that
    committed the move): held back by a folder the daemons cannot write or a disk below its reserve,
    they are tried again at each rescan."""
    held = Scan.pending_move_from.is_not(None)
    entered, scans_with_it = _entered_state(held)
    scans, scans_since = session.execute(
        select(func.count(), func.min(entered)).select_from(scans_with_it).where(held)
    ).one()
    duplicate = DuplicateArrival
    duplicates, duplicates_since = session.execute(
        select(func.count(), func.min(duplicate.arrived_at)).where(duplicate.pending_move_from.is_not(None))
    ).one()
    since = [t for t in (scans_since, duplicates_since) if t is not None]
    return int(scans or 0) + int(duplicates or 0), min(since) if since else None


def waiting_since(session: Session, states: Sequence[str]) -> dict[str, datetime]:
    """For each of ``states``, when its longest-waiting scan entered it (a report failing and tried
    again every 30 s kept its scan 30 s old for ever, and health never called the queue stuck)."""
    waiting = Scan.state.in_(states)
    entered, scans_with_it = _entered_state(waiting)
    rows = session.execute(
        select(Scan.state, func.min(entered)).select_from(scans_with_it).where(waiting).group_by(Scan.state)
    )
    return {str(state): at for state, at in rows if at is not None}


def waiting_for_an_active_model(session: Session) -> dict[str, tuple[int, datetime]]:
    """Tasks whose scans wait in ``waiting_model`` though the task has an active version (none
    of the daemons could load it: refused, or failing to load), with how many and since when."""
    active = select(ModelVersion.task_name).where(ModelVersion.status == "active")
    waiting = and_(Scan.state == "waiting_model", Scan.task_name.in_(active))
    entered, scans_with_it = _entered_state(waiting)
    rows = session.execute(
        select(Scan.task_name, func.count(), func.min(entered))
        .select_from(scans_with_it)
        .where(waiting)
        .group_by(Scan.task_name)
    )
    return {str(task): (int(n), at) for task, n, at in rows}


def _entered_state(*where: Any) -> tuple[Any, Any]:
    """For the scans ``where`` selects: when each entered its current state (its latest event into
    it, ``updated_at`` where it has none), and the scans joined to what gives it. ``updated_at``
    itself moves with every later write: each claim, a daemon's stop giving its claims back."""
    entered = (
        select(ScanEvent.scan_id, func.max(ScanEvent.at).label("at"))
        .join(Scan, Scan.id == ScanEvent.scan_id)
        .where(*where, ScanEvent.state == Scan.state)
        .group_by(ScanEvent.scan_id)
        .subquery()
    )
    return func.coalesce(entered.c.at, Scan.updated_at), outerjoin(Scan, entered, entered.c.scan_id == Scan.id)


def refused_active_versions(session: Session) -> list[ModelVersion]:
    """The active versions a daemon refused to serve since their promotion (its predecessor serves
    meanwhile, or the task's scans wait): ``registry.record_refusal``."""
    query = select(ModelVersion).where(ModelVersion.status == "active", ModelVersion.refusal.is_not(None))
    return list(session.scalars(query.order_by(ModelVersion.task_name)))


def tasks_without_model(session: Session) -> dict[str, int]:
    """Every task (of the tasks table or of a scan) with no active model version, and how many
    scans wait in ``waiting_model`` for it: what a new user must promote a model for."""
    active = set(session.scalars(select(ModelVersion.task_name).where(ModelVersion.status == "active")))
    waiting = dict(
        session.execute(
            select(Scan.task_name, func.count())
            .where(Scan.state == "waiting_model", Scan.task_name.is_not(None))
            .group_by(Scan.task_name)
        ).all()
    )
    tasks = set(session.scalars(select(Task.name))) | set(waiting)
    return {str(task): int(waiting.get(task, 0)) for task in sorted(tasks - active)}
