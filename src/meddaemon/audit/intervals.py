"""Wilson score intervals for proportions (sensitivity, specificity, PPV, NPV, observed rates).

The same formula as statsmodels' ``proportion_confint(method="wilson")`` (not its default,
Wald, which collapses to a zero-width interval at 0% and 100%), vectorised over arrays of counts.
"""

from __future__ import annotations

import numpy as np

from meddaemon.audit.delong import Z95


def wilson(successes: np.ndarray | int, trials: np.ndarray | int, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper 95% Wilson bounds; ``nan`` where ``trials`` is 0 (callers report that as undefined).
    At 0 and n successes out of n the bounds are 0 and 1 exactly, and never beyond [0, 1] by a rounding
    error (``1.0000000000000002`` at 40 of 40, which ``--json`` printed and ``--require`` judged)."""
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = x / n
        z2 = z * z
        denom = 1.0 + z2 / n
        centre = (q + z2 / (2.0 * n)) / denom
        half = z * np.sqrt(q * (1.0 - q) / n + z2 / (4.0 * n * n)) / denom
    lower = np.where((x == 0) & (n > 0), 0.0, np.clip(centre - half, 0.0, 1.0))
    upper = np.where((x == n) & (n > 0), 1.0, np.clip(centre + half, 0.0, 1.0))
    return lower, upper
