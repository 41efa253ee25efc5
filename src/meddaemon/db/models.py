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
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
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
    #: why a daemon refused to serve this version (its reason code and message), and when; cleared
    #: by a promotion, after which daemons that refused it try it again
    refusal: Mapped[str | None] = mapped_column(Text)
    refused_at: Mapped[datetime | None]


class ModelGraph(Base):
    """The SHA-256 of an ONNX graph exported from a version and kept in its folder (``onnx/``), as
    it was when exported: a kept graph is served only when its bytes still have it. The ``.json``
    beside the graph cannot vouch for it: whoever could change the graph could change that too."""

    __tablename__ = "model_graphs"

    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    #: the graph's file name without ``.onnx`` (``GraphKey.name``: weights, outputs, opset, exporter)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


#: Scans that still count for de-duplication: a failed scan steps aside, so the same bytes arriving
#: again (``medcli retry``, or moved back by hand) are a new attempt, not a duplicate.
NOT_FAILED = text("state != 'failed'")
#: the largest id an INTEGER key holds (PostgreSQL refuses a larger value in a comparison with one)
MAX_ROW_ID = 2**31 - 1


def row_id(key: str) -> int | None:
    """``key`` as a row id, if it is one: ASCII digits (``str.isdigit`` takes ``²`` too, which
    ``int`` refuses), within an INTEGER key's range (its length checked first: ``int`` refuses over
    4,300 digits)."""
    if not (key.isascii() and key.isdigit()):
        return None
    significant = key.lstrip("0") or "0"  # leading zeros count towards int's limit too
    return int(significant) if len(significant) <= len(str(MAX_ROW_ID)) and int(significant) <= MAX_ROW_ID else None


class Scan(Base):
    """One attempt at one file content (SHA-256), from registration to its terminal state.

    At most one scan per content is not failed (the partial unique index ``uq_scans_sha256_live``);
    failed attempts of the same bytes stay beside it with their history.

    ``stored_path`` is where the file is (work/, archive/ or failed/); while ``pending_move_from``
    is set the move there has been committed but may not have happened yet, and recovery finishes it.
    ``retried_at``: when the kept original of a failed scan was sent back to the inbox (``daemon/retry.py``).
    """

    __tablename__ = "scans"
    __table_args__ = (
        Index("ix_scans_state_task", "state", "task_name"),
        # the web console's worklist: newest first within a state or a task (keyset pagination by id)
        Index("ix_scans_state_id", "state", "id"),
        Index("ix_scans_task_id", "task_name", "id"),
        Index("uq_scans_sha256_live", "sha256", unique=True, sqlite_where=NOT_FAILED, postgresql_where=NOT_FAILED),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
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
    retried_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # metadata (docs/design.md section 4); patient_* and accession_number are PHI: never logged.
    # Text, not the standard's maximum lengths: headers break them, and a scan is kept as it came
    format: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    frames: Mapped[int | None]
    samples_per_pixel: Mapped[int | None]
    photometric_interpretation: Mapped[str | None] = mapped_column(Text)
    bits_stored: Mapped[int | None]
    transfer_syntax_uid: Mapped[str | None] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(Text)
    study_instance_uid: Mapped[str | None] = mapped_column(Text, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str | None] = mapped_column(Text, index=True)
    patient_id: Mapped[str | None] = mapped_column(Text)
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_birth_date: Mapped[str | None] = mapped_column(Text)
    accession_number: Mapped[str | None] = mapped_column(Text)
    patient_sex: Mapped[str | None] = mapped_column(Text)
    patient_age: Mapped[str | None] = mapped_column(Text)
    modality: Mapped[str | None] = mapped_column(Text)
    body_part: Mapped[str | None] = mapped_column(Text)
    manufacturer: Mapped[str | None] = mapped_column(Text)
    view_position: Mapped[str | None] = mapped_column(Text)

    #: the daemon working on the scan's next stage (inference, report); None: free for any daemon
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("daemons.id", ondelete="SET NULL"), index=True)

    #: a scan read in place by ``medcli evaluate`` (state ``evaluated``): the file's absolute path
    #: when it was read, and the evaluation that first read it
    source_path: Mapped[str | None] = mapped_column(Text)
    evaluation_id: Mapped[int | None] = mapped_column(ForeignKey("evaluations.id", ondelete="SET NULL"), index=True)

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
    left (same size, mtime, inode and change time) cannot claim it again. ``daemon_id`` is None when its daemon
    was lost after committing the move: the claim then waits for recovery to finish that move.
    Times are by the database's clock.
    """

    __tablename__ = "inbox_claims"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    daemon_id: Mapped[int | None] = mapped_column(ForeignKey("daemons.id", ondelete="SET NULL"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int] = mapped_column(BigInteger)
    #: None in the rows of a version before 0015 (and of its daemons still running): unknown
    ctime_ns: Mapped[int | None] = mapped_column(BigInteger)
    claimed_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float | None] = mapped_column(Float)


class ScanEvent(Base):
    """Every state a scan passed through, with when and why: the history ``status`` reads.

    ``(state, at)`` is indexed for the console's throughput: scans inferred per hour.
    """

    __tablename__ = "scan_events"
    __table_args__ = (Index("ix_scan_events_state_at", "state", "at"),)

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
    """Where the model looked for one result: the map's grid (``.npy`` bytes, read at ``height`` x
    ``width``, the model input's size, with ``engine.heatmap_grid.read_map``) and where its overlay
    image is kept. Rows written before the grid was kept here have ``array_path`` (the map's
    ``.npy`` file) instead."""

    __tablename__ = "heatmaps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), unique=True)
    method: Mapped[str] = mapped_column(String(16))
    grid: Mapped[bytes | None] = mapped_column(LargeBinary)
    array_path: Mapped[str | None] = mapped_column(Text)
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
    study_instance_uid: Mapped[str | None] = mapped_column(Text, index=True)
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


class AuditPdf(Base):
    """The PDF ``medcli audit --pdf`` wrote, kept with its audit so the web console can show it.

    The bytes live in the database, not beside it: the console may run on another machine than the
    command, over the same database. An audit PDF is small (its curves are thinned to a few hundred
    points), and a table of its own keeps the bytes out of every query of ``audits``.
    """

    __tablename__ = "audit_pdfs"

    audit_id: Mapped[int] = mapped_column(ForeignKey("audits.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    pages: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebAction(Base):
    """Something a person did through the web console (``web/``): who, in which role, what, when, how it went.

    ``target`` names what was acted on (``scan 42``, ``reason unroutable``, ``busi/v2``) and
    ``detail`` what came of it; neither ever holds patient data.
    """

    __tablename__ = "web_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(Text)
    #: done, refused (the library said no) or failed (an error)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")


class OutboxItem(Base):
    """One DICOM object of a scan for one destination (``meddaemon.dicom.outbox``).

    Added in the transaction of the state step that makes the object due (``inferred -> reported``);
    ``pending`` until the destination acknowledged it (``delivered``) or it was given up on
    (``dead``, after ``outbox_max_attempts`` failures or a permanent refusal, ``last_error`` saying
    what the peer answered). A scan is archived only once none of its items is pending. Times are
    by the database's clock.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("scan_id", "object_key", "destination"),
        Index("ix_outbox_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id", ondelete="CASCADE"), index=True)
    #: the object: ``sr``, ``pdf``, or ``pmap:<label>`` / ``sc:<label>``
    object_key: Mapped[str] = mapped_column(String(96))
    destination: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    #: the object's file, stored as ``meddaemon.stored_paths`` says; None when it could not be made
    path: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    #: when it last became pending: its creation, or the ``medcli outbox retry`` that revived it (None,
    #: from a daemon of the version before 0014: its creation, ``outbox.pending_since``)
    pending_since: Mapped[float | None] = mapped_column(Float)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    #: the daemon sending it now; None: free for any daemon's sender
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("daemons.id", ondelete="SET NULL"), index=True)


