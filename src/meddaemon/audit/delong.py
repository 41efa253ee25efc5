"""ROC AUC with its DeLong variance, O(n log n): the fast algorithm of Sun & Xu (2014).

DeLong's placement values come from one sort and the counts of each tie group (what Sun & Xu's
three midrank vectors encode) instead of the O(m*n) pairwise kernel; the AUC equals the
Mann-Whitney statistic (and scikit-learn's ``roc_auc_score``). The 95% interval is built on the logit scale
and transformed back, so it stays inside [0, 1] and is asymmetric near the edges.

Where that interval degenerates (an AUC of exactly 0 or 1, where the DeLong variance is 0 and the
logit is infinite, or a variance of 0 from ties) the interval comes from the counts instead:
``count_interval``, a Clopper-Pearson interval that treats the AUC as a proportion of
k = min(positives, negatives) trials. Two facts make that conservative: the variance of the AUC is
at most AUC(1 - AUC)/k (van Dantzig's bound on the Mann-Whitney statistic), and at AUC 1 its lower
bound (0.025 ** (1/k)) is exact: k disjoint positive-negative pairs are each concordant with
probability AUC, independently, so all m*n pairs are concordant with probability at most AUC ** k.
Two positives with AUC 1 thus get [0.158, 1]; 2,000 positives and negatives get [0.998, 1].

Where the smaller class has fewer than ``SMALL_CLASS`` cases the interval is the union of the two:
DeLong's asymptotics under-cover there (about 70 % of 95 % intervals held the true AUC with 3
positives, 82 % with 10). With more, DeLong's lower bound is capped at the count bound of an AUC
of 1, 0.025 ** (1/k) (its upper bound, near 0, at the mirror image): an AUC of 0.999 is never surer
than one of 1. Without the cap 30 positives and 30 negatives at AUC 0.996 got 0.962-0.999 and at
AUC 1 0.884-1, and ``--require "auc>=0.9"`` passed the worse model and failed the perfect one. The
cap binds only above an AUC of 1 - 3.69/k (0.025 ** (1/k) >= 1 - 3.69/k), where fewer than four
of k disjoint pairs are expected to be discordant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit
from scipy.stats import beta, norm

Z95 = float(norm.ppf(0.975))
DELONG_LOGIT = "delong-logit"
COUNT_BOUND = "clopper-pearson of auc*k in k = min(positives, negatives)"
UNION = "union of delong-logit and clopper-pearson (smaller class under 30)"
CAPPED = "delong-logit, capped at the clopper-pearson bound of an auc of 1 (or 0)"
#: below this many cases in the smaller class the DeLong interval is joined by the count interval
SMALL_CLASS = 30


@dataclass(frozen=True)
class DeLong:
    """AUCs of one or more score vectors on the same cases, and the covariance of those AUCs."""

    aucs: np.ndarray
    covariance: np.ndarray
    positives: int
    negatives: int

    @property
    def auc(self) -> float:
        return float(self.aucs[0])

    @property
    def variance(self) -> float:
        return float(self.covariance[0, 0])


def placements(y_true: np.ndarray, scores: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """DeLong's placement values in the original order: for a positive, the share of negatives it
    outranks (ties count half), V10; for a negative, the share of positives that outrank it, V01.

    One sort (``order``: the ascending argsort of ``scores``, if the caller has it) and tie-group
    counts replace the three midrank vectors of Sun & Xu; the values are the same.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if order is None:
        order = np.argsort(s, kind="stable")
    ys = y[order]
    ss = s[order]
    m = int(ys.sum())
    n = len(ys) - m
    group = np.concatenate(([0], np.cumsum(ss[1:] != ss[:-1])))
    pos_in = np.bincount(group, weights=ys)
    neg_in = np.bincount(group, weights=~ys)
    neg_below = np.cumsum(neg_in) - neg_in
    pos_above = m - np.cumsum(pos_in)
    v10 = (neg_below + 0.5 * neg_in) / n
    v01 = (pos_above + 0.5 * pos_in) / m
    sorted_values = np.where(ys, v10[group], v01[group])
    out = np.empty_like(sorted_values)
    out[order] = sorted_values
    return out


def delong(y_true: np.ndarray, *scores: np.ndarray, order: np.ndarray | None = None) -> DeLong:
    """DeLong AUCs and covariance of ``scores`` (each of the shape of ``y_true``, 1 = positive).

    Needs at least one positive and one negative; the caller reports the undefined case.
    ``order`` (one score only): its ascending argsort, when the caller already sorted it.
    """
    y = np.asarray(y_true).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError(f"DeLong needs both classes (positives={m}, negatives={n})")
    values = np.stack([placements(y, s, order if len(scores) == 1 else None) for s in scores])
    v10, v01 = values[:, y], values[:, ~y]
    aucs = v10.mean(axis=1)
    if len(scores) == 1:
        s10 = np.array([[np.var(v10[0], ddof=1) if m > 1 else 0.0]])
        s01 = np.array([[np.var(v01[0], ddof=1) if n > 1 else 0.0]])
    else:
        s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(scores),) * 2)
        s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(scores),) * 2)
    return DeLong(aucs=aucs, covariance=s10 / m + s01 / n, positives=m, negatives=n)


