"""The values an audit reports: an estimate with its interval, or a reason it is undefined.

Every metric is one of these, never a bare ``nan`` or a silent ``0``: a reader of the JSON, the CSV
or the PDF sees why a number is missing and the counts behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Undefined:
    """A metric that has no value on these data, with the reason and the counts that show it."""

    reason: str
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"value": None, "undefined": self.reason, "counts": dict(self.counts)}

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"undefined ({self.reason}{'; ' + counts if counts else ''})"


@dataclass(frozen=True)
class Estimate:
    """A point value, with a 95% interval when one was computed and the method that gave it.

    Without an interval, ``method`` says how the point was computed (ECE: its binning), not an interval.
    """

    value: float
    lower: float | None = None
    upper: float | None = None
    method: str = ""

    @property
    def has_interval(self) -> bool:
        return self.lower is not None and self.upper is not None

    def with_interval(self, lower: float, upper: float, method: str) -> Estimate:
        return Estimate(self.value, lower, upper, method)

    def as_dict(self) -> dict[str, Any]:
        """With an interval: its bounds and ``ci_method``; without: ``null`` bounds and ``ci_method``,
        and ``method`` for how the point was computed (ECE: its binning)."""
        if self.has_interval:
            return {"value": self.value, "lower": self.lower, "upper": self.upper, "ci_method": self.method}
        out: dict[str, Any] = {"value": self.value, "lower": None, "upper": None, "ci_method": None}
        if self.method:
            out["method"] = self.method
        return out

    def __str__(self) -> str:
        if self.has_interval:
            return f"{self.value:.3f} ({self.lower:.3f}-{self.upper:.3f})"
        return f"{self.value:.3f}"


Value = Estimate | Undefined
