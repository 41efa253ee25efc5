"""The database side of an evaluation: its row, the scored set, and each chunk of files written in
one transaction with multi-row INSERTs (scans, their history, results, heatmaps, the file rows).

Identity is SHA-256, as in the daemon: bytes already held by a live scan (the daemon's or an earlier
evaluation's) are that scan; the evaluation adds its model's results to it when they are missing.
A scan the daemon is still working on (registered, routed, waiting for a model) is left to it.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, delete, exists, func, select, text
from sqlalchemy.orm import Session

from meddaemon import __version__
from meddaemon.daemon.bookkeeper import HeatmapFile, insert_heatmaps, insert_results
from meddaemon.db.bulk import insert_returning_ids, insert_rows
from meddaemon.db.models import (
    METADATA_COLUMNS,
    Evaluation,
    EvaluationFile,
    Heatmap,
    ModelVersion,
    Result,
    Scan,
    ScanEvent,
    row_id,
    utcnow,
)
from meddaemon.evaluate.reading import FileRead
from meddaemon.failures import NOT_AN_IMAGE
from meddaemon.names import utf8_name
from meddaemon.states import ScanState
from meddaemon.stored_paths import stored_name

#: Live scans of the daemon that it will still run through its own model: the evaluation leaves them.
DAEMON_BUSY = frozenset({ScanState.REGISTERED, ScanState.ROUTED, ScanState.WAITING_MODEL})
#: ``evaluation_files.outcome`` values.
SCORED, REUSED, FAILED, SKIPPED = "scored", "reused", "failed", "skipped"
#: why a file is skipped, with no reason code, while the daemon scores the same bytes (a later run scores it)
LEFT_TO_DAEMON = "the daemon is still working on these bytes"
#: ``evaluations.state`` values.
RUNNING, COMPLETED, INTERRUPTED, STOPPED = "running", "completed", "interrupted", "stopped"

T = TypeVar("T")


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (a name taken by another cohort or model)."""


@contextmanager
def one_run_at_a_time(engine: Engine, name: str) -> Iterator[None]:
    """Evaluation ``name`` is run by this process only, until the block ends; EvaluationError when
    another holds it, on this host or another sharing the database. Two runs of one name at once
    each added their counts to the row (scored and reused came to twice the files).

    PostgreSQL: a session advisory lock on a connection of its own; SQLite: a byte of a lock file
    beside the database (``<database>.evaluations.lock``). A killed run's lock goes with its process."""
    key = int.from_bytes(hashlib.sha256(f"meddaemon evaluation {name}".encode()).digest()[:8], "big", signed=True)
    busy = EvaluationError(
        f"evaluation {name!r} is being run by another process (on this host or another using the database); "
        "wait for it to end, or give another --name"
    )
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            if not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}):
                raise busy
            connection.commit()
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.evaluations.lock", "ab") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, key % 2**31)
        except OSError:
            raise busy from None
        yield


def is_being_run(bind: Engine | Connection, name: str) -> bool:
    """Whether a process holds evaluation ``name`` (:func:`one_run_at_a_time`) now: a row a killed
    run left ``running`` (SIGKILL, a power cut) has none, and was said to be running for good. Not
    for a process that holds an evaluation itself: its lock file's byte ranges are released with
    any descriptor of it that it closes (POSIX record locks)."""
    try:
        with one_run_at_a_time(bind if isinstance(bind, Engine) else bind.engine, name):
            return False
    except EvaluationError:
        return True


@dataclass
class FileOutcome:
    """One file ready to be written: a failure, known bytes, or the model's output."""

    read: FileRead
    probabilities: Sequence[float] | None = None
    positive: Sequence[bool] | None = None
    heatmaps: list[HeatmapFile] = field(default_factory=list)


@dataclass
class ChunkCounts:
    scored: int = 0
    reused: int = 0
    failed: int = 0
    skipped: int = 0
    #: of ``skipped``, the files that are no image at all (``NOT_AN_IMAGE``)
    not_images: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    #: files decoded and run through the model in this run (scored, a copy of a file scored in it,
    #: or given the heatmaps a run without ``--heatmaps`` left out): images/s counts these
    forwarded: int = 0
    #: known bytes whose scan holds no results of the version after all (a 64-bit prefix collision,
    #: or the scan was deleted): not written, to be decoded and scored
    redo: list[FileRead] = field(default_factory=list)


