"""The tidy CSV: one row per (scope, subgroup, label, metric), with its interval or why it is undefined."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddaemon.audit.metrics import SCALARS
from meddaemon.files import write_named_output

if TYPE_CHECKING:
    from meddaemon.audit.run import AuditResult

COLUMNS = (
    "scope", "by", "level", "label", "metric", "value", "lower", "upper", "ci_method",
    "undefined_reason", "n", "positives", "negatives",
)  # fmt: skip


def _row(scope: str, by: str, level: str, label: str, metric: str, value: Mapping[str, Any], counts: dict) -> dict:
    """One row from a value as the audit stores it (``Estimate.as_dict`` or ``Undefined.as_dict``)."""
    out: dict[str, Any] = {"scope": scope, "by": by, "level": level, "label": label, "metric": metric, **counts}
    if value.get("value") is not None:
        out.update(value=value["value"], lower=value.get("lower"), upper=value.get("upper"))
        if value.get("lower") is not None:
            out["ci_method"] = value.get("ci_method")
    else:
        out["undefined_reason"] = value.get("undefined")
    return out


def _metric_rows(scope: str, by: str, level: str, m: Mapping[str, Any]) -> list[dict]:
    counts = {"n": m.get("n"), "positives": m.get("positives"), "negatives": m.get("negatives")}
    return [_row(scope, by, level, m.get("label", ""), name, m[name], counts) for name in SCALARS if name in m]


def tidy_rows(result: AuditResult) -> list[dict[str, Any]]:
    return stored_rows(result.as_dict())


def stored_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tidy rows of an audit's results as ``AuditResult.as_dict`` gives them and the database keeps
    them: what ``medcli audit --csv`` writes and the console shows and serves for a stored audit (it
    had rows of its own, a subgroup too small to judge left out, and other columns)."""
    rows: list[dict[str, Any]] = []
    labels = results.get("labels") or []
    for m in labels:
        rows += _metric_rows("overall", "", "", m)
    multiclass = results.get("multiclass")
    if multiclass:
        counts = {"n": multiclass.get("n", max((m.get("n", 0) for m in labels), default=0))}
        for name in ("balanced_accuracy", "f1_macro", "mcc", "kappa"):
            rows.append(_row("multiclass", "", "", "(all classes)", name, multiclass[name], counts))
    for g in results.get("subgroups") or []:
        by, level = str(g.get("by", "")), str(g.get("level", ""))
        if isinstance(g.get("metrics"), dict):
            rows += _metric_rows("subgroup", by, level, {**g["metrics"], "n": g.get("n")})
        else:
            counts = {"n": g.get("n"), "positives": g.get("positives"), "negatives": g.get("negatives")}
            insufficient = g.get("insufficient") or {"value": None, "undefined": "not computed"}
            rows += [_row("subgroup", by, level, g.get("label", ""), name, insufficient, counts) for name in SCALARS]
    compared = str((results.get("parameters") or {}).get("compare"))
    for c in results.get("comparison") or []:
        counts = {"n": c.get("n"), "positives": c.get("positives"), "negatives": c.get("n", 0) - c.get("positives", 0)}
        rows.append(_row("comparison", "model_version", compared, c.get("label", ""), "auc_difference",
                         c["difference"], counts))  # fmt: skip
    for s in (results.get("shift") or {}).get("labels") or []:
        a, b = s.get("a") or {}, s.get("b") or {}
        counts = {"n": a.get("n", 0) + b.get("n", 0), "positives": a.get("positives", 0) + b.get("positives", 0)}
        rows.append(_row("shift", "window", "b-a", s.get("label", ""), "auc_change", s["auc_change"], counts))
    return rows


def csv_text(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    write_named_output(path, csv_text(rows).encode("utf-8"))
