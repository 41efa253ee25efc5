"""What the console's pages show, read in one read-only session per page (``db.readonly``).

Every query here is bounded: the worklist pages by keyset (``id < after``, newest first, on the
``ix_scans_state_id`` / ``ix_scans_task_id`` indexes), counts run on indexed columns, and per-scan
details are fetched only for the scans of the page. Patient fields are returned only when the
caller asks for them (``with_phi``): a viewer's pages never hold them, not even hidden.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, not_, or_, select, tuple_
from sqlalchemy.orm import Session

from meddaemon.daemon.lease import RunningDaemon, running_daemons
from meddaemon.db.models import (
    Audit,
    AuditPdf,
    DuplicateArrival,
    Heatmap,
    ModelVersion,
    Report,
    Result,
    Scan,
    ScanEvent,
    Task,
    WebAction,
    utcnow,
)
from meddaemon.db.queries import newest_version_of
from meddaemon.engine.heatmap_grid import map_is_flat
from meddaemon.failures import HARMS_ITS_DECODER, NEVER_DECODED
from meddaemon.label_results import names_a_class, places_ranking_the_call, shown_against
from meddaemon.states import ScanState

#: States a scan waits in for a daemon (or a model) to act on it.
WAITING_STATES = (ScanState.ROUTED, ScanState.WAITING_MODEL, ScanState.INFERRED)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_RESTORED_ROWS = 1000
CALLS = ("positive", "negative")
_HEX = re.compile(r"^[0-9a-f]{6,64}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; the daemon stores UTC."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# -- overview -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HourCount:
    start: datetime
    count: int


@dataclass(frozen=True)
class OldestWaiting:
    scan_id: int
    state: str
    since: datetime
    age_seconds: float


@dataclass
class Overview:
    states: dict[str, int]
    total: int
    registered_per_hour: list[HourCount]
    #: throughput: scans the daemons inferred in each of those hours
    inferred_per_hour: list[HourCount]
    #: (reason, scans that ever failed with it, those of them still failed and not sent for retry)
    failures_by_reason: list[tuple[str, int, int]]
    daemons: list[RunningDaemon]
    active_models: dict[str, str]
    tasks: list[str]
    oldest_waiting: OldestWaiting | None


def overview(session: Session, hours: int = 12, now: datetime | None = None) -> Overview:
    now = now or utcnow()
    states = {str(k): int(v) for k, v in session.execute(select(Scan.state, func.count()).group_by(Scan.state))}
    starts = hour_starts(now, hours)
    outstanding = case((and_(Scan.state == ScanState.FAILED.value, Scan.retried_at.is_(None)), 1), else_=0)
    reasons = session.execute(
        select(Scan.failure_reason, func.count(), func.sum(outstanding))
        .where(Scan.failure_reason.is_not(None))
        .group_by(Scan.failure_reason)
        .order_by(func.count().desc())
    ).all()
    daemons = [daemon for daemon in running_daemons(session) if daemon.alive]
    active = dict(
        session.execute(
            select(ModelVersion.task_name, ModelVersion.version).where(ModelVersion.status == "active")
        ).all()
    )
    tasks = sorted({*active, *session.scalars(select(ModelVersion.task_name).distinct())})
    # the first-registered scan of each waiting state, on the (state, id) index: sorting every
    # waiting scan by updated_at would read them all
    firsts = [
        session.execute(
            select(Scan.id, Scan.state, Scan.updated_at).where(Scan.state == state.value).order_by(Scan.id).limit(1)
        ).first()
        for state in WAITING_STATES
    ]
    oldest_row = min((r for r in firsts if r is not None), key=lambda r: (aware(r.updated_at), r.id), default=None)
    oldest = None
    if oldest_row is not None:
        since = aware(oldest_row.updated_at)
        assert since is not None
        oldest = OldestWaiting(oldest_row.id, oldest_row.state, since, max(0.0, (now - since).total_seconds()))
    return Overview(
        states=states,
        total=sum(states.values()),
        registered_per_hour=per_hour(session, starts, Scan.registered_at),
        inferred_per_hour=inferred_per_hour(session, starts),
        failures_by_reason=[(str(r), int(n), int(open_ or 0)) for r, n, open_ in reasons],
        daemons=daemons,
        active_models={str(k): str(v) for k, v in active.items()},
        tasks=tasks,
        oldest_waiting=oldest,
    )


def hour_starts(now: datetime, hours: int) -> list[datetime]:
    """The starts of the last ``hours`` whole hours, the current one included."""
    top = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return [top - timedelta(hours=h) for h in range(hours, 0, -1)]


def per_hour(session: Session, starts: list[datetime], at: Any, *where: Any) -> list[HourCount]:
    """The rows (matching ``where``) whose time ``at`` falls in the hour from each of ``starts``."""
    hour = timedelta(hours=1)
    return [
        HourCount(start, int(session.scalar(select(func.count()).where(*where, at >= start, at < start + hour)) or 0))
        for start in starts
    ]


def inferred_per_hour(session: Session, starts: list[datetime]) -> list[HourCount]:
    """The throughput: scans inferred in each hour, on the ``(state, at)`` index of ``scan_events``."""
    return per_hour(session, starts, ScanEvent.at, ScanEvent.state == ScanState.INFERRED.value)


# -- worklist -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters, as the query string gives them ('' : not filtered)."""

    state: str = ""
    task: str = ""
    label: str = ""
    call: str = ""
    since: date | None = None
    until: date | None = None
    q: str = ""
    #: failed with this reason and not yet sent for retry: the failures page's groups
    reason: str = ""

    def query_params(self) -> dict[str, str]:
        values = {
            "reason": self.reason,
            "state": self.state,
            "task": self.task,
            "label": self.label,
            "call": self.call,
            "since": self.since.isoformat() if self.since else "",
            "until": self.until.isoformat() if self.until else "",
            "q": self.q,
        }
        return {k: v for k, v in values.items() if v}