def open_evaluation(
    session: Session,
    *,
    name: str,
    version: ModelVersion,
    dataset_path: Path,
    layout: str,
    engine: str,
    files_total: int,
    parameters: dict[str, Any],
) -> Evaluation:
    """The evaluation ``name``: created, or continued when it is the same cohort and model version
    (a rerun or a resumed run); counts start again, files already scored are reused."""
    row = session.scalars(select(Evaluation).where(Evaluation.name == name).with_for_update()).one_or_none()
    if row is not None and (row.model_version_id != version.id or row.dataset_path != str(dataset_path)):
        raise EvaluationError(
            f"evaluation {name!r} is of {row.dataset_path} with model version id {row.model_version_id}; "
            "give another --name"
        )
    if row is None:
        row = Evaluation(name=name, task_name=version.task_name, model_version_id=version.id)
        session.add(row)
    row.dataset_path, row.dataset_layout, row.engine = str(dataset_path), layout, engine
    row.parameters, row.state, row.message = parameters, RUNNING, None
    row.files_total, row.scored, row.reused, row.failed, row.failures = files_total, 0, 0, 0, {}
    row.images_per_second, row.meddaemon_version = None, __version__
    row.started_at, row.finished_at = utcnow(), None
    session.flush()
    return row


def evaluation_values(session: Session, name: str) -> dict[str, Any] | None:
    """The row of the evaluation ``name`` as it stands (its columns' values), or None: what
    ``put_back`` restores."""
    row = session.scalars(select(Evaluation).where(Evaluation.name == name)).one_or_none()
    return None if row is None else {c.key: getattr(row, c.key) for c in Evaluation.__table__.columns}


def put_back(session: Session, evaluation_id: int, values: dict[str, Any] | None) -> None:
    """The evaluation as it was before a run whose request was refused before it scored a file
    (``values``; None: it did not exist, and goes): a completed run stays completed, its audit
    possible."""
    row = session.get(Evaluation, evaluation_id)
    if row is None:
        return
    if values is None:
        session.delete(row)
    else:
        for key, value in values.items():
            setattr(row, key, value)
    session.flush()


def forget_files_gone(session: Session, evaluation_id: int, present: Iterable[str]) -> int:
    """Remove the rows of files no longer in the cohort (deleted or renamed since an earlier run of
    the evaluation): kept, they stayed in a rerun's lists, its fingerprint and its audit. ``present``
    are the cohort's names as the rows store them; returns how many rows went."""
    names = set(present)
    stored = session.execute(
        select(EvaluationFile.id, EvaluationFile.path).where(EvaluationFile.evaluation_id == evaluation_id)
    ).all()
    gone = [row_id for row_id, path in stored if path not in names]
    for chunk in _chunks(gone):
        session.execute(delete(EvaluationFile).where(EvaluationFile.id.in_(chunk)))
    return len(gone)


def scored_shas(session: Session, version: ModelVersion, with_heatmaps: bool = False) -> list[str]:
    """SHA-256 of every scan that has results of this model version. ``with_heatmaps`` (a run with
    ``--heatmaps``) leaves out the scans that lack the maps the version would make (those scored by a
    run without): they are decoded again for them. A scan that gets none (a version that makes no
    heatmaps; a multilabel call of no label) stays scored, or every rerun would score it again. A
    map left out for not being finite (``engine.heatmaps``) leaves no trace: such a scan is decoded
    and run through the model again by each rerun with ``--heatmaps``, and stores nothing more."""
    query = select(Scan.sha256).distinct().join(Result, Result.scan_id == Scan.id)
    scored = {s for s in session.scalars(query.where(Result.model_version_id == version.id)) if s}
    if not with_heatmaps or not (version.manifest or {}).get("heatmaps", True):
        return sorted(scored)
    mapped = exists().where(Heatmap.result_id == Result.id)
    mapped_here = select(Result.id).where(Result.scan_id == Scan.id, Result.model_version_id == version.id, mapped)
    due = select(Result.id).where(Result.scan_id == Scan.id, Result.model_version_id == version.id)
    if version.manifest.get("kind") == "multilabel":  # a map for each label called: none without a call
        due = due.where(Result.positive.is_(True))
    missing = session.scalars(select(Scan.sha256).where(exists(due), ~exists(mapped_here)))
    return sorted(scored - set(missing))


def scans_with_heatmaps(session: Session, version_id: int, scan_ids: Iterable[int]) -> set[int]:
    """Of these scans, those with a heatmap of one of the version's results."""
    found: set[int] = set()
    for chunk in _chunks(sorted(set(scan_ids))):
        query = (
            select(Result.scan_id)
            .join(Heatmap, Heatmap.result_id == Result.id)
            .where(Result.scan_id.in_(chunk), Result.model_version_id == version_id)
        )
        found.update(session.scalars(query))
    return found


