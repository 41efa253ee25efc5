"""Calibration: the reliability diagram, the expected calibration error (ECE) and the Brier score.

Binning is stated, not implied: ``BINS`` equal-width bins on [0, 1] (bin i holds probabilities in
[i/10, (i+1)/10), the last bin also holds 1.0). scikit-learn's ``calibration_curve`` defaults to 5
bins and drops empty ones; here every bin is listed, with its count, so an empty one is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meddaemon.audit.intervals import wilson

BINS = 10
BINNING = f"{BINS} equal-width bins on [0, 1]"


@dataclass(frozen=True)
class Calibration:
    binning: str
    edges: np.ndarray
    counts: np.ndarray
    mean_predicted: np.ndarray
    observed: np.ndarray
    observed_lower: np.ndarray
    observed_upper: np.ndarray
    ece: float
    brier: float

    def as_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> list[float | None]:
            return [None if not np.isfinite(v) else float(v) for v in a]

        return {
            "binning": self.binning,
            "ece": self.ece,
            "brier": self.brier,
            "bins": [
                {"from": float(lo), "to": float(hi), "n": int(n), "mean_predicted": mp, "observed": ob,
                 "observed_lower": ol, "observed_upper": ou}
                for lo, hi, n, mp, ob, ol, ou in zip(
                    self.edges[:-1], self.edges[1:], self.counts, clean(self.mean_predicted), clean(self.observed),
                    clean(self.observed_lower), clean(self.observed_upper), strict=True,
                )
            ],
        }  # fmt: skip


def bin_index(probabilities: np.ndarray, bins: int = BINS) -> np.ndarray:
    return np.minimum((np.asarray(probabilities) * bins).astype(np.int64), bins - 1)


def calibration(y_true: np.ndarray, probabilities: np.ndarray, bins: int = BINS) -> Calibration:
    """Reliability per bin (empty bins have ``nan`` means and count 0), ECE and Brier; needs n > 0."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    idx = bin_index(p, bins)
    counts = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = sum_p / counts
        observed = sum_y / counts
    lower, upper = wilson(sum_y, counts)
    filled = counts > 0
    ece = float(np.sum(np.abs(observed[filled] - mean_p[filled]) * counts[filled]) / len(p))
    return Calibration(
        binning=BINNING if bins == BINS else f"{bins} equal-width bins on [0, 1]",
        edges=np.linspace(0.0, 1.0, bins + 1),
        counts=counts,
        mean_predicted=mean_p,
        observed=observed,
        observed_lower=lower,
        observed_upper=upper,
        ece=ece,
        brier=float(np.mean((p - y) ** 2)),
    )
