"""The tidy CSV: one row per (scope, subgroup, label, metric), with its interval or why it is undefined."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from meddaemon.audit.metrics import SCALARS, Agreement, LabelMetrics
from meddaemon.audit.run import AuditResult
from meddaemon.audit.values import Estimate, Undefined, Value
from meddaemon.files import write_named_output

COLUMNS = (
    "scope", "by", "level", "label", "metric", "value", "lower", "upper", "ci_method",
    "undefined_reason", "n", "positives", "negatives",
)  # fmt: skip


def _row(scope: str, by: str, level: str, label: str, metric: str, value: Value, counts: dict[str, int]) -> dict:
    out: dict[str, Any] = {"scope": scope, "by": by, "level": level, "label": label, "metric": metric, **counts}
    if isinstance(value, Estimate):
        out.update(value=value.value, lower=value.lower, upper=value.upper)
        if value.has_interval:
            out["ci_method"] = value.method
    else:
        out["undefined_reason"] = value.reason
    return out


def _metric_rows(scope: str, by: str, level: str, m: LabelMetrics) -> list[dict]:
    counts = {"n": m.n, "positives": m.positives, "negatives": m.negatives}
    return [_row(scope, by, level, m.label, name, m.scalar(name), counts) for name in SCALARS]


def _agreement_rows(a: Agreement, n: int) -> list[dict]:
    return [
        _row("multiclass", "", "", "(all classes)", name, getattr(a, name), {"n": n})
        for name in ("balanced_accuracy", "f1_macro", "mcc", "kappa")
    ]


def tidy_rows(result: AuditResult) -> list[dict[str, Any]]:
    analysis = result.analysis
    rows: list[dict[str, Any]] = []
    for m in analysis.overall:
        rows += _metric_rows("overall", "", "", m)
    if analysis.multiclass is not None:
        rows += _agreement_rows(analysis.multiclass, result.cohort.n)
    for g in analysis.subgroups:
        if g.metrics is not None:
            rows += _metric_rows("subgroup", g.by, g.level, g.metrics)
        else:
            assert isinstance(g.insufficient, Undefined)
            counts = {"n": g.n, "positives": g.positives, "negatives": g.negatives}
            rows += [_row("subgroup", g.by, g.level, g.label, name, g.insufficient, counts) for name in SCALARS]
    for c in result.comparison:
        counts = {"n": c.n, "positives": c.positives, "negatives": c.n - c.positives}
        rows.append(_row("comparison", "model_version", str(result.request.compare), c.label, "auc_difference",
                         c.difference, counts))  # fmt: skip
    for s in result.shift:
        counts = {"n": s.a.n + s.b.n, "positives": s.a.positives + s.b.positives}
        rows.append(_row("shift", "window", "b-a", s.label, "auc_change", s.auc_change, counts))
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_named_output(path, text.getvalue().encode("utf-8"))