def scans_with_results(session: Session, version_id: int, shas: Iterable[str]) -> dict[str, int]:
    """Of these contents, the live scans holding results of the version: SHA-256 -> scan id."""
    found: dict[str, int] = {}
    for chunk in _chunks(sorted(set(shas))):
        query = (
            select(Scan.sha256, Scan.id)
            .join(Result, Result.scan_id == Scan.id)
            .where(Scan.sha256.in_(chunk), Scan.state != ScanState.FAILED, Result.model_version_id == version_id)
        )
        found.update({sha: scan_id for sha, scan_id in session.execute(query) if sha})
    return found


def record_chunk(
    session: Session,
    evaluation: Evaluation,
    version: ModelVersion,
    outcomes: Sequence[FileOutcome],
    state_dir: Path,
) -> ChunkCounts:
    """Write one chunk: new scans (state ``evaluated``), their results and heatmaps (paths under
    ``state_dir`` stored relative to it), and a row per file; the evaluation's counts go up by the
    chunk's. Known bytes that turn out to hold no results of the version are not written: they come
    back in ``redo``, to be decoded and scored."""
    now = utcnow()
    counts = ChunkCounts()
    shas = {o.read.sha256 for o in outcomes if o.read.sha256 and o.read.failure is None}
    done = scans_with_results(session, version.id, shas)
    live = _live_scans(session, shas)
    new_scans: dict[str, FileOutcome] = {}
    result_for: dict[str, FileOutcome] = {}
    maps_for: dict[str, FileOutcome] = {}  # scored before without heatmaps, decoded now for them
    mapped = scans_with_heatmaps(session, version.id, done.values()) if any(o.heatmaps for o in outcomes) else set()
    file_rows: list[dict[str, Any]] = []
    scan_of_file: list[str | None] = []
    for outcome in outcomes:
        read = outcome.read
        row: dict[str, Any] = {"evaluation_id": evaluation.id, "path": utf8_name(read.path), "sha256": read.sha256}
        row |= {"size_bytes": read.size or None, "scan_id": None, "failure_reason": None, "failure_message": None}
        sha = read.sha256
        if read.failure is not None or sha is None:
            assert read.failure is not None
            not_an_image = read.failure.reason in NOT_AN_IMAGE
            row |= {"outcome": SKIPPED if not_an_image else FAILED, "failure_reason": read.failure.reason.value}
            row["failure_message"] = read.failure.message
            if not_an_image:
                counts.skipped += 1
                counts.not_images += 1
            else:
                counts.failed += 1
                counts.failures[read.failure.reason.value] += 1
        elif sha in done or sha in result_for:
            row["outcome"] = REUSED
            counts.reused += 1
            if outcome.heatmaps and sha in done and done[sha] not in mapped:
                maps_for.setdefault(sha, outcome)
        elif read.known or outcome.probabilities is None:
            counts.redo.append(read)
            continue
        elif sha in live and live[sha][1] in DAEMON_BUSY:
            row |= {"outcome": SKIPPED, "failure_message": LEFT_TO_DAEMON}
            counts.skipped += 1
            sha = None
        else:
            row["outcome"] = SCORED
            counts.scored += 1
            result_for[sha] = outcome
            if sha not in live:
                new_scans[sha] = outcome
        file_rows.append(row)
        scan_of_file.append(sha if row["outcome"] in (SCORED, REUSED) else None)

    ids = {sha: scan_id for sha, (scan_id, _) in live.items()} | done
    ids |= _insert_scans(session, evaluation, list(new_scans.values()), now)
    _insert_results(session, version, [(ids[sha], o) for sha, o in result_for.items()], now, state_dir)
    _insert_heatmaps(session, version, [(ids[sha], o) for sha, o in maps_for.items()], now, state_dir)
    counts.forwarded = sum(1 for o in outcomes if o.probabilities is not None and o.read.failure is None)
    for row, sha in zip(file_rows, scan_of_file, strict=True):
        row["scan_id"] = ids.get(sha) if sha else None
    paths = [r["path"] for r in file_rows]
    for chunk in _chunks(paths):
        session.execute(
            delete(EvaluationFile).where(EvaluationFile.evaluation_id == evaluation.id, EvaluationFile.path.in_(chunk))
        )
    insert_rows(session, EvaluationFile, file_rows)
    evaluation.scored += counts.scored
    evaluation.reused += counts.reused
    evaluation.failed += counts.failed
    evaluation.failures = dict(Counter(evaluation.failures or {}) + counts.failures)
    session.flush()
    return counts