@dataclass(frozen=True)
class TopCall:
    label: str
    probability: float
    positive: bool
    #: its call names a class, not a finding (a multiclass model's top class, a binary model's
    #: negative class): no alarm, shown in black, as in the report (``names_a_class``)
    names_a_class: bool = False


@dataclass(frozen=True)
class WorklistRow:
    id: int
    source_name: str
    task: str | None
    state: str
    registered_at: datetime | None
    updated_at: datetime | None
    failure_reason: str | None
    top: TopCall | None
    #: the heatmap of the top call, for the thumbnail (None: a rendering of the scan)
    heatmap_id: int | None
    patient_name: str | None = None
    #: a picture of the scan can be shown (``picture_file``): without one, nor a heatmap, no thumbnail
    has_picture: bool = True


@dataclass
class WorklistPage:
    rows: list[WorklistRow]
    #: the id to pass as ``after`` for the next page (None: this is the last one)
    next_after: int | None


def _filtered(session: Session, f: WorklistFilter) -> list[Any]:
    conditions: list[Any] = []
    if f.state:
        conditions.append(Scan.state == f.state)
    if f.reason:
        conditions += [Scan.state == ScanState.FAILED, Scan.failure_reason == f.reason, Scan.retried_at.is_(None)]
    if f.task:
        conditions.append(Scan.task_name == f.task)
    if f.since:
        conditions.append(Scan.registered_at >= datetime.combine(f.since, time(), UTC))
    if f.until and f.until < date.max:
        conditions.append(Scan.registered_at < datetime.combine(f.until + timedelta(days=1), time(), UTC))
    if f.label or f.call:
        result = select(Result.id).where(
            Result.scan_id == Scan.id, Result.model_version_id == newest_version_of(Result.scan_id)
        )
        if f.label:  # that label's call
            result = result.where(Result.label == f.label)
            if f.call:
                result = result.where(Result.positive.is_(f.call == "positive"))
            conditions.append(exists(result))
        else:  # a finding called, or results without one
            finding = result.where(Result.positive.is_(True), not_(_calls_naming_a_class(session)))
            if f.call == "positive":
                conditions.append(exists(finding))
            else:
                conditions += [exists(result), not_(exists(finding))]
    if f.q:
        conditions.append(_search(f.q.strip()))
    return conditions


def _calls_naming_a_class(session: Session) -> Any:
    """Whether a result's positive call names a class, not a finding (``names_a_class``), as its row
    shows it: a multiclass model's top class ("normal" of busi listed every busi scan as a finding
    called), or a binary model's negative class ("No IDC"). The versions' manifests are read here, a
    row each: read in the query, each result's row parsed its version's manifest again (seconds for
    a rare finding over 20,000 scans on PostgreSQL)."""
    naming: list[tuple[int, str]] = []
    for version_id, manifest in session.execute(select(ModelVersion.id, ModelVersion.manifest)):
        labels = (manifest or {}).get("labels")
        if isinstance(labels, list):
            naming += [(version_id, str(label)) for label in labels if _names_a_class(manifest, str(label))]
    return tuple_(Result.model_version_id, Result.label).in_(naming)


