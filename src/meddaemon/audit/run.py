"""One audit, start to finish: read the truth, load and join the predictions, compute, judge.

``run_audit`` is what ``medcli audit`` calls; ``analyse`` is the array-only core (no database),
which the benchmark times.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from meddaemon.audit.bootstrap import Interval, Target, bootstrap
from meddaemon.audit.compare import Shift, VersionComparison, Window, compare_versions, shift
from meddaemon.audit.criteria import Criterion, Verdict, evaluate, parse_criteria
from meddaemon.audit.join import Cohort, JoinReport, join
from meddaemon.audit.labels import (
    LabelTable,
    check_columns_beside_the_truth,
    check_label_columns,
    read_label_folders,
    read_labels,
)
from meddaemon.audit.metrics import Agreement, LabelMetrics, agreement, label_metrics
from meddaemon.audit.predictions import AuditInputError, Predictions, find_version, load_predictions
from meddaemon.audit.subgroups import Subgroup, subgroups
from meddaemon.audit.values import Estimate
from meddaemon.db.models import ModelVersion
from meddaemon.engine.tasks import TaskSpec

AUTO_RESAMPLES = 2000


@dataclass(frozen=True)
class AuditRequest:
    labels: Path | None = None
    labels_from_folders: Path | None = None
    task: str | None = None
    model_version: str | None = None
    by: tuple[str, ...] = ()
    min_n: int = 30
    at_sensitivity: float = 0.9
    #: Resamples of the patient-clustered bootstrap; None: 2,000 when a patient has several scans, else 0.
    bootstrap: int | None = None
    seed: int = 0
    compare: str | None = None
    cohort_a: str | None = None
    cohort_b: str | None = None
    require: str | None = None
    #: the evaluation (name or id) whose dataset's own labels are the truth (``evaluate/truth.py``)
    evaluation: str | None = None

    def parameters(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Analysis:
    overall: list[LabelMetrics]
    multiclass: Agreement | None
    subgroups: list[Subgroup]
    resamples: int
    notes: list[str] = field(default_factory=list)


ProgressFn = Callable[[int], None]


def analyse(
    cohort: Cohort,
    by: tuple[str, ...] = (),
    min_n: int = 30,
    at_sensitivity: float = 0.9,
    resamples: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    on_bootstrap_start: Callable[[int], None] | None = None,
) -> Analysis:
    """Every metric of every reported label, overall and per subgroup, with their intervals."""
    notes: list[str] = []
    overall = []
    for j, label in enumerate(cohort.labels):
        rows = np.flatnonzero(cohort.y[:, j] >= 0)
        overall.append(
            label_metrics(
                label, cohort.y[rows, j], cohort.probabilities[rows, j], cohort.calls[rows, j],
                cohort.threshold(j), at_sensitivity=at_sensitivity,
            )
        )  # fmt: skip
        if len(rows) < cohort.n:
            notes.append(f"{label}: truth unknown for {cohort.n - len(rows)} scans, left out of its metrics")
    multiclass = None
    if cohort.kind == "multiclass":
        assert cohort.truth_class is not None and cohort.called_class is not None
        k = len(cohort.classes)
        confusion = np.bincount(cohort.truth_class * k + cohort.called_class, minlength=k * k).reshape(k, k)
        multiclass = agreement(confusion, cohort.classes)
    groups = subgroups(cohort, list(by), min_n=min_n, at_sensitivity=at_sensitivity)

    sizes = np.bincount(cohort.clusters) if cohort.n else np.zeros(0, dtype=np.int64)
    shared = int((sizes > 1).sum())
    if resamples is None:
        resamples = AUTO_RESAMPLES if shared else 0
    if shared and not resamples:
        notes.append(
            f"{shared} patients have several scans: intervals assume independent scans; "
            "use --bootstrap for patient-clustered intervals"
        )
    if resamples:
        if on_bootstrap_start:
            on_bootstrap_start(resamples)
        overall, groups = _with_bootstrap(cohort, overall, groups, resamples, seed, progress)
        notes.append(
            "intervals of AUC, sensitivity, specificity, PPV and NPV: union of Wilson/DeLong and a patient-"
            f"clustered percentile bootstrap ({resamples} resamples of {cohort.n_clusters} patients)"
        )
    return Analysis(overall, multiclass, groups, resamples, notes)


def _with_bootstrap(
    cohort: Cohort,
    overall: list[LabelMetrics],
    groups: list[Subgroup],
    resamples: int,
    seed: int,
    progress: ProgressFn | None,
) -> tuple[list[LabelMetrics], list[Subgroup]]:
    targets = []
    for j, label in enumerate(cohort.labels):
        rows = np.flatnonzero(cohort.y[:, j] >= 0)
        targets.append(_target(cohort, ("overall", label), rows, j))
    index = {label: j for j, label in enumerate(cohort.labels)}
    for g in groups:
        if g.metrics is not None:
            targets.append(_target(cohort, (g.by, g.level, g.label), g.rows, index[g.label]))
    found = bootstrap(targets, cohort.n_clusters, resamples=resamples, seed=seed, progress=progress)
    overall = [_apply(m, found[("overall", m.label)]) for m in overall]
    groups = [
        dataclasses.replace(g, metrics=_apply(g.metrics, found[(g.by, g.level, g.label)]))
        if g.metrics is not None
        else g
        for g in groups
    ]
    return overall, groups


def _target(cohort: Cohort, key: tuple[str, ...], rows: np.ndarray, j: int) -> Target:
    return Target(
        key=key,
        y=cohort.y[rows, j].astype(bool),
        p=cohort.probabilities[rows, j],
        call=cohort.calls[rows, j],
        cluster=cohort.clusters[rows],
    )


def _apply(m: LabelMetrics, intervals: dict[str, Interval]) -> LabelMetrics:
    """Each metric's bootstrap interval, united with the interval it had (Wilson, DeLong or the count
    bound): a percentile bootstrap of a proportion at 0 or 1, or of an AUC at 1, has width zero."""
    changes: dict[str, Any] = {}
    for name, iv in intervals.items():
        value = getattr(m, name)
        if isinstance(value, Estimate) and np.isfinite(iv.lower):
            method = f"cluster-bootstrap-percentile (B={iv.resamples}" + (
                f", undefined in {iv.undefined})" if iv.undefined else ")"
            )
            lower, upper = iv.lower, iv.upper
            if value.has_interval:
                assert value.lower is not None and value.upper is not None
                lower, upper = min(lower, value.lower), max(upper, value.upper)
                method += f" union {value.method}"
            changes[name] = value.with_interval(lower, upper, method)
    return dataclasses.replace(m, **changes)


@dataclass(frozen=True)
class AuditResult:
    request: AuditRequest
    task: str
    kind: str
    model_version: str
    model_version_id: int
    model_sha256: str
    compare_version_id: int | None
    labels: LabelTable
    predictions_sha256: str
    join: JoinReport
    cohort: Cohort
    analysis: Analysis
    comparison: list[VersionComparison]
    shift: list[Shift]
    windows: tuple[str, str] | None
    criteria: list[Criterion]
    verdicts: list[Verdict]

    @property
    def passed(self) -> bool | None:
        return all(v.passed for v in self.verdicts) if self.criteria else None

    def as_dict(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "task": self.task,
            "kind": self.kind,
            "model": {"version": self.model_version, "id": self.model_version_id, "sha256": self.model_sha256},
            "inputs": {
                "labels_path": self.labels.path,
                "labels_sha256": self.labels.sha256,
                "labels_format": self.labels.format,
                "key": self.labels.key_kind,
                "predictions_sha256": self.predictions_sha256,
            },
            "parameters": self.request.parameters(),
            "join": self.join.as_dict(),
            "patients": self.cohort.n_clusters,
            "labels": [m.as_dict() for m in a.overall],
            "multiclass": {**a.multiclass.as_dict(), "n": self.cohort.n} if a.multiclass else None,
            "subgroups": [g.as_dict() for g in a.subgroups],
            "bootstrap_resamples": a.resamples,
            "comparison": [c.as_dict() for c in self.comparison],
            "shift": {"a": self.windows[0], "b": self.windows[1], "labels": [s.as_dict() for s in self.shift]}
            if self.windows
            else None,
            "criteria": [v.as_dict() for v in self.verdicts],
            "passed": self.passed,
            "notes": a.notes,
        }


def resolve_task(table: LabelTable, tasks: Mapping[str, TaskSpec], requested: str | None) -> TaskSpec:
    name = requested or table.task_hint
    if name is not None:
        if name not in tasks:
            raise AuditInputError(f"unknown task {name!r}; tasks: {', '.join(sorted(tasks))}")
        return tasks[name]
    mentioned = table.labels_mentioned()
    fits = [t for t in tasks.values() if mentioned <= set(t.labels)]
    if len(fits) != 1:
        names = ", ".join(t.name for t in fits) or "none"
        raise AuditInputError(f"cannot tell the task from the labels {sorted(mentioned)} (fits: {names}); pass --task")
    return fits[0]


def read_truth(request: AuditRequest, tasks: Mapping[str, TaskSpec]) -> tuple[LabelTable, TaskSpec]:
    if (request.labels is None) == (request.labels_from_folders is None):
        raise AuditInputError("give exactly one of --labels FILE, --labels-from-folders DIR and --evaluation RUN")
    if request.labels_from_folders is not None:
        spec = tasks.get(request.task or "busi")
        if spec is None:
            raise AuditInputError(f"unknown task {request.task!r}; tasks: {', '.join(sorted(tasks))}")
        table = read_label_folders(request.labels_from_folders, spec.labels)
        return table, spec
    assert request.labels is not None
    vocabulary = {label for t in tasks.values() for label in t.labels}
    given = tasks.get(request.task) if request.task else None  # an unknown one: resolve_task says so
    # a file of several tasks' rows is read whole; an unknown label is named against the task's labels
    table = read_labels(request.labels, vocabulary, expected=given.labels if given else None)
    spec = resolve_task(table, tasks, request.task)
    check_label_columns(table, spec.name, spec.labels)
    check_columns_beside_the_truth(table, spec.labels)
    return table, spec


def predictions_digest(cohort: Cohort) -> str:
    digest = hashlib.sha256()
    for array in (cohort.scan_ids, cohort.probabilities, cohort.calls, cohort.thresholds):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run_audit(
    session: Session,
    request: AuditRequest,
    tasks: Mapping[str, TaskSpec],
    progress: ProgressFn | None = None,
    on_bootstrap_start: Callable[[int], None] | None = None,
) -> AuditResult:
    """Read the labels, join them to the stored predictions of the task's model, and compute the audit."""
    criteria = parse_criteria(request.require) if request.require is not None else []
    windows = _windows(request)
    table, spec = read_truth(request, tasks)
    version = find_version(session, spec.name, request.model_version)
    predictions = load_predictions(session, version, spec.kind)
    return audit_predictions(
        session, request, table, spec, version, predictions, criteria, windows, progress, on_bootstrap_start
    )