def finish_evaluation(
    session: Session, evaluation: Evaluation, state: str, message: str | None, images_per_second: float | None
) -> None:
    evaluation.state, evaluation.message = state, message
    evaluation.images_per_second = images_per_second
    evaluation.finished_at = utcnow()
    evaluation.dataset_fingerprint = fingerprint(session, evaluation.id) if state == COMPLETED else None
    session.flush()


def left_to_daemon(session: Session, evaluation_id: int) -> int:
    """How many of the evaluation's files were left to the daemon, which held the same bytes unscored."""
    query = select(func.count()).where(
        EvaluationFile.evaluation_id == evaluation_id,
        EvaluationFile.outcome == SKIPPED,
        EvaluationFile.failure_reason.is_(None),
    )
    return session.scalar(query) or 0


def heatmaps_added(session: Session, evaluation: Evaluation) -> int:
    """The run's reused files whose results, stored before the run began, were given heatmaps in it
    (files, as "already scored" counts them: two copies of one image are two). A run without
    ``--heatmaps`` gave none, whatever another run wrote meanwhile."""
    if not (evaluation.parameters or {}).get("heatmaps"):
        return 0
    query = (
        select(func.count(func.distinct(EvaluationFile.id)))
        .select_from(Result)
        .join(Heatmap, Heatmap.result_id == Result.id)
        .join(EvaluationFile, EvaluationFile.scan_id == Result.scan_id)
        .where(
            EvaluationFile.evaluation_id == evaluation.id,
            EvaluationFile.outcome == REUSED,
            Result.model_version_id == evaluation.model_version_id,
            Result.created_at < evaluation.started_at,
            Heatmap.created_at >= evaluation.started_at,
        )
    )
    return session.scalar(query) or 0


def fingerprint(session: Session, evaluation_id: int) -> str:
    """SHA-256 of the sorted ``path<TAB>sha256`` lines of the evaluation's files (unreadable ones
    with an empty hash): the same bytes under the same names, the same fingerprint."""
    digest = hashlib.sha256()
    query = (
        select(EvaluationFile.path, EvaluationFile.sha256)
        .where(EvaluationFile.evaluation_id == evaluation_id)
        .order_by(EvaluationFile.path)
    )
    for path, sha in session.execute(query):
        digest.update(f"{path}\t{sha or ''}\n".encode())
    return digest.hexdigest()


def find_evaluation(session: Session, name_or_id: str) -> Evaluation | None:
    row = session.scalars(select(Evaluation).where(Evaluation.name == name_or_id)).one_or_none()
    evaluation_id = row_id(name_or_id)
    if row is None and evaluation_id is not None:
        row = session.get(Evaluation, evaluation_id)
    return row


def evaluation_summary(session: Session, evaluation: Evaluation) -> dict[str, Any]:
    """The evaluation as plain data (``--json``, the console): self-describing, failures listed."""
    version = session.get(ModelVersion, evaluation.model_version_id)
    failed = session.execute(
        select(EvaluationFile.path, EvaluationFile.failure_reason, EvaluationFile.failure_message)
        .where(EvaluationFile.evaluation_id == evaluation.id, EvaluationFile.outcome == FAILED)
        .order_by(EvaluationFile.path)
    ).all()
    skipped = session.execute(
        select(EvaluationFile.path, EvaluationFile.failure_reason, EvaluationFile.failure_message)
        .where(EvaluationFile.evaluation_id == evaluation.id, EvaluationFile.outcome == SKIPPED)
        .order_by(EvaluationFile.path)
    ).all()
    seconds = None
    if evaluation.finished_at is not None:
        seconds = (evaluation.finished_at - evaluation.started_at).total_seconds()
    return {
        "evaluation_id": evaluation.id,
        "name": evaluation.name,
        "task": evaluation.task_name,
        "model": {"version": version.version if version else None, "id": evaluation.model_version_id},
        "dataset": {
            "path": evaluation.dataset_path,
            "layout": evaluation.dataset_layout,
            "fingerprint": evaluation.dataset_fingerprint,
        },
        "engine": evaluation.engine,
        "parameters": evaluation.parameters,
        "state": evaluation.state,
        "message": evaluation.message,
        "files": evaluation.files_total,
        "scored": evaluation.scored,
        "reused": evaluation.reused,
        #: of ``reused``, the scans given their heatmaps in this run (scored before by a run without them)
        "heatmaps_added": heatmaps_added(session, evaluation),
        "failed": evaluation.failed,
        #: files left out: no image at all (``not_images``), or bytes the daemon is still working on
        #: (``left_to_daemon``, scored by a later run)
        "skipped": len(skipped),
        "failures_by_reason": evaluation.failures,
        "unreadable": [{"path": p, "reason": r, "message": m} for p, r, m in failed],
        "not_images": [{"path": p, "reason": r, "message": m} for p, r, m in skipped if r],
        "left_to_daemon": [{"path": p, "message": m} for p, r, m in skipped if not r],
        "images_per_second": evaluation.images_per_second,
        "started_at": evaluation.started_at,
        "finished_at": evaluation.finished_at,
        "seconds": seconds,
        "meddaemon_version": evaluation.meddaemon_version,
    }