def _search(q: str) -> Any:
    """A file name that contains ``q`` in any case, a SHA-256 that starts with it, or the study whose
    UID it is. The case is ignored on every database (``lower`` on both sides: LIKE ignores case on
    SQLite and not on PostgreSQL)."""
    key = q.lower()
    options: list[Any] = [Scan.source_name.icontains(q, autoescape=True)]
    if _HEX.match(key):
        # a range, not LIKE: SQLite's LIKE is case-insensitive and then skips the index
        options.append(and_(Scan.sha256 >= key, Scan.sha256 < key + "g"))
    if _UID.match(q):
        options.append(Scan.study_instance_uid == q)
    return or_(*options)


def worklist(
    session: Session,
    f: WorklistFilter,
    after: int | None = None,
    limit: int = PAGE_SIZE,
    with_phi: bool = False,
    through: int | None = None,
) -> WorklistPage:
    """A page of scans, newest first, after the scan id ``after`` (keyset: as fast on page 1,000 as on page 1).

    ``through``: the pages the browser had loaded, from the newest down to that scan id (at most
    ``MAX_RESTORED_ROWS``), as the address says once "Next" has appended rows; Back and reload show them again.
    """
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    if through is not None and after is None:
        loaded = session.scalar(
            select(func.count()).select_from(Scan).where(*_filtered(session, f), Scan.id >= through)
        )
        limit = max(limit, min(loaded or 0, MAX_RESTORED_ROWS))
    columns = [
        Scan.id,
        Scan.source_name,
        Scan.task_name,
        Scan.state,
        Scan.registered_at,
        Scan.updated_at,
        Scan.failure_reason,
        Scan.stored_path,
        Scan.source_path,
    ]
    if with_phi:
        columns.append(Scan.patient_name)
    query = select(*columns).where(*_filtered(session, f))
    if after is not None:
        query = query.where(Scan.id < after)
    rows = session.execute(query.order_by(Scan.id.desc()).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    tops = top_calls(session, [r.id for r in rows])
    page = [
        WorklistRow(
            id=r.id,
            source_name=r.source_name,
            task=r.task_name,
            state=r.state,
            registered_at=aware(r.registered_at),
            updated_at=aware(r.updated_at),
            failure_reason=r.failure_reason,
            top=tops[r.id][0] if r.id in tops else None,
            heatmap_id=tops[r.id][1] if r.id in tops else None,
            patient_name=r.patient_name if with_phi else None,
            has_picture=picture_file(r.stored_path, r.source_path, r.state, r.failure_reason) is not None,
        )
        for r in rows
    ]
    return WorklistPage(page, rows[-1].id if more and rows else None)


def top_calls(session: Session, scan_ids: Sequence[int]) -> dict[int, tuple[TopCall, int | None]]:
    """Each scan's top call under the latest model version that ran on it: the most probable positive
    label, else the most probable label; with the id of its heatmap, or any of the scan's."""
    if not scan_ids:
        return {}
    rows = session.execute(
        select(
            Result.scan_id,
            Result.model_version_id,
            Result.label,
            Result.probability,
            Result.positive,
            Heatmap.id,
            ModelVersion.manifest,
        )
        .join(ModelVersion, ModelVersion.id == Result.model_version_id)
        .outerjoin(Heatmap, Heatmap.result_id == Result.id)
        .where(Result.scan_id.in_(scan_ids))
    ).all()
    latest: dict[int, int] = {}
    for r in rows:
        latest[r.scan_id] = max(latest.get(r.scan_id, r.model_version_id), r.model_version_id)
    best: dict[int, tuple[tuple[bool, float], TopCall, int | None]] = {}
    any_map: dict[int, int] = {}
    for r in rows:
        if r.model_version_id != latest[r.scan_id]:
            continue
        if r.id is not None:
            any_map.setdefault(r.scan_id, r.id)
        rank = (bool(r.positive), float(r.probability))
        if r.scan_id not in best or rank > best[r.scan_id][0]:
            call = TopCall(r.label, float(r.probability), bool(r.positive), _names_a_class(r.manifest, r.label))
            best[r.scan_id] = (rank, call, r.id)
    return {sid: (top, heatmap or any_map.get(sid)) for sid, (_, top, heatmap) in best.items()}


# -- one scan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelCall:
    label: str
    probability: float
    threshold: float
    positive: bool
    heatmap_id: int | None
    #: decimals of the percentages: more where a multiclass call would read as its runner-up
    places: int = 1
    #: its map marks no part of the image (``map_is_flat``): the overlay is the bare scan, as the PDF says
    flat: bool = False
    #: a positive call of it names a class, not a finding (``names_a_class``): "called", in black
    names_a_class: bool = False

    @property
    def shown(self) -> tuple[str, str]:
        """The probability and the threshold as percentages that compare as the call does."""
        return shown_against(self.probability, self.threshold, self.positive, self.places, percent=True)


@dataclass
class VersionResults:
    model_version_id: int
    task: str
    version: str
    created_at: datetime | None
    latency_ms: float | None
    calls: list[LabelCall]
    #: False for a version that makes none (an ONNX graph imported without a CAM feature map)
    makes_heatmaps: bool = True
    #: its call is the top class (no threshold applies): ``called``, in black, as in the PDF report
    multiclass: bool = False

    @property
    def maps(self) -> list[LabelCall]:
        """One map per positive label (a label with a map but no positive call is shown on its own)."""
        with_map = [c for c in self.calls if c.heatmap_id is not None]
        positive = [c for c in with_map if c.positive]
        return positive or with_map


@dataclass(frozen=True)
class TimelineStep:
    state: str
    at: datetime | None
    detail: str | None


@dataclass(frozen=True)
class ReportFile:
    id: int
    kind: str
    with_phi: bool
    pages: int
    created_at: datetime | None


@dataclass
class ScanDetail:
    id: int
    sha256: str | None
    source_name: str
    task: str | None
    state: str
    failure_reason: str | None
    failure_message: str | None
    registered_at: datetime | None
    retried_at: datetime | None
    has_file: bool
    study_instance_uid: str | None
    metadata: list[tuple[str, str]]
    results: list[VersionResults]
    timeline: list[TimelineStep]
    reports: list[ReportFile]
    duplicates: int
    patient: dict[str, str] = field(default_factory=dict)

    @property
    def never_decoded(self) -> bool:
        """The daemon could not decode its file (``NEVER_DECODED``): no picture, and no result to wait for."""
        return self.failure_reason in NEVER_DECODED


#: DICOM metadata shown to every role, (label, column)
METADATA = (
    ("Format", "format"),
    ("Modality", "modality"),
    ("Body part", "body_part"),
    ("View", "view_position"),
    ("Manufacturer", "manufacturer"),
    ("Rows", "rows"),
    ("Columns", "columns"),
    ("Frames", "frames"),
    ("Samples per pixel", "samples_per_pixel"),
    ("Photometric", "photometric_interpretation"),
    ("Bits stored", "bits_stored"),
    ("Transfer syntax", "transfer_syntax_uid"),
    ("SOP class", "sop_class_uid"),
    ("Series", "series_instance_uid"),
    ("SOP instance", "sop_instance_uid"),
)
#: patient data, for clinicians and admins only
PATIENT = (
    ("Patient name", "patient_name"),
    ("Patient ID", "patient_id"),
    ("Birth date", "patient_birth_date"),
    ("Sex", "patient_sex"),
    ("Age", "patient_age"),
    ("Accession number", "accession_number"),
)


def scan_detail(session: Session, scan_id: int, with_phi: bool = False) -> ScanDetail | None:
    scan = session.get(Scan, scan_id)
    if scan is None:
        return None
    rows = session.execute(
        select(Result, ModelVersion.task_name, ModelVersion.version, ModelVersion.manifest, Heatmap.id, Heatmap.grid)
        .join(ModelVersion, ModelVersion.id == Result.model_version_id)
        .outerjoin(Heatmap, Heatmap.result_id == Result.id)
        .where(Result.scan_id == scan_id)
        .order_by(Result.model_version_id.desc(), Result.id)
    ).all()
    by_version: dict[int, VersionResults] = {}
    multiclass: set[int] = set()
    for result, task, version, manifest, heatmap_id, grid in rows:
        group = by_version.setdefault(
            result.model_version_id,
            VersionResults(
                result.model_version_id,
                task,
                version,
                aware(result.created_at),
                result.latency_ms,
                [],
                makes_heatmaps=bool((manifest or {}).get("heatmaps", True)),
            ),
        )
        flat = grid is not None and map_is_flat(grid)
        a_class = _names_a_class(manifest, result.label)
        values = (result.label, result.probability, result.threshold, result.positive, heatmap_id)
        call = LabelCall(*values, flat=flat, names_a_class=a_class)
        group.calls.append(call)
        if _multiclass(manifest):
            multiclass.add(result.model_version_id)
    for version_id in multiclass:  # the top class is the call: shown above its runner-up, not equal to it
        group = by_version[version_id]
        group.multiclass = True
        places = places_ranking_the_call(group.calls, 1, percent=True)
        group.calls = [dataclasses.replace(call, places=places) for call in group.calls]
    events = session.scalars(select(ScanEvent).where(ScanEvent.scan_id == scan_id).order_by(ScanEvent.id)).all()
    reports = session.scalars(
        select(Report).where(Report.scan_id == scan_id, Report.kind == "scan").order_by(Report.id)
    ).all()
    duplicates = session.scalar(select(func.count()).where(DuplicateArrival.scan_id == scan_id)) or 0
    metadata = [(name, str(getattr(scan, col))) for name, col in METADATA if getattr(scan, col) not in (None, "")]
    patient = {}
    if with_phi:
        patient = {name: str(getattr(scan, col)) for name, col in PATIENT if getattr(scan, col) not in (None, "")}
    return ScanDetail(
        id=scan.id,
        sha256=scan.sha256,
        source_name=scan.source_name,
        task=scan.task_name,
        state=scan.state,
        failure_reason=scan.failure_reason,
        failure_message=scan.failure_message,
        registered_at=aware(scan.registered_at),
        retried_at=aware(scan.retried_at),
        has_file=picture_file(scan.stored_path, scan.source_path, scan.state, scan.failure_reason) is not None,
        study_instance_uid=scan.study_instance_uid,
        metadata=metadata,
        results=list(by_version.values()),
        timeline=[TimelineStep(e.state, aware(e.at), e.detail) for e in events],
        reports=[ReportFile(r.id, r.kind, r.with_phi, r.pages, aware(r.created_at)) for r in reports],
        duplicates=int(duplicates),
        patient=patient,
    )


def _multiclass(manifest: dict[str, Any] | None) -> bool:
    """Whether a version's manifest says its call is the top class."""
    return (manifest or {}).get("kind") == "multiclass"


def _names_a_class(manifest: dict[str, Any] | None, label: str) -> bool:
    """Whether a version's positive call of ``label`` names a class, not a finding (``names_a_class``)."""
    manifest = manifest or {}
    return names_a_class(str(manifest.get("kind", "")), list(manifest.get("labels") or []), label)


def picture_file(
    stored_path: str | None, source_path: str | None, state: str, failure_reason: str | None = None
) -> str | None:
    """Where a scan's picture is: the file kept of it, or, for a scan evaluated in place (nothing of
    it is kept: ``medcli evaluate``), the dataset's file where it lies. A file that crashed a decoding
    worker, or whose read never ended, has none: the console decodes in its own process, the
    daemon's when it serves it. Nor has one the daemon could not decode (``NEVER_DECODED``)."""
    if failure_reason in HARMS_ITS_DECODER or failure_reason in NEVER_DECODED:
        return None
    if stored_path is not None:
        return stored_path
    return source_path if state == ScanState.EVALUATED else None


@dataclass(frozen=True)
class ScanPicture:
    #: the file to show (``picture_file``), None when there is none
    path: str | None
    #: for a file read where it lies: the SHA-256 its bytes must still have (it may have changed since)
    sha256: str | None
    #: the file crashed a decoding worker or never ended (``HARMS_ITS_DECODER``): kept, never decoded here
    crashed_a_decoder: bool = False
    #: the daemon could not decode the file (``NEVER_DECODED``)
    never_decoded: bool = False


def scan_picture(session: Session, scan_id: int) -> ScanPicture | None:
    """Where scan ``scan_id``'s picture is; None when there is no such scan."""
    row = session.execute(
        select(Scan.stored_path, Scan.source_path, Scan.state, Scan.sha256, Scan.failure_reason).where(
            Scan.id == scan_id
        )
    ).first()
    if row is None:
        return None
    path = picture_file(row.stored_path, row.source_path, row.state, row.failure_reason)
    crashed = row.failure_reason in HARMS_ITS_DECODER
    never = row.failure_reason in NEVER_DECODED
    return ScanPicture(path, row.sha256 if row.stored_path is None else None, crashed, never)


@dataclass(frozen=True)
class HeatmapFiles:
    """A heatmap's map (its ``grid``, or an older row's ``.npy`` at ``array_path``) and overlay."""

    scan_id: int
    grid: bytes | None
    array_path: str | None
    overlay_path: str
    model_version_id: int
    #: the scan's hash and stored file, and the model's input contract: what its overlay is drawn from
    sha256: str | None = None
    stored_path: str | None = None
    contract: dict[str, Any] | None = None
    #: (height, width) the map is read at: the model input's
    map_size: tuple[int, int] | None = None


def heatmap_files(session: Session, heatmap_id: int) -> HeatmapFiles | None:
    row = session.execute(
        select(
            Result.scan_id,
            Heatmap.grid,
            Heatmap.array_path,
            Heatmap.overlay_path,
            Heatmap.height,
            Heatmap.width,
            Result.model_version_id,
            Scan.sha256,
            Scan.stored_path,
            Scan.source_path,
            Scan.state,
            ModelVersion.manifest,
        )
        .join(Result, Result.id == Heatmap.result_id)
        .join(Scan, Scan.id == Result.scan_id)
        .join(ModelVersion, ModelVersion.id == Result.model_version_id)
        .where(Heatmap.id == heatmap_id)
    ).first()
    if row is None:
        return None
    contract = (row.manifest or {}).get("input_contract")
    return HeatmapFiles(
        row.scan_id,
        row.grid,
        row.array_path,
        row.overlay_path,
        row.model_version_id,
        row.sha256,
        picture_file(row.stored_path, row.source_path, row.state),
        contract,
        (row.height, row.width),
    )


def model_contract(session: Session, model_version_id: int) -> dict[str, Any] | None:
    manifest = session.scalar(select(ModelVersion.manifest).where(ModelVersion.id == model_version_id))
    return (manifest or {}).get("input_contract")


def report_file(session: Session, report_id: int) -> tuple[int | None, str, bool] | None:
    row = session.execute(select(Report.scan_id, Report.path, Report.with_phi).where(Report.id == report_id)).first()
    return None if row is None else (row.scan_id, row.path, bool(row.with_phi))


# -- failures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailedScan:
    id: int
    source_name: str
    updated_at: datetime | None
    message: str
    retryable: bool


@dataclass
class FailureGroup:
    reason: str
    count: int
    #: failed scans not yet retried whose file was kept
    retryable: int
    #: the sentence of the latest failure with this reason
    sentence: str
    latest: list[FailedScan]


def failures(session: Session, per_reason: int = 20) -> list[FailureGroup]:
    """Failed scans not yet sent for retry, by reason, the most frequent first."""
    # failure_reason IS NOT NULL lets SQLite range-scan its index instead of walking every scan's entry
    not_retried = and_(
        Scan.state == ScanState.FAILED.value, Scan.retried_at.is_(None), Scan.failure_reason.is_not(None)
    )
    counts = session.execute(
        select(
            Scan.failure_reason,
            func.count(),
            func.count(Scan.stored_path),
        )
        .where(not_retried)
        .group_by(Scan.failure_reason)
        .order_by(func.count().desc())
    ).all()
    groups = []
    for reason, count, kept in counts:
        scans = session.execute(
            select(Scan.id, Scan.source_name, Scan.updated_at, Scan.failure_message, Scan.stored_path)
            .where(not_retried, Scan.failure_reason == reason)
            .order_by(Scan.id.desc())
            .limit(per_reason)
        ).all()
        latest = [
            FailedScan(s.id, s.source_name, aware(s.updated_at), s.failure_message or "", s.stored_path is not None)
            for s in scans
        ]
        groups.append(
            FailureGroup(str(reason or "unknown"), int(count), int(kept), latest[0].message if latest else "", latest)
        )
    return groups


# -- models ---------------------------------------------------------------------------------------


@dataclass
class ModelRow:
    id: int
    task: str
    version: str
    status: str
    architecture: str
    sha256: str
    created_at: datetime | None
    promoted_at: datetime | None
    retired_at: datetime | None
    manifest: dict[str, Any]
    results: int
    #: the version's folder in the registry, as stored (its card and figures are there)
    path: str = ""
    #: a daemon's refusal of it, and when (``registry.record_refusal``)
    refusal: str | None = None
    refused_at: datetime | None = None

    @property
    def metrics(self) -> list[tuple[str, str]]:
        """The manifest's figures, flattened one level for a table."""
        out: list[tuple[str, str]] = []
        for key, value in sorted((self.manifest.get("metrics") or {}).items()):
            if isinstance(value, dict):
                out += [(f"{key} {k}", _figure(v)) for k, v in sorted(value.items())]
            else:
                out.append((key, _figure(value)))
        return out


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(str(value)) > 120:
        return str(value)[:117] + "..."
    return str(value)


def model_versions(session: Session) -> dict[str, list[ModelRow]]:
    counts = dict(
        session.execute(
            select(Result.model_version_id, func.count(func.distinct(Result.scan_id))).group_by(Result.model_version_id)
        ).all()
    )
    out: dict[str, list[ModelRow]] = {}
    for row in session.scalars(select(ModelVersion).order_by(ModelVersion.task_name, ModelVersion.id.desc())):
        out.setdefault(row.task_name, []).append(
            ModelRow(
                row.id,
                row.task_name,
                row.version,
                row.status,
                row.architecture,
                row.sha256,
                aware(row.created_at),
                aware(row.promoted_at),
                aware(row.retired_at),
                dict(row.manifest or {}),
                int(counts.get(row.id, 0)),
                row.path,
                row.refusal,
                aware(row.refused_at),
            )
        )
    return out


def model_version(session: Session, task: str, version: str) -> ModelRow | None:
    return next((r for r in model_versions(session).get(task, []) if r.version == version), None)


# -- audits ---------------------------------------------------------------------------------------


@dataclass
class AuditRow:
    id: int
    task: str
    model_version: str
    compare_version: str | None
    labels_path: str
    labels_format: str
    matched: int
    passed: bool | None
    created_at: datetime | None
    parameters: dict[str, Any]
    results: dict[str, Any]
    #: pages of the PDF kept with the audit (``medcli audit --pdf``); None: none was written
    pdf_pages: int | None = None


def audits(session: Session, limit: int = 200) -> list[AuditRow]:
    return [_audit_row(session, a) for a in session.scalars(select(Audit).order_by(Audit.id.desc()).limit(limit))]


def audit(session: Session, audit_id: int) -> AuditRow | None:
    row = session.get(Audit, audit_id)
    return None if row is None else _audit_row(session, row)


def audit_pdf(session: Session, audit_id: int) -> bytes | None:
    return session.scalar(select(AuditPdf.data).where(AuditPdf.audit_id == audit_id))


def _audit_row(session: Session, a: Audit) -> AuditRow:
    def version(vid: int | None) -> str | None:
        return None if vid is None else session.scalar(select(ModelVersion.version).where(ModelVersion.id == vid))

    pages = session.scalar(select(AuditPdf.pages).where(AuditPdf.audit_id == a.id))
    return AuditRow(
        a.id,
        a.task_name,
        version(a.model_version_id) or "?",
        version(a.compare_model_version_id),
        a.labels_path,
        a.labels_format,
        a.matched,
        a.passed,
        aware(a.created_at),
        dict(a.parameters or {}),
        dict(a.results or {}),
        pages,
    )


#: the scalar metrics of a stored audit's per-label tables, in the order the CLI prints them
# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionRecord:
    id: int
    at: datetime | None
    user: str
    role: str
    action: str
    target: str
    outcome: str
    detail: str


def _action_record(a: WebAction) -> ActionRecord:
    return ActionRecord(a.id, aware(a.at), a.user, a.role, a.action, a.target, a.outcome, a.detail)


def action(session: Session, action_id: int) -> ActionRecord | None:
    row = session.get(WebAction, action_id)
    return None if row is None else _action_record(row)


def recent_actions(session: Session, limit: int = 20) -> list[ActionRecord]:
    return [_action_record(a) for a in session.scalars(select(WebAction).order_by(WebAction.id.desc()).limit(limit))]


@dataclass(frozen=True)
class Choices:
    """What the worklist's filter menus offer: the tasks and labels the database knows."""

    tasks: list[str]
    labels: list[str]


def overview_choices(session: Session) -> Choices:
    tasks = sorted(str(t) for t in session.scalars(select(Task.name)))
    labels: set[str] = set()
    for manifest in session.scalars(select(ModelVersion.manifest)):
        labels.update(str(x) for x in (manifest or {}).get("labels", []))
    return Choices(tasks, sorted(labels))
