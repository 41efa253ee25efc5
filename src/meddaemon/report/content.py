"""What a report says, gathered from the database into plain dataclasses (no reportlab here).

Patient fields are read only when a report with PHI is asked for: a de-identified report's data
never holds them, so no layout mistake can print them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from meddaemon.db.models import Heatmap, ModelVersion, Result, Scan, row_id
from meddaemon.engine.tasks import InputContract, TaskSpec
from meddaemon.failures import NOT_AN_IMAGE
from meddaemon.label_results import LabelResult
from meddaemon.stored_paths import stored_file


class NoResult(LookupError):
    """The scan has no stored result to report (not inferred yet, or failed)."""


@dataclass(frozen=True)
class ModelInfo:
    task: str
    version: str
    architecture: str
    sha256: str
    kind: str
    contract: InputContract | None
    #: whether the version makes heatmaps at all (an imported ONNX graph without a CAM feature map does not)
    heatmaps: bool = True
    #: the version's row id (names the files the inference stage wrote for it)
    version_id: int | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.version}"


@dataclass(frozen=True)
class PatientInfo:
    """PHI: present only in reports written with ``--with-phi`` (or ``reports_with_phi``)."""

    name: str | None
    patient_id: str | None
    birth_date: str | None
    sex: str | None
    age: str | None
    accession_number: str | None


@dataclass(frozen=True)
class ScanReportData:
    scan_id: int
    sha256: str
    task: str
    description: str
    source_name: str
    model: ModelInfo
    results: list[LabelResult]
    #: (name, value) pairs shown in the "Scan" section, in order, values already strings
    metadata: list[tuple[str, str]]
    discovered_at: datetime | None
    registered_at: datetime | None
    result_at: datetime | None
    latency_ms: float | None
    study_instance_uid: str | None
    stored_path: Path | None
    patient: PatientInfo | None = None

    @property
    def with_phi(self) -> bool:
        return self.patient is not None

    @property
    def heatmaps(self) -> list[LabelResult]:
        return [r for r in self.results if r.overlay_path is not None]


@dataclass(frozen=True)
class StudyReportData:
    study_instance_uid: str
    scans: list[ScanReportData]
    patient: PatientInfo | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    #: the study's scans without a result, as (scan id, why: the failure reason or the state)
    without_result: tuple[tuple[int, str], ...] = ()
    #: earlier versions of the study's instances, left out, as (scan id, the scan that replaced it)
    replaced: tuple[tuple[int, int], ...] = ()
    #: how many patients its scans name (name, ID and birth date), counted with PHI or without: a
    #: de-identified report says nothing of who they are, but must still say they are not one
    patients_named: int = 1

    @property
    def study_key(self) -> str:
        return study_key(self.study_instance_uid)

    @property
    def with_phi(self) -> bool:
        return self.patient is not None

    @property
    def patients(self) -> list[PatientInfo]:
        """The distinct patients its scans name (with PHI; a study is one patient's, but merged or
        mislabelled studies are not: the first scan's patient stood for all of them). A patient is
        told by name, ID and birth date: a derived image without the age, or a second accession
        number, is the same patient."""
        by_person = {(p.name, p.patient_id, p.birth_date): p for p in self.patient_details}
        return list(by_person.values())

    @property
    def patient_details(self) -> list[PatientInfo]:
        """The distinct patient sections of its scans, every field compared: where there are several,
        each scan shows its own (a second order's accession number was printed nowhere)."""
        return list(dict.fromkeys(s.patient for s in self.scans if s.patient is not None))


def study_key(study_instance_uid: str) -> str:
    """A stable name for a study that is not its UID: for file names and de-identified reports."""
    return hashlib.sha256(study_instance_uid.encode()).hexdigest()[:16]


def transfer_syntax_name(uid: str | None) -> str:
    if not uid:
        return ""
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


class AmbiguousScan(LookupError):
    """A SHA-256 prefix that starts the hashes of several scans."""


def find_scan(session: Session, key: str) -> Scan | None:
    """A scan by its id, its full SHA-256, or a unique SHA-256 prefix of at least 8 characters; by
    hash, the latest attempt (failed attempts of the same bytes come before it). Digits are an id
    first: a prefix that happens to be all digits (one in 43 of 8 characters) is a prefix when no
    scan has that id. ``AmbiguousScan`` for a prefix of several hashes (it was "no scan")."""
    key = key.strip().lower()
    scan_id = row_id(key)
    if scan_id is not None:
        by_id = session.get(Scan, scan_id)
        if by_id is not None or len(key) < 8:
            return by_id
    if len(key) == 64:
        return session.scalar(select(Scan).where(Scan.sha256 == key).order_by(Scan.id.desc()).limit(1))
    if len(key) >= 8 and all(c in "0123456789abcdef" for c in key):
        found = session.scalars(select(Scan).where(Scan.sha256.like(f"{key}%")).order_by(Scan.id.desc())).all()
        hashes = {s.sha256 for s in found}
        if len(hashes) > 1:
            ids = ", ".join(str(s.id) for s in sorted(found, key=lambda s: s.id))
            raise AmbiguousScan(f"{key!r} starts the SHA-256 of {len(hashes)} scans (ids {ids}): give more characters")
        return found[0] if found else None
    return None


def scan_report_data(
    session: Session,
    scan: Scan,
    specs: Mapping[str, TaskSpec],
    with_phi: bool = False,
    *,
    state_dir: Path,
    frame_policy: str = "key",
) -> ScanReportData:
    """Everything a scan report shows, from the results of the latest model version that ran on it;
    the stored files (scan, overlays) found under ``state_dir`` wherever this process runs, its
    frames read under ``frame_policy``."""
    data = scans_report_data(session, [scan], specs, with_phi, state_dir=state_dir, frame_policy=frame_policy)[scan.id]
    if isinstance(data, NoResult):
        raise data
    return data


def scans_report_data(
    session: Session,
    scans: Sequence[Scan],
    specs: Mapping[str, TaskSpec],
    with_phi: bool = False,
    *,
    state_dir: Path,
    frame_policy: str = "key",
) -> dict[int, ScanReportData | NoResult]:
    """``scan_report_data`` of several scans (a report round's, a study's) in two queries whatever
    their number: every result of the scans with its heatmap's files, in plain rows, then the model
    versions of each scan's latest result (read one scan at a time, a report's rows cost 2.5 ms of
    CPU, as much as a quarter of its rendering). A scan without a result to report maps to its
    ``NoResult``."""
    rows = (
        session.execute(
            select(
                Result.scan_id,
                Result.model_version_id,
                Result.label,
                Result.probability,
                Result.threshold,
                Result.positive,
                Result.created_at,
                Result.latency_ms,
                Heatmap.overlay_path,
                Heatmap.array_path,
                Heatmap.grid,
                Heatmap.height,
                Heatmap.width,
            )
            .outerjoin(Heatmap, Heatmap.result_id == Result.id)
            .where(Result.scan_id.in_([scan.id for scan in scans]))
            .order_by(Result.id)
        ).all()
        if scans
        else []
    )
    latest: dict[int, int] = {}  # the newest version of each scan (``db.queries.newest_version_of``)
    for row in rows:
        latest[row.scan_id] = max(latest.get(row.scan_id, row.model_version_id), row.model_version_id)
    versions = session.scalars(select(ModelVersion).where(ModelVersion.id.in_(set(latest.values())))) if latest else []
    models = {version.id: _model_info(version, specs) for version in versions}
    scan_rows: dict[int, list[Row[Any]]] = {}
    for row in rows:
        if row.model_version_id == latest[row.scan_id]:
            scan_rows.setdefault(row.scan_id, []).append(row)
    found: dict[int, ScanReportData | NoResult] = {}
    for scan in scans:
        model = models.get(latest.get(scan.id, -1))
        if model is None or scan.sha256 is None:
            found[scan.id] = NoResult(f"scan {scan.id} has no result to report (state {scan.state})")
        else:
            shown = _scan_report_data(scan, model, scan_rows[scan.id], specs, with_phi, state_dir, frame_policy)
            found[scan.id] = shown
    return found


def _model_info(version: ModelVersion, specs: Mapping[str, TaskSpec]) -> ModelInfo:
    manifest = version.manifest or {}
    spec = specs.get(version.task_name)
    contract_data = manifest.get("input_contract")
    return ModelInfo(
        task=version.task_name,
        version=version.version,
        architecture=version.architecture,
        sha256=version.sha256,
        kind=str(manifest.get("kind") or (spec.kind if spec else "multiclass")),
        contract=InputContract.from_dict(contract_data) if contract_data else (spec.contract if spec else None),
        heatmaps=bool(manifest.get("heatmaps", True)),
        version_id=version.id,
    )


def _scan_report_data(
    scan: Scan,
    model: ModelInfo,
    rows: Sequence[Row[Any]],
    specs: Mapping[str, TaskSpec],
    with_phi: bool,
    state_dir: Path,
    frame_policy: str,
) -> ScanReportData:
    spec = specs.get(model.task)
    stored = stored_file(scan.stored_path, state_dir) if scan.stored_path else None
    results = [
        LabelResult(
            r.label,
            r.probability,
            r.threshold,
            r.positive,
            array_path=stored_file(r.array_path, state_dir) if r.array_path is not None else None,
            overlay_path=stored_file(r.overlay_path, state_dir) if r.overlay_path is not None else None,
            map_size=(r.height, r.width) if r.overlay_path is not None else None,
            grid=r.grid,
        )
        for r in rows
    ]
    return ScanReportData(
        scan_id=scan.id,
        sha256=scan.sha256 or "",
        task=model.task,
        description=spec.description if spec else "",
        source_name=scan.source_name,
        model=model,
        results=results,
        metadata=_metadata(scan, stored, frame_policy),
        discovered_at=scan.discovered_at,
        registered_at=scan.registered_at,
        result_at=max((r.created_at for r in rows), default=None),
        latency_ms=next((r.latency_ms for r in rows if r.latency_ms is not None), None),
        study_instance_uid=scan.study_instance_uid,
        stored_path=stored,
        patient=patient_info(scan) if with_phi else None,
    )


def patient_info(scan: Scan) -> PatientInfo:
    return PatientInfo(
        scan.patient_name,
        scan.patient_id,
        scan.patient_birth_date,
        scan.patient_sex,
        scan.patient_age,
        scan.accession_number,
    )


def _metadata(scan: Scan, stored: Path | None, frame_policy: str) -> list[tuple[str, str]]:
    size = ""
    if scan.columns and scan.rows:
        size = f"{scan.columns} x {scan.rows} px"
        if scan.frames and scan.frames > 1:
            size += f", {scan.frames} frames"
    pairs = [
        ("Modality", scan.modality or ""),
        ("Body part", scan.body_part or ""),
        ("View", scan.view_position or ""),
        ("Manufacturer", scan.manufacturer or ""),
        ("Size", size),
        *([("Frames", frames_read)] if (frames_read := _frames_read(scan.frames or 1, stored, frame_policy)) else []),
        ("Format", (scan.format or "").upper()),
        ("Transfer syntax", transfer_syntax_name(scan.transfer_syntax_uid)),
        ("Photometric", scan.photometric_interpretation or ""),
    ]
    return [(name, value or "-") for name, value in pairs]


def _frames_read(frames: int, stored: Path | None, frame_policy: str) -> str:
    """Which frames of a multi-frame scan the model classified and which one the report pictures (the
    engine maps the key frame, or the middle one where every frame ran); "" for a single frame. A
    reader must not take a call that averages frames for the picture's alone."""
    if frames <= 1:
        return ""
    if frame_policy == "all":
        return f"all {frames} classified, the probabilities their mean; frame {frames // 2 + 1} shown"
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from meddaemon.engine.decode.dicom import key_frame_index

    try:
        header = dcmread(stored, stop_before_pixels=True, specific_tags=["RepresentativeFrameNumber"], force=True)
    except (OSError, InvalidDicomError, TypeError, ValueError):  # no stored file (purged), or not DICOM
        return f"one of {frames} classified and shown"
    index, why = key_frame_index(header, frames)
    named = "the frame the scan names representative" if why == "RepresentativeFrameNumber" else "the middle one"
    return f"frame {index + 1} of {frames} classified and shown ({named})"


def reportable_study_scans(session: Session, study_instance_uid: str) -> tuple[list[Scan], tuple[tuple[int, int], ...]]:
    """The scans of a study that have a result, oldest first, one per instance, and the scans left
    out as (scan id, the scan that replaced it). Of the versions of one instance (a correction a PACS
    sent again under its SOP Instance UID, with other bytes) the latest is the study's image, as the
    PACS shows it; listing each would count the image twice and take a corrected name for a second
    patient."""
    has_result = select(Result.id).where(Result.scan_id == Scan.id).exists()
    scans = session.scalars(
        select(Scan).where(Scan.study_instance_uid == study_instance_uid, has_result).order_by(Scan.id)
    ).all()
    latest = {scan.sop_instance_uid or scan.sha256: scan for scan in scans}  # a later version replaces one
    replaced = tuple(
        (scan.id, later.id) for scan in scans if (later := latest[scan.sop_instance_uid or scan.sha256]) is not scan
    )
    left_out = {scan_id for scan_id, _ in replaced}
    return [scan for scan in scans if scan.id not in left_out], replaced


def study_report_data(
    session: Session,
    study_instance_uid: str,
    specs: Mapping[str, TaskSpec],
    with_phi: bool = False,
    *,
    state_dir: Path,
    frame_policy: str = "key",
) -> StudyReportData:
    scans, replaced = reportable_study_scans(session, study_instance_uid)
    if not scans:
        raise NoResult("no scan of this study has a result")
    found = scans_report_data(session, scans, specs, with_phi, state_dir=state_dir, frame_policy=frame_policy)
    data: list[ScanReportData] = []
    for scan in scans:
        each = found[scan.id]
        if isinstance(each, NoResult):
            raise each
        data.append(each)
    no_image = sorted(reason.value for reason in NOT_AN_IMAGE)  # an SR, a DICOMDIR, meddaemon's own objects
    others = session.execute(
        select(Scan.id, Scan.sha256, Scan.sop_instance_uid, Scan.failure_reason, Scan.state, Scan.registered_at)
        .where(Scan.study_instance_uid == study_instance_uid)
        .where(Scan.id.not_in([scan.id for scan in scans] + [scan_id for scan_id, _ in replaced]))
        .where(Scan.failure_reason.is_(None) | Scan.failure_reason.not_in(no_image))
        .order_by(Scan.id)
    ).all()
    # an image is its instance (its SOP Instance UID, else its bytes): an attempt that failed before the
    # one reported (a truncated copy, then the whole one) is not another image, one that came after it
    # (a correction that failed) must be named, and of several failed attempts the latest says why
    reported_bytes = {scan.sha256 for scan in scans}
    shown = {scan.sop_instance_uid: scan for scan in scans if scan.sop_instance_uid}

    def before_the_one_shown(uid: str | None, scan_id: int, registered_at: datetime | None) -> bool:
        """Registered before it (by the ids of one batch, which share its time)."""
        one = shown.get(uid) if uid else None
        if one is None:
            return False
        if registered_at is None or one.registered_at is None or registered_at == one.registered_at:
            return scan_id < one.id
        return registered_at < one.registered_at

    latest = {
        uid or sha: (scan_id, reason or state)
        for scan_id, sha, uid, reason, state, registered_at in others
        if sha not in reported_bytes and not before_the_one_shown(uid, scan_id, registered_at)
    }
    return StudyReportData(
        study_instance_uid,
        data,
        patient_info(scans[0]) if with_phi else None,
        without_result=tuple(sorted(latest.values())),
        replaced=replaced,
        patients_named=len({(s.patient_name, s.patient_id, s.patient_birth_date) for s in scans}),
    )