def _windows(request: AuditRequest) -> tuple[Window, Window] | None:
    if (request.cohort_a is None) != (request.cohort_b is None):
        raise AuditInputError("--cohort-a and --cohort-b go together")
    if request.cohort_a is not None and request.cohort_b is not None:
        return (Window.parse(request.cohort_a), Window.parse(request.cohort_b))
    return None


def audit_predictions(
    session: Session,
    request: AuditRequest,
    table: LabelTable,
    spec: TaskSpec,
    version: ModelVersion,
    predictions: Predictions,
    criteria: list[Criterion] | None = None,
    windows: tuple[Window, Window] | None = None,
    progress: ProgressFn | None = None,
    on_bootstrap_start: Callable[[int], None] | None = None,
) -> AuditResult:
    """The audit of ``predictions`` against the truth ``table`` (from a labels file, or from the
    dataset layout of an evaluation: ``evaluate/truth.py``)."""
    if criteria is None:
        criteria = parse_criteria(request.require) if request.require is not None else []
        windows = _windows(request)
    cohort, report = join(predictions, table)
    if criteria:
        criteria = parse_criteria(request.require or "", cohort.labels)
    analysis = analyse(
        cohort, request.by, request.min_n, request.at_sensitivity, request.bootstrap, request.seed,
        progress, on_bootstrap_start,
    )  # fmt: skip
    analysis.notes[:0] = table.notes
    comparison: list[VersionComparison] = []
    compare_id = None
    if request.compare:
        other_version = find_version(session, spec.name, request.compare)
        compare_id = other_version.id
        comparison = compare_versions(cohort, load_predictions(session, other_version, spec.kind))
    shifts: list[Shift] = []
    if windows:
        days = np.array([d or "" for d in cohort.scan_attributes["registered_day"]], dtype=object)
        shifts = shift(cohort, days, windows[0], windows[1], request.at_sensitivity)
    return AuditResult(
        request=request,
        task=spec.name,
        kind=spec.kind,
        model_version=version.version,
        model_version_id=version.id,
        model_sha256=version.sha256,
        compare_version_id=compare_id,
        labels=table,
        predictions_sha256=predictions_digest(cohort),
        join=report,
        cohort=cohort,
        analysis=analysis,
        comparison=comparison,
        shift=shifts,
        windows=(str(windows[0]), str(windows[1])) if windows else None,
        criteria=criteria,
        verdicts=evaluate(criteria, analysis.overall),
    )
