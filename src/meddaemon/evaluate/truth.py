"""The truth an evaluation's dataset carries (BUSI folders, NIH's Data_Entry, COVID metadata, IDC
folders, a manifest's label column) as the audit's :class:`LabelTable`, keyed by SHA-256, so that
``--audit`` is the audit of ``medcli audit`` (audit/run.py) on exactly the evaluation's scans."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.audit.labels import LabelRow, LabelTable
from meddaemon.audit.predictions import AuditInputError, load_predictions
from meddaemon.audit.run import AuditRequest, AuditResult, audit_predictions
from meddaemon.db.models import Evaluation, EvaluationFile, ModelVersion
from meddaemon.engine.tasks import TaskSpec
from meddaemon.evaluate.cohort import read_cohort
from meddaemon.evaluate.store import (
    COMPLETED,
    FAILED,
    REUSED,
    RUNNING,
    SCORED,
    STOPPED,
    find_evaluation,
    is_being_run,
    left_to_daemon,
)
from meddaemon.files import file_sha256
from meddaemon.names import utf8_name


def truth_digest(rows: list[LabelRow]) -> str:
    """The SHA-256 of the truth as read now (each file's SHA-256 and its labels): the audit's
    ``labels_sha256``. The evaluation's fingerprint was recorded instead, the same after an image
    moved to another class folder, while the truth the audit used had changed."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.key):
        digest.update(f"{row.key}\t{'|'.join(sorted(row.positives))}\n".encode())
    return digest.hexdigest()


def truth_of(session: Session, evaluation: Evaluation, spec: TaskSpec) -> LabelTable:
    """A label row per readable file of the evaluation whose layout labels it, keyed by its SHA-256;
    the patient (when the layout names one) and the layout's other columns ride along."""
    cohort = read_cohort(Path(evaluation.dataset_path), spec)
    if cohort.index is None:
        raise AuditInputError(cohort.unlabelled())
    outcome_of = {
        path: (outcome, sha)
        for path, outcome, sha in session.execute(
            select(EvaluationFile.path, EvaluationFile.outcome, EvaluationFile.sha256).where(
                EvaluationFile.evaluation_id == evaluation.id
            )
        )
    }
    names = [utf8_name(cohort.relative(sample.path.absolute())) for sample in cohort.index.samples]
    scored = {sha for outcome, sha in outcome_of.values() if sha and outcome in (SCORED, REUSED)}
    # bytes scored under names the dataset no longer has: an image found under another name holding
    # them was moved there (a copy, its original still read, is an image added)
    present = set(names)
    moved_away = {sha for name, (outcome, sha) in outcome_of.items() if name not in present and sha in scored}
    rows: list[LabelRow] = []
    attribute_columns: dict[str, None] = {}
    unreadable = added = 0
    for number, (sample, name) in enumerate(zip(cohort.index.samples, names, strict=True), start=1):
        outcome, sha = outcome_of[name] if name in outcome_of else (None, _moved_here(sample.path, moved_away))
        if name not in outcome_of and sha is None:
            added += 1
        if outcome == FAILED:
            unreadable += 1
        if not sha or outcome == FAILED:
            continue
        attributes = dict(sample.extra)
        if sample.patient_id is not None:
            attributes["patient_id"] = sample.patient_id
        attribute_columns.update(dict.fromkeys(attributes))
        # the label table's line, as medcli audit --labels names it; a folder layout's images by their names
        line, source = (sample.line, None) if sample.line is not None else (number, cohort.relative(sample.path))
        rows.append(LabelRow(sha, line, frozenset(sample.labels), None, attributes, source=source))
    if not rows:
        raise AuditInputError(f"evaluation {evaluation.name!r} has no scored file with a label")
    removed = len(scored - {row.key for row in rows})
    counted = (
        (unreadable, "labelled file(s) could not be read and are left out (the evaluation lists them)"),
        (added, "labelled file(s) added to the dataset since the evaluation ran are not in it: run medcli "
                "evaluate again to score them"),
        (removed, "file(s) the evaluation scored are no longer in the dataset as its layout reads it now (removed "
                  "or left out since it ran)"),
    )  # fmt: skip
    return LabelTable(
        path=evaluation.dataset_path,
        sha256=truth_digest(rows),
        format=f"layout:{cohort.layout}",
        key_kind="sha256",
        rows=rows,
        label_columns=(),
        attribute_columns=tuple(attribute_columns),
        task_hint=spec.name,
        notes=tuple(f"{count} {what}" for count, what in counted if count),
    )


def _moved_here(path: Path, moved_away: set[str]) -> str | None:
    """The SHA-256 of a labelled file the evaluation did not read under this name, when it holds bytes
    the evaluation scored under a name now gone: moved since (to another class folder, its truth
    corrected). Looked up by name only, such a file lost its label, and the audit its share of the
    dataset, without a word."""
    try:
        sha = file_sha256(path)
    except OSError:
        return None
    return sha if sha in moved_away else None


def audit_evaluation(
    session: Session,
    name: str,
    request: AuditRequest,
    tasks: Mapping[str, TaskSpec],
    progress: Callable[[int], None] | None = None,
    on_bootstrap_start: Callable[[int], None] | None = None,
) -> AuditResult:
    """The audit of evaluation ``name`` (or id) against the labels of its dataset's layout."""
    evaluation = find_evaluation(session, name)
    if evaluation is None:
        raise AuditInputError(f"no evaluation named {name!r}")
    spec = tasks.get(evaluation.task_name)
    if spec is None:
        raise AuditInputError(f"evaluation {name!r} is of task {evaluation.task_name!r}, which is not configured")
    if evaluation.state != COMPLETED:
        state = evaluation.state
        if state == RUNNING and not is_being_run(session.get_bind(), evaluation.name):
            state = "interrupted: no process runs it now (killed, or its machine stopped)"
        raise AuditInputError(
            f"evaluation {evaluation.name!r} is {state} ({evaluation.scored + evaluation.reused} of "
            f"{evaluation.files_total} files scored): its audit would judge the model on part of the dataset; "
            + (
                "fix the dataset and run medcli evaluate again"
                if evaluation.state == STOPPED
                else "run the same medcli evaluate command again to finish it"
            )
        )
    left = left_to_daemon(session, evaluation.id)
    if left:
        raise AuditInputError(
            f"evaluation {evaluation.name!r} left {left} of its {evaluation.files_total} files to the daemon, which "
            "was still working on the same bytes: its audit would judge the model on part of the dataset; run the "
            "same medcli evaluate command again once the daemon has scored them"
        )
    version = session.get(ModelVersion, evaluation.model_version_id)
    assert version is not None
    if request.task not in (None, spec.name):
        raise AuditInputError(f"evaluation {name!r} is of task {spec.name}, not {request.task}: drop --task")
    if request.model_version not in (None, version.version):
        raise AuditInputError(
            f"evaluation {name!r} scored {spec.name}/{version.version}, not {request.model_version}: drop "
            f"--model-version, or evaluate the dataset with --model {request.model_version} and audit that run"
        )
    request = dataclasses.replace(request, evaluation=evaluation.name, task=spec.name, model_version=version.version)
    table = truth_of(session, evaluation, spec)
    predictions = load_predictions(session, version, spec.kind, evaluation_id=evaluation.id)
    return audit_predictions(
        session, request, table, spec, version, predictions, progress=progress, on_bootstrap_start=on_bootstrap_start
    )
