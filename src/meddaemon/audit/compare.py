"""Comparisons: two model versions on the same scans (paired DeLong), and two time windows (shift)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
from scipy.stats import norm

from meddaemon.audit.delong import Z95, comparable_variance, paired_test
from meddaemon.audit.join import Cohort
from meddaemon.audit.metrics import LabelMetrics, label_metrics
from meddaemon.audit.predictions import AuditInputError, Predictions
from meddaemon.audit.values import Estimate, Undefined


@dataclass(frozen=True)
class VersionComparison:
    """AUC of the audited version (a) against another (b) on the scans both scored, label by label."""

    label: str
    n: int
    positives: int
    auc_a: float | None
    auc_b: float | None
    difference: Estimate | Undefined
    p_value: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n": self.n,
            "positives": self.positives,
            "auc_a": self.auc_a,
            "auc_b": self.auc_b,
            "difference": self.difference.as_dict(),
            "p_value": self.p_value,
            "test": "paired DeLong, two-sided",
        }


def compare_versions(cohort: Cohort, other: Predictions) -> list[VersionComparison]:
    if other.kind != cohort.kind:
        raise AuditInputError(f"cannot compare a {cohort.kind} model with a {other.kind} one")
    position = {int(s): i for i, s in enumerate(other.scan_ids)}
    both = np.array([i for i, s in enumerate(cohort.scan_ids) if int(s) in position], dtype=np.int64)
    if len(both) == 0:
        raise AuditInputError(f"model version {other.model_version} scored none of the audited scans")
    other_rows = np.array([position[int(s)] for s in cohort.scan_ids[both]], dtype=np.int64)
    out = []
    for j, label in enumerate(cohort.labels):
        if label not in other.labels:
            raise AuditInputError(f"model version {other.model_version} has no label {label!r}")
        k = other.labels.index(label)
        known = cohort.y[both, j] >= 0
        y = cohort.y[both[known], j]
        a = cohort.probabilities[both[known], j]
        b = other.probabilities[other_rows[known], k]
        pos = int(y.sum())
        counts = {"n": len(y), "positives": pos, "negatives": len(y) - pos}
        if pos == 0 or pos == len(y):
            reason = f"one class only: no {'positives' if pos == 0 else 'negatives'}"
            out.append(VersionComparison(label, len(y), pos, None, None, Undefined(reason, counts), None))
            continue
        t = paired_test(y, a, b)
        if np.isnan(t.p_value):  # a variance of 0 gave p 0 and a point interval: certainty from nothing
            if min(pos, len(y) - pos) < 2:
                lone = "positive" if pos < 2 else "negative"
                reason = f"one {lone} only: the DeLong variance of the difference cannot be estimated"
            else:
                reason = "the DeLong variance of the difference is 0 (too few positives or negatives to weigh it)"
            out.append(VersionComparison(label, len(y), pos, t.auc_a, t.auc_b, Undefined(reason, counts), None))
            continue
        diff = Estimate(t.difference, t.lower, t.upper, "paired-delong")
        out.append(VersionComparison(label, len(y), pos, t.auc_a, t.auc_b, diff, t.p_value))
    return out


@dataclass(frozen=True)
class Window:
    start: date
    end: date

    @classmethod
    def parse(cls, text: str) -> Window:
        """``2026-01-01..2026-03-31`` (both days included)."""
        try:
            start, end = (date.fromisoformat(p.strip()) for p in text.split(".."))
        except ValueError:
            raise AuditInputError(f"cannot read window {text!r}; expected YYYY-MM-DD..YYYY-MM-DD") from None
        if end < start:
            raise AuditInputError(f"window {text!r} ends before it starts")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"

    def contains(self, days: np.ndarray) -> np.ndarray:
        return (days >= self.start.isoformat()) & (days <= self.end.isoformat())


@dataclass(frozen=True)
class Shift:
    """One label in window A and window B, and the change in AUC (independent samples)."""

    label: str
    a: LabelMetrics
    b: LabelMetrics
    auc_change: Estimate | Undefined
    p_value: float | None
    #: what the change was tested with: DeLong's variances, or where a window's AUC interval is not
    #: DeLong's own (the count bound, its union with it under 30 cases, or capped), that interval's
    test: str = "unpaired DeLong (independent windows), two-sided"

    def as_dict(self) -> dict[str, Any]:
        def brief(m: LabelMetrics) -> dict[str, Any]:
            return {
                k: v
                for k, v in m.as_dict().items()
                if k in ("n", "positives", "prevalence", "auc", "sensitivity", "specificity", "ece", "brier")
            }

        return {
            "label": self.label,
            "a": brief(self.a),
            "b": brief(self.b),
            "auc_change": self.auc_change.as_dict(),
            "p_value": self.p_value,
            "test": self.test,
        }


def shift(cohort: Cohort, days: np.ndarray, a: Window, b: Window, at_sensitivity: float = 0.9) -> list[Shift]:
    """Metrics in each window (by the scans' registration day) and the AUC change from A to B."""
    in_a, in_b = a.contains(days), b.contains(days)
    out = []
    for j, label in enumerate(cohort.labels):
        parts = []
        for mask in (in_a, in_b):
            rows = np.flatnonzero(mask & (cohort.y[:, j] >= 0))
            parts.append(
                label_metrics(
                    label, cohort.y[rows, j], cohort.probabilities[rows, j], cohort.calls[rows, j],
                    cohort.threshold(j), at_sensitivity=at_sensitivity, with_curves=False,
                )
            )  # fmt: skip
        ma, mb = parts
        change: Estimate | Undefined
        p = None
        test = Shift.test
        if isinstance(ma.auc, Estimate) and isinstance(mb.auc, Estimate):
            assert ma.auc_variance is not None and mb.auc_variance is not None
            d = mb.auc.value - ma.auc.value
            va, a_delong = comparable_variance(ma.auc.value, ma.auc_variance, ma.positives, ma.negatives)
            vb, b_delong = comparable_variance(mb.auc.value, mb.auc_variance, mb.positives, mb.negatives)
            se = float(np.sqrt(va + vb))
            method = "delong-unpaired" if a_delong and b_delong else "interval-unpaired"
            change = Estimate(d, d - Z95 * se, d + Z95 * se, method)
            p = float(2 * norm.sf(abs(d) / se)) if se > 0 else (1.0 if d == 0 else 0.0)
            if method == "interval-unpaired":
                test = (
                    "unpaired z-test (independent windows), two-sided: DeLong's variance where a window's AUC "
                    "interval is DeLong's, else the variance that window's interval implies (few cases)"
                )
        else:
            bad = ma.auc if not isinstance(ma.auc, Estimate) else mb.auc
            assert isinstance(bad, Undefined)
            change = Undefined(f"AUC undefined in a window: {bad.reason}", bad.counts)
        out.append(Shift(label, ma, mb, change, p, test))
    return out
