"""The stored predictions of one model version, as arrays: a row per scan, a column per label."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.db.models import EvaluationFile, ModelVersion, Result, Scan

#: Scan columns an audit can group by (under these names) or cluster on.
SCAN_ATTRIBUTES = {
    "sex": "patient_sex",
    "age": "patient_age",
    "manufacturer": "manufacturer",
    "view": "view_position",
    "modality": "modality",
    "body_part": "body_part",
    "patient_id": "patient_id",
}
#: Also in ``Predictions.scan_attributes``: ``registered_day`` (YYYY-MM-DD), for time windows.


class AuditInputError(ValueError):
    """An audit that cannot run as asked (unknown task or model version, no predictions, unknown column)."""


@dataclass(frozen=True)
class Predictions:
    task: str
    kind: str
    labels: tuple[str, ...]
    model_version: str
    model_version_id: int
    model_sha256: str
    scan_ids: np.ndarray
    source_names: list[str]
    sha256: list[str | None]
    sop_instance_uids: list[str | None]
    probabilities: np.ndarray  # (scans, labels)
    calls: np.ndarray  # (scans, labels), bool
    thresholds: np.ndarray  # (labels,)
    scan_attributes: dict[str, list[str | None]]
    incomplete: int  # scans with results for only some labels, left out
    #: per scan, whether ``medcli evaluate`` read it in place (its name is the dataset's own path);
    #: else it arrived in the inbox, under the inbox's task folder (empty: every scan did)
    read_in_place: list[bool] = field(default_factory=list)


def find_version(session: Session, task: str, version: str | None) -> ModelVersion:
    """The named version of ``task``, or its active one, or (none active) the newest one with results."""
    query = select(ModelVersion).where(ModelVersion.task_name == task)
    if version is not None:
        row = session.scalars(query.where(ModelVersion.version == version)).first()
        if row is None:
            known = [v.version for v in session.scalars(query)]
            raise AuditInputError(f"task {task!r} has no model version {version!r} (known: {known or 'none'})")
        return row
    active = session.scalars(query.where(ModelVersion.status == "active")).first()
    if active is not None:
        return active
    with_results = query.where(ModelVersion.id.in_(select(Result.model_version_id))).order_by(ModelVersion.id.desc())
    row = session.scalars(with_results).first()
    if row is None:
        raise AuditInputError(f"task {task!r} has no model version with stored results")
    return row


def load_predictions(
    session: Session, version: ModelVersion, kind: str, evaluation_id: int | None = None
) -> Predictions:
    """The version's results, of every scan or (``evaluation_id``) of the scans of one evaluation."""
    labels = tuple(version.manifest.get("labels") or ())
    if not labels:
        raise AuditInputError(f"model version {version.task_name}/{version.version} has no labels in its manifest")
    label_index = {name: i for i, name in enumerate(labels)}
    query = select(Result.scan_id, Result.label, Result.probability, Result.threshold, Result.positive).where(
        Result.model_version_id == version.id
    )
    if evaluation_id is not None:
        of_evaluation = select(EvaluationFile.scan_id).where(EvaluationFile.evaluation_id == evaluation_id)
        query = query.where(Result.scan_id.in_(of_evaluation))
    rows = session.execute(query.order_by(Result.scan_id)).all()
    if not rows:
        raise AuditInputError(f"model version {version.task_name}/{version.version} has no stored results")
    scan_col = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    lab_col = np.fromiter((label_index.get(r[1], -1) for r in rows), dtype=np.int64, count=len(rows))
    prob_col = np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows))
    thr_col = np.fromiter((r[3] for r in rows), dtype=np.float64, count=len(rows))
    pos_col = np.fromiter((r[4] for r in rows), dtype=bool, count=len(rows))
    keep = lab_col >= 0
    outside = keep & ~((prob_col >= 0.0) & (prob_col <= 1.0))
    if outside.any():  # the engine stores softmax or sigmoid outputs: another writer put these here
        first = int(np.flatnonzero(outside)[0])
        raise AuditInputError(
            f"model version {version.task_name}/{version.version} has {int(outside.sum())} stored probabilities "
            f"outside 0 to 1 (scan {int(scan_col[first])}, {labels[lab_col[first]]}: {prob_col[first]:g}); "
            "they were not written by meddaemon's engine, and no metric of them would mean anything"
        )
    scan_ids, row_of = np.unique(scan_col[keep], return_inverse=True)
    probs = np.full((len(scan_ids), len(labels)), np.nan)
    calls = np.zeros((len(scan_ids), len(labels)), dtype=bool)
    probs[row_of, lab_col[keep]] = prob_col[keep]
    calls[row_of, lab_col[keep]] = pos_col[keep]
    thresholds = np.full(len(labels), np.nan)
    thresholds[lab_col[keep]] = thr_col[keep]
    complete = ~np.isnan(probs).any(axis=1)
    scan_ids, probs, calls = scan_ids[complete], probs[complete], calls[complete]

    columns = [Scan.id, Scan.source_name, Scan.sha256, Scan.sop_instance_uid, Scan.registered_at, Scan.source_path]
    columns += [getattr(Scan, c) for c in SCAN_ATTRIBUTES.values()]
    meta = {
        r[0]: r[1:]
        for r in session.execute(
            select(*columns).where(Scan.id.in_(select(Result.scan_id).where(Result.model_version_id == version.id)))
        )
    }
    ordered: list[tuple[Any, ...]] = [tuple(meta[int(i)]) for i in scan_ids]
    attributes = {name: [m[5 + j] for m in ordered] for j, name in enumerate(SCAN_ATTRIBUTES)}
    attributes["registered_day"] = [m[3].date().isoformat() if m[3] else None for m in ordered]
    return Predictions(
        task=version.task_name,
        kind=kind,
        labels=labels,
        model_version=version.version,
        model_version_id=version.id,
        model_sha256=version.sha256,
        scan_ids=scan_ids,
        source_names=[m[0] for m in ordered],
        sha256=[m[1] for m in ordered],
        sop_instance_uids=[m[2] for m in ordered],
        probabilities=probs,
        calls=calls,
        thresholds=thresholds,
        scan_attributes=attributes,
        incomplete=int((~complete).sum()),
        read_in_place=[m[4] is not None for m in ordered],
    )
