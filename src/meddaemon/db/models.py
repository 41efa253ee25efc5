"""The schema: scans and their history, duplicate arrivals, tasks, model versions and results.

Alembic migrations in ``db/migrations`` create and upgrade it; ``tests/db`` checks that the
migrations and these classes agree on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}  # noqa: RUF012


class Task(Base):
    __tablename__ = "tasks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("task_name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_name: Mapped[str] = mapped_column(ForeignKey("tasks.name"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="registered")
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]


class Scan(Base):
    """One row per distinct file content (SHA-256), from registration to its terminal state.

    ``stored_path`` is where the file is (work/, archive/ or failed/); while ``pending_move_from``
    is set the move there has been committed but may not have happened yet, and recovery finishes it.
    """

    __tablename__ = "scans"
    __table_args__ = (Index("ix_scans_state_task", "state", "task_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(32))
    task_name: Mapped[str | None] = mapped_column(ForeignKey("tasks.name"))
    source_name: Mapped[str] = mapped_column(Text)
    stored_path: Mapped[str | None] = mapped_column(Text, unique=True, index=True)
    pending_move_from: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    failure_reason: Mapped[str | None] = mapped_column(String(64), index=True)
    failure_message: Mapped[str | None] = mapped_column(Text)
    discovered_at: Mapped[datetime | None]
    stable_at: Mapped[datetime | None]
    registered_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    routed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # metadata (DESIGN.md section 4); patient_* and accession_number are PHI: never logged
    format: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    frames: Mapped[int | None]
    samples_per_pixel: Mapped[int | None]
    photometric_interpretation: Mapped[str | None] = mapped_column(String(32))
    bits_stored: Mapped[int | None]
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_age: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(Text)
    view_position: Mapped[str | None] = mapped_column(String(16))

    #: the daemon working on the scan's next stage (inference, report); None: free for any daemon
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("daemons.id", ondelete="SET NULL"), index=True)

    events: Mapped[list[ScanEvent]] = relationship(back_populates="scan", order_by="ScanEvent.id")
    duplicates: Mapped[list[DuplicateArrival]] = relationship(back_populates="scan")


#: Scan columns filled from ``ScanMetadata`` of the same names.
METADATA_COLUMNS = (
    "format",
    "rows",
    "columns",
    "frames",
    "samples_per_pixel",
    "photometric_interpretation",
    "bits_stored",
    "transfer_syntax_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "accession_number",
    "patient_sex",
    "patient_age",
    "modality",
    "body_part",
    "manufacturer",
    "view_position",
)


class DaemonInstance(Base):
    """One run of a daemon process, on one node, sharing the database with the others.

    Times are seconds since the epoch *by the database's clock* (``db.clock.db_clock``): a node whose
    own clock is wrong can neither keep a dead daemon alive nor declare a live one lost. A daemon is
    ``running`` while ``heartbeat_at + lease_seconds`` lies ahead of the database's clock; past it any
    other daemon marks it ``lost`` and releases its claims (``daemon/lease.py``).
    """

    __tablename__ = "daemons"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    #: the process-ID namespace the pid belongs to (Linux: ``/proc/self/ns/pid``); containers
    #: sharing a host name have their own
    pid_namespace: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    lease_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float)


class InboxClaim(Base):
    """An inbox file one daemon is reading and recording; no other daemon reads it meanwhile.

    The claim lasts until the file has left the inbox (its move is carried out); then ``done_at`` is
    set and the row stays a while as a tombstone: a daemon that looked at the file just before it
    left (same size, mtime and inode) cannot claim it again. ``daemon_id`` is None when its daemon
    was lost after committing the move: the claim then waits for recovery to finish that move.
    Times are by the database's clock.
    """

    __tablename__ = "inbox_claims"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    daemon_id: Mapped[int | None] = mapped_column(ForeignKey("daemons.id", ondelete="SET NULL"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int] = mapped_column(BigInteger)
    claimed_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float | None] = mapped_column(Float)


class ScanEvent(Base):
    """Every state a scan passed through, with when and why: the history ``status`` reads."""

    __tablename__ = "scan_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)

    scan: Mapped[Scan] = relationship(back_populates="events")


class DuplicateArrival(Base):
    """A file whose bytes were already registered: recorded, archived, never processed again."""

    __tablename__ = "duplicate_arrivals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    source_name: Mapped[str] = mapped_column(Text)
    stored_path: Mapped[str] = mapped_column(Text)
    pending_move_from: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    arrived_at: Mapped[datetime] = mapped_column(default=utcnow)

    scan: Mapped[Scan] = relationship(back_populates="duplicates")


class Result(Base):
    """One label's output for one scan under one model version: tidy rows a query can aggregate."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("scan_id", "model_version_id", "label"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    heatmap: Mapped[Heatmap | None] = relationship(back_populates="result")


class Heatmap(Base):
    """Where the model looked for one result: the map as an array (.npy) and an overlay image."""

    __tablename__ = "heatmaps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), unique=True)
    method: Mapped[str] = mapped_column(String(16))
    array_path: Mapped[str] = mapped_column(Text)
    overlay_path: Mapped[str] = mapped_column(Text)
    height: Mapped[int]
    width: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    result: Mapped[Result] = relationship(back_populates="heatmap")


class Report(Base):
    """A PDF written for a scan, a study or a period (``kind``): where it is and the SHA-256 of its bytes.

    ``path`` is unique: rebuilding a report overwrites its file and updates its row, so a replay
    after a crash never adds a second row for the same document.
    """

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    scan_id: Mapped[int | None] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    pages: Mapped[int]
    with_phi: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Audit(Base):
    """One ``medcli audit`` run: what went in (hashes of the labels and of the predictions joined),
    how it was asked (``parameters``), and what came out (``results``, the JSON it printed).

    ``passed`` is the verdict of ``--require``; None when no criterion was given.
    """

    __tablename__ = "audits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_name: Mapped[str] = mapped_column(ForeignKey("tasks.name"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    compare_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    labels_path: Mapped[str] = mapped_column(Text)
    labels_sha256: Mapped[str] = mapped_column(String(64))
    labels_format: Mapped[str] = mapped_column(String(16))
    predictions_sha256: Mapped[str] = mapped_column(String(64))
    matched: Mapped[int]
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    results: Mapped[dict[str, Any]] = mapped_column(default=dict)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