def _live_scans(session: Session, shas: Iterable[str]) -> dict[str, tuple[int, str]]:
    found: dict[str, tuple[int, str]] = {}
    for chunk in _chunks(sorted(set(shas))):
        query = select(Scan.sha256, Scan.id, Scan.state).where(Scan.sha256.in_(chunk), Scan.state != ScanState.FAILED)
        found.update({sha: (scan_id, state) for sha, scan_id, state in session.execute(query) if sha})
    return found


def _insert_scans(
    session: Session, evaluation: Evaluation, outcomes: Sequence[FileOutcome], now: datetime
) -> dict[str, int]:
    if not outcomes:
        return {}
    root = Path(evaluation.dataset_path)
    root = root.parent if root.is_file() else root
    rows = []
    for outcome in outcomes:
        read = outcome.read
        row: dict[str, Any] = {
            "sha256": read.sha256,
            "state": ScanState.EVALUATED.value,
            "task_name": evaluation.task_name,
            "source_name": utf8_name(read.path),
            "source_path": utf8_name(root / read.path),
            "stored_path": None,
            "size_bytes": read.size,
            "registered_at": now,
            "routed_at": now,
            "updated_at": now,
            "evaluation_id": evaluation.id,
        }
        for column in METADATA_COLUMNS:
            row[column] = getattr(read.metadata, column) if read.metadata is not None else None
        rows.append(row)
    ids = insert_returning_ids(session, Scan, rows, key=("source_path",))
    detail = f"read in place by evaluation {evaluation.id} ({evaluation.name})"
    events = [{"scan_id": i, "state": ScanState.EVALUATED.value, "at": now, "detail": detail} for i in ids]
    insert_rows(session, ScanEvent, events)
    return {o.read.sha256: scan_id for o, scan_id in zip(outcomes, ids, strict=True)}  # type: ignore[misc]


def _insert_results(
    session: Session, version: ModelVersion, scored: Sequence[tuple[int, FileOutcome]], now: datetime, state_dir: Path
) -> None:
    """The daemon's rows for these outcomes, written as the daemon writes them (heatmap paths
    relative to the state directory, ``stored_paths``)."""
    labels = list(version.manifest["labels"])
    thresholds = version.manifest.get("thresholds", {})
    rows: list[dict[str, Any]] = []
    maps: list[HeatmapFile | None] = []
    for scan_id, outcome in scored:
        assert outcome.probabilities is not None and outcome.positive is not None
        for index, label in enumerate(labels):
            rows.append(
                {
                    "scan_id": scan_id,
                    "model_version_id": version.id,
                    "label": label,
                    "probability": float(outcome.probabilities[index]),
                    "threshold": float(thresholds.get(label, 0.5)),
                    "positive": bool(outcome.positive[index]),
                    "latency_ms": None,
                    "created_at": now,
                }
            )
            maps.append(next((h for h in outcome.heatmaps if h.label_index == index), None))
    insert_results(session, rows, maps, now, partial(stored_name, state_dir=state_dir))


def _insert_heatmaps(
    session: Session, version: ModelVersion, mapped: Sequence[tuple[int, FileOutcome]], now: datetime, state_dir: Path
) -> None:
    """Heatmaps for results stored before without them (the version's results of these scans)."""
    if not mapped:
        return
    labels = list(version.manifest["labels"])
    result_ids: dict[tuple[int, str], int] = {}
    for chunk in _chunks([scan_id for scan_id, _ in mapped]):
        query = select(Result.id, Result.scan_id, Result.label).where(
            Result.scan_id.in_(chunk), Result.model_version_id == version.id
        )
        result_ids.update({(scan_id, label): result_id for result_id, scan_id, label in session.execute(query)})
    maps = [
        (result_ids[(scan_id, labels[h.label_index])], h)
        for scan_id, outcome in mapped
        for h in outcome.heatmaps
        if (scan_id, labels[h.label_index]) in result_ids
    ]
    insert_heatmaps(session, maps, now, partial(stored_name, state_dir=state_dir))


def _chunks(items: Sequence[T], size: int = 500) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
