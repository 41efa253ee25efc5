"""``--require "auc>=0.90,sensitivity[Effusion]>=0.85"``: pass/fail criteria on the interval bounds.

A lower limit (``>=``, ``>``) must hold for the lower 95% bound, an upper limit (``<=``, ``<``,
e.g. ``prevalence<=0.2``) for the upper bound: a criterion passes only when the data are convincing.
A metric without an interval (AUPRC, macro-F1, MCC, kappa, Brier, ECE: none gets one, with or
without ``--bootstrap``) is judged on its point value (``ece<=0.05``: the ECE itself), and says so.
An interval never degenerates to a point where the counts are few (a proportion's is at least its
Wilson interval, an AUC at 1 gets the count bound of ``delong.py``). An undefined metric fails.
Without ``[label]`` a criterion applies to every reported label.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meddaemon.audit.metrics import SCALARS, LabelMetrics
from meddaemon.audit.values import Estimate

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_CRITERION = re.compile(r"^\s*([a-z_]+)\s*(?:\[([^\]]+)\])?\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*$")


class CriteriaError(ValueError):
    pass


@dataclass(frozen=True)
class Criterion:
    metric: str
    label: str | None
    op: str
    limit: float

    def __str__(self) -> str:
        return f"{self.metric}{f'[{self.label}]' if self.label else ''}{self.op}{self.limit:g}"


@dataclass(frozen=True)
class Verdict:
    criterion: Criterion
    label: str
    passed: bool
    judged: float | None
    basis: str  # "lower 95% bound", "upper 95% bound", "point value (no interval)", or why undefined

    def as_dict(self) -> dict[str, Any]:
        return {
            "criterion": str(self.criterion),
            "label": self.label,
            "passed": self.passed,
            "judged_value": self.judged,
            "basis": self.basis,
        }


def parse_criteria(text: str, labels: tuple[str, ...] | None = None) -> list[Criterion]:
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _CRITERION.match(part)
        if not match:
            raise CriteriaError(f"cannot read criterion {part.strip()!r}; expected e.g. 'auc>=0.9' or 'ppv[covid]>0.5'")
        metric, label, op, limit = match.groups()
        if metric not in SCALARS:
            raise CriteriaError(f"unknown metric {metric!r} in {part.strip()!r}; known: {', '.join(SCALARS)}")
        if labels is not None and label is not None and label not in labels:
            label = _spelled_as_reported(label, labels, part.strip())
        out.append(Criterion(metric, label, op, float(limit)))
    if not out:
        raise CriteriaError("--require is empty")
    return out


def _spelled_as_reported(label: str, labels: tuple[str, ...], criterion: str) -> str:
    """The reported label ``label`` names in another case (``effusion`` for ``Effusion``), as a
    labels file's labels are read in any case; an unknown label otherwise."""
    same = [known for known in labels if known.casefold() == label.casefold()]
    if len(same) != 1:
        raise CriteriaError(f"unknown label {label!r} in {criterion!r}; reported labels: {', '.join(labels)}")
    return same[0]


def evaluate(criteria: list[Criterion], metrics: list[LabelMetrics]) -> list[Verdict]:
    verdicts = []
    for c in criteria:
        for m in metrics:
            if c.label is not None and m.label != c.label:
                continue
            value = m.scalar(c.metric)
            if not isinstance(value, Estimate):
                verdicts.append(Verdict(c, m.label, False, None, str(value)))
                continue
            lower_limit = c.op in (">=", ">")
            if value.has_interval:
                judged = value.lower if lower_limit else value.upper
                basis = "lower 95% bound" if lower_limit else "upper 95% bound"
            else:
                judged, basis = value.value, "point value (no interval)"
            assert judged is not None
            verdicts.append(Verdict(c, m.label, _OPS[c.op](judged, c.limit), judged, basis))
    return verdicts
