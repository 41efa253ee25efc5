"""A vectorised, patient-clustered percentile bootstrap of AUC, sensitivity, specificity, PPV and NPV.

A resample draws patients (clusters) with replacement; a scan's weight is how often its patient
was drawn, so all images of a patient go in or out together. Nothing is re-sorted per resample:
the scores are sorted once per label (and subgroup), and each resample's AUC is a weighted
Mann-Whitney sum over that fixed order (cumulative weights of one class, read at the rank
positions of the other), so a resample costs a few O(n) passes over a batch of resamples at once.
Intervals are percentile intervals (2.5th, 97.5th); scipy's ``bootstrap`` default, BCa, costs a
jackknife that is quadratic here. Resamples in which a metric is undefined (no positives drawn)
are left out of its interval and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

STATS = ("auc", "sensitivity", "specificity", "ppv", "npv")


@dataclass(frozen=True)
class Target:
    """One (label, subset of scans) whose metrics are resampled."""

    key: tuple[str, ...]
    y: np.ndarray  # bool, truth
    p: np.ndarray  # probabilities
    call: np.ndarray  # bool, the model's calls
    cluster: np.ndarray  # cluster index of each scan


@dataclass(frozen=True)
class Interval:
    lower: float
    upper: float
    resamples: int
    undefined: int


class _AucKernel:
    """Weighted AUC of one target for a batch of resamples (cluster counts), on a fixed sort order.

    The larger class is "accumulated", the smaller one "read": for each read scan, the weight of
    accumulated scans ranked above it. Cumulative sums are only needed at the read positions, so
    the accumulated scans are summed into the segments between consecutive read positions with a
    sparse (segments x clusters) matrix, and the running sum runs over those segments only.
    """

    def __init__(self, target: Target, n_clusters: int) -> None:
        y, p, cl = target.y, target.p, target.cluster
        self.defined = bool(y.any() and (~y).any())
        if not self.defined:
            return
        self.acc_is_pos = int(y.sum()) >= int((~y).sum())
        acc, rd = (y, ~y) if self.acc_is_pos else (~y, y)
        ranked = np.sort(-p[acc])  # accumulated scores, descending, as ascending negatives
        acc_cluster = cl[acc][np.argsort(-p[acc], kind="stable")]
        read = -p[rd]
        above = np.searchsorted(ranked, read, side="left")  # accumulated scans strictly above
        at = np.searchsorted(ranked, read, side="right")  # ... at or above: ties count half
        self.parts = [self._segments(above, acc_cluster, cl[rd], n_clusters)]
        if np.any(above != at):
            self.parts.append(self._segments(at, acc_cluster, cl[rd], n_clusters))

    @staticmethod
    def _segments(
        k: np.ndarray, acc_cluster: np.ndarray, rd_cluster: np.ndarray, n_clusters: int
    ) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        cuts, segment_of_read = np.unique(k, return_inverse=True)
        segment_of_acc = np.searchsorted(cuts, np.arange(len(acc_cluster)), side="right")
        ones = np.ones(len(acc_cluster), dtype=np.float32)
        acc_m = sp.csr_matrix((ones, (segment_of_acc, acc_cluster)), shape=(len(cuts) + 1, n_clusters))
        ones = np.ones(len(rd_cluster), dtype=np.float32)
        rd_m = sp.csr_matrix((ones, (segment_of_read, rd_cluster)), shape=(len(cuts), n_clusters))
        return acc_m, rd_m

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        batch = counts.shape[1]
        if not self.defined:
            return np.full(batch, np.nan)
        pairs = np.zeros(batch)
        for acc_m, rd_m in self.parts:
            segment_sums = acc_m @ counts
            total_acc = segment_sums.sum(axis=0, dtype=np.float64)
            running = np.cumsum(segment_sums[:-1], axis=0)
            read = rd_m @ counts
            pairs += (read * running).sum(axis=0, dtype=np.float64)
        pairs /= len(self.parts)
        total_rd = read.sum(axis=0, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = pairs / (total_acc * total_rd)
        # accumulated above read: concordant pairs when accumulated = positives, discordant otherwise
        result: np.ndarray = share if self.acc_is_pos else 1.0 - share
        return result


def cluster_counts(n_clusters: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` resamples of clusters with replacement, as (n_clusters, batch) draw counts."""
    draws = rng.integers(0, n_clusters, size=(batch, n_clusters))
    draws += (np.arange(batch) * n_clusters)[:, None]
    counts = np.bincount(draws.ravel(), minlength=batch * n_clusters).reshape(batch, n_clusters)
    return np.ascontiguousarray(counts.T, dtype=np.float32)


def bootstrap(
    targets: list[Target],
    n_clusters: int,
    resamples: int = 2000,
    seed: int = 0,
    batch: int = 64,
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[str, ...], dict[str, Interval]]:
    """Percentile 95% intervals of ``STATS`` for every target from the same ``resamples`` draws."""
    rng = np.random.default_rng(seed)
    kernels = [_AucKernel(t, n_clusters) for t in targets]
    # every target's per-cluster counts side by side: one matrix product per batch gives them all
    columns = np.concatenate([_cluster_sums(t, n_clusters) for t in targets], axis=1)
    draws: dict[str, list[np.ndarray]] = {f"{i}:{s}": [] for i in range(len(targets)) for s in STATS}
    for size in _batches(resamples, batch):
        counts = cluster_counts(n_clusters, size, rng)
        tallies = (columns.T @ counts).astype(np.float64)
        for i, kernel in enumerate(kernels):
            draws[f"{i}:auc"].append(kernel(counts))
            tp, pos, called, n = tallies[4 * i : 4 * i + 4]
            tn = n - pos - called + tp
            with np.errstate(divide="ignore", invalid="ignore"):
                draws[f"{i}:sensitivity"].append(tp / pos)
                draws[f"{i}:specificity"].append(tn / (n - pos))
                draws[f"{i}:ppv"].append(tp / called)
                draws[f"{i}:npv"].append(tn / (n - called))
        if progress:
            progress(size)
    out: dict[tuple[str, ...], dict[str, Interval]] = {}
    for i, target in enumerate(targets):
        out[target.key] = {s: _percentile(np.concatenate(draws[f"{i}:{s}"])) for s in STATS}
    return out


def _cluster_sums(t: Target, n_clusters: int) -> np.ndarray:
    """Per cluster: true positives, positives, positive calls, scans (a resample's counts are one matmul)."""
    columns = (t.y & t.call, t.y, t.call, np.ones_like(t.y))
    return np.stack([np.bincount(t.cluster, weights=c, minlength=n_clusters) for c in columns], axis=1).astype(
        np.float32
    )


def _batches(total: int, batch: int) -> Iterator[int]:
    done = 0
    while done < total:
        size = min(batch, total - done)
        yield size
        done += size


def _percentile(values: np.ndarray) -> Interval:
    finite = values[np.isfinite(values)]
    undefined = len(values) - len(finite)
    if len(finite) == 0:
        return Interval(float("nan"), float("nan"), len(values), undefined)
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return Interval(float(lo), float(hi), len(values), undefined)