class Evaluation(Base):
    """One ``medcli evaluate`` run over a cohort read in place: self-describing, so a page can show it
    without the command line that made it.

    ``name`` is unique: running the same command again continues (or refreshes) the same
    evaluation. ``dataset_fingerprint`` is the SHA-256 of the sorted ``relative path, SHA-256`` lines
    of the files read: the same bytes under the same names give the same fingerprint. ``state``:
    ``running``, ``completed``, ``interrupted`` (Ctrl-C; a killed run stays ``running``) or
    ``stopped`` (too many unreadable files, a model refused on a node: ``message`` says why).
    """

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    task_name: Mapped[str] = mapped_column(ForeignKey("tasks.name"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    dataset_path: Mapped[str] = mapped_column(Text)
    dataset_layout: Mapped[str] = mapped_column(String(32))
    dataset_fingerprint: Mapped[str | None] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), index=True)
    message: Mapped[str | None] = mapped_column(Text)
    files_total: Mapped[int] = mapped_column(Integer, default=0)
    scored: Mapped[int] = mapped_column(Integer, default=0)
    reused: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    #: failed files per reason code (``failures.FailureReason``)
    failures: Mapped[dict[str, Any]] = mapped_column(default=dict)
    images_per_second: Mapped[float | None] = mapped_column(Float)
    meddaemon_version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class EvaluationFile(Base):
    """One file of an evaluation, by its path relative to the dataset root: the scan its bytes are
    (``outcome`` ``scored`` this run, ``reused`` when that model version had scored the bytes
    before) or why it could not be read (``failed``, with the daemon's reason code)."""

    __tablename__ = "evaluation_files"
    __table_args__ = (UniqueConstraint("evaluation_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    scan_id: Mapped[int | None] = mapped_column(ForeignKey("scans.id", ondelete="SET NULL"), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)


class ReceivedInstance(Base):
    """One DICOM instance a sender pushed to the daemon's C-STORE SCP (``meddaemon.dicom.receiver``):
    who sent it, over which association, and the file it became.

    ``sha256`` is that file's (File Meta + the dataset as received) and so the identity its scan is
    registered under: it survives the intake's moves and joins this row to the scan, or to the
    duplicate arrival when the same bytes were sent again. The same ``sop_instance_uid`` with
    another ``sha256`` is a new version of that instance. ``received_at`` is by the database's clock
    (the series' quiet timer, ``dicom.completeness``); ``association_at`` by the receiving node's.
    """

    __tablename__ = "received_instances"
    __table_args__ = (Index("ix_received_instances_study_received", "study_instance_uid", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: the name the file was written under in the inbox (its scan's ``source_name``)
    file_name: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(Text, index=True)
    sop_class_uid: Mapped[str] = mapped_column(Text)
    study_instance_uid: Mapped[str | None] = mapped_column(Text)
    series_instance_uid: Mapped[str | None] = mapped_column(Text)
    transfer_syntax_uid: Mapped[str] = mapped_column(Text)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int] = mapped_column(Integer)
    association_at: Mapped[datetime]
    received_at: Mapped[float] = mapped_column(Float)
    #: the node whose receiver wrote the file
    node: Mapped[str] = mapped_column(String(255))
