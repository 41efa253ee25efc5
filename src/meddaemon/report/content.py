"""What a report says, gathered from the database into plain dataclasses (no reportlab here).

Patient fields are read only when a report with PHI is asked for: a de-identified report's data
never holds them, so no layout mistake can print them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.db.models import Heatmap, ModelVersion, Result, Scan, row_id
from meddaemon.engine.tasks import InputContract, TaskSpec
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

    @property
    def study_key(self) -> str:
        return study_key(self.study_instance_uid)

    @property
    def with_phi(self) -> bool:
        return self.patient is not None


def study_key(study_instance_uid: str) -> str:
    """A stable name for a study that is not its UID: for file names and de-identified reports."""
    return hashlib.sha256(study_instance_uid.encode()).hexdigest()[:16]


def transfer_syntax_name(uid: str | None) -> str:
    if not uid:
        return ""
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def find_scan(session: Session, key: str) -> Scan | None:
    """A scan by its id, its full SHA-256, or a unique SHA-256 prefix of at least 8 characters; by
    hash, the latest attempt (failed attempts of the same bytes come before it). Digits are an id
    first: a prefix that happens to be all digits (one in 43 of 8 characters) is a prefix when no
    scan has that id."""
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
        return found[0] if len({s.sha256 for s in found}) == 1 else None
    return None


def scan_report_data(
    session: Session, scan: Scan, specs: Mapping[str, TaskSpec], with_phi: bool = False, *, state_dir: Path
) -> ScanReportData:
    """Everything a scan report shows, from the results of the latest model version that ran on it;
    the stored files (scan, overlays) found under ``state_dir`` wherever this process runs."""
    model_row = session.scalar(  # the version of the latest result, in one query
        select(ModelVersion)
        .join(Result, Result.model_version_id == ModelVersion.id)
        .where(Result.scan_id == scan.id)
        .order_by(Result.id.desc())
        .limit(1)
    )
    if model_row is None or scan.sha256 is None:
        raise NoResult(f"scan {scan.id} has no result to report (state {scan.state})")
    rows = session.execute(  # every label with its heatmap's files, in one query: plain rows, no ORM objects
        select(
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
        .where(Result.scan_id == scan.id, Result.model_version_id == model_row.id)
        .order_by(Result.id)
    ).all()
    manifest = model_row.manifest or {}
    spec = specs.get(model_row.task_name)
    contract_data = manifest.get("input_contract")
    contract = InputContract.from_dict(contract_data) if contract_data else (spec.contract if spec else None)
    model = ModelInfo(
        task=model_row.task_name,
        version=model_row.version,
        architecture=model_row.architecture,
        sha256=model_row.sha256,
        kind=str(manifest.get("kind") or (spec.kind if spec else "multiclass")),
        contract=contract,
        heatmaps=bool(manifest.get("heatmaps", True)),
        version_id=model_row.id,
    )
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
        sha256=scan.sha256,
        task=model_row.task_name,
        description=spec.description if spec else "",
        source_name=scan.source_name,
        model=model,
        results=results,
        metadata=_metadata(scan),
        discovered_at=scan.discovered_at,
        registered_at=scan.registered_at,
        result_at=max((r.created_at for r in rows), default=None),
        latency_ms=next((r.latency_ms for r in rows if r.latency_ms is not None), None),
        study_instance_uid=scan.study_instance_uid,
        stored_path=stored_file(scan.stored_path, state_dir) if scan.stored_path else None,
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


def _metadata(scan: Scan) -> list[tuple[str, str]]:
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
        ("Format", (scan.format or "").upper()),
        ("Transfer syntax", transfer_syntax_name(scan.transfer_syntax_uid)),
        ("Photometric", scan.photometric_interpretation or ""),
    ]
    return [(name, value or "-") for name, value in pairs]


def reportable_study_scans(session: Session, study_instance_uid: str) -> list[Scan]:
    """The scans of a study that have a result, oldest first."""
    has_result = select(Result.id).where(Result.scan_id == Scan.id).exists()
    return list(
        session.scalars(select(Scan).where(Scan.study_instance_uid == study_instance_uid, has_result).order_by(Scan.id))
    )


def study_report_data(
    session: Session,
    study_instance_uid: str,
    specs: Mapping[str, TaskSpec],
    with_phi: bool = False,
    *,
    state_dir: Path,
) -> StudyReportData:
    scans = reportable_study_scans(session, study_instance_uid)
    if not scans:
        raise NoResult("no scan of this study has a result")
    data = [scan_report_data(session, s, specs, with_phi, state_dir=state_dir) for s in scans]
    return StudyReportData(study_instance_uid, data, patient_info(scans[0]) if with_phi else None)