def auc_interval(
    auc: float, variance: float, positives: int, negatives: int, z: float = Z95
) -> tuple[float, float, str]:
    """The 95% interval of an AUC and the method that gave it: the logit-scale DeLong interval,
    ``count_interval`` where that degenerates (variance 0, or an AUC of 0 or 1), the union of both
    where the smaller class has fewer than ``SMALL_CLASS`` cases, and otherwise DeLong's held no
    surer than an AUC of 1 (or 0) would be."""
    k = min(positives, negatives)
    lower, upper = count_interval(auc, k, z)
    if not (variance > 0.0 and 0.0 < auc < 1.0):
        return lower, upper, COUNT_BOUND
    se_logit = np.sqrt(variance) / (auc * (1.0 - auc))
    centre = logit(auc)
    d_lower, d_upper = float(expit(centre - z * se_logit)), float(expit(centre + z * se_logit))
    if k < SMALL_CLASS:
        return min(lower, d_lower), max(upper, d_upper), UNION
    perfect_lower = count_interval(1.0, k, z)[0]
    if d_lower > perfect_lower or d_upper < 1.0 - perfect_lower:
        return min(d_lower, perfect_lower), max(d_upper, 1.0 - perfect_lower), CAPPED
    return d_lower, d_upper, DELONG_LOGIT


def comparable_variance(auc: float, variance: float, positives: int, negatives: int) -> tuple[float, bool]:
    """The variance a comparison of this AUC with another may use, and whether it is DeLong's:
    DeLong's where its own interval is DeLong's, else the one its reported interval implies (its
    width over 2 z, squared, when larger). A window at AUC 1 has a DeLong variance of 0: its change
    to another window was called certain (p 1e-22) although its own interval, 0.158-1, held the other's."""
    lower, upper, method = auc_interval(auc, variance, positives, negatives)
    if method == DELONG_LOGIT:
        return variance, True
    implied = ((upper - lower) / (2 * Z95)) ** 2
    return max(variance, implied), implied <= variance


def count_interval(auc: float, k: int, z: float = Z95) -> tuple[float, float]:
    """Clopper-Pearson interval of ``auc * k`` successes in ``k`` trials (not necessarily a whole number)."""
    tail = float(norm.sf(z))
    x = auc * k
    lower = 0.0 if x <= 0.0 else float(beta.ppf(tail, x, k - x + 1.0))
    upper = 1.0 if x >= k else float(beta.ppf(1.0 - tail, x + 1.0, k - x))
    return lower, upper


@dataclass(frozen=True)
class PairedTest:
    """DeLong's test that two correlated AUCs (same cases, two models) are equal."""

    auc_a: float
    auc_b: float
    difference: float
    lower: float
    upper: float
    z: float
    p_value: float


def paired_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> PairedTest:
    """Two-sided p-value and 95% interval of AUC(a) - AUC(b) from the DeLong covariance.

    No p-value (NaN) where the data cannot weigh the difference: a variance of 0 with a difference,
    or a lone positive or negative, whose class's share of the variance cannot be estimated (it was
    taken as 0: 1 positive and 20 negatives, AUC 1 against 0.5, gave p 1e-5), unless both place
    every case alike."""
    result = delong(y_true, scores_a, scores_b)
    a, b = result.aucs
    cov = result.covariance
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(a - b)
    if min(result.positives, result.negatives) < 2 and not np.array_equal(
        placements(y_true, scores_a), placements(y_true, scores_b)
    ):
        return PairedTest(float(a), float(b), diff, np.nan, np.nan, np.nan, np.nan)
    if var <= 0.0:  # identical placements: no difference (p 1), or none the data can weigh (undefined)
        if diff == 0:
            return PairedTest(float(a), float(b), diff, diff, diff, 0.0, 1.0)
        return PairedTest(float(a), float(b), diff, np.nan, np.nan, np.nan, np.nan)
    se = np.sqrt(var)
    z = diff / se
    return PairedTest(
        auc_a=float(a),
        auc_b=float(b),
        difference=diff,
        lower=diff - Z95 * se,
        upper=diff + Z95 * se,
        z=float(z),
        p_value=float(2.0 * norm.sf(abs(z))),
    )
