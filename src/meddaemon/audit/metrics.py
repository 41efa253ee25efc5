"""Per-label metrics of a classifier against the truth, each an ``Estimate`` or an ``Undefined``.

Point values equal scikit-learn's where scikit-learn defines them (``tests/audit/test_metrics.py``);
where it returns ``nan``, ``0`` or warns (one class only, no positives, no positive calls, a
constant prediction) the metric here is ``Undefined`` with the reason and the counts.

A call is the model's own (``results.positive``: probability >= threshold, or the argmax for a
multiclass model); operating points are the thresholds at which ``probability >= t`` is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meddaemon.audit.calibration import Calibration, calibration
from meddaemon.audit.delong import auc_interval, delong
from meddaemon.audit.intervals import wilson
from meddaemon.audit.values import Estimate, Undefined, Value

ONE_CLASS = "one class only"


def proportion(successes: int, trials: int, reason: str, counts: dict[str, int]) -> Value:
    """A proportion with its Wilson interval, or ``Undefined(reason)`` when there are no trials."""
    if trials == 0:
        return Undefined(reason, counts)
    lo, hi = wilson(successes, trials)
    return Estimate(successes / trials, float(lo), float(hi), "wilson")


@dataclass(frozen=True)
class Agreement:
    """Whole-confusion-matrix scores (for one label, the 2x2 matrix; for a multiclass task, KxK)."""

    classes: tuple[str, ...]
    confusion: np.ndarray  # rows: truth, columns: call
    balanced_accuracy: Value
    f1_macro: Value
    mcc: Value
    kappa: Value

    def as_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "confusion_matrix": self.confusion.tolist(),
            "balanced_accuracy": self.balanced_accuracy.as_dict(),
            "f1_macro": self.f1_macro.as_dict(),
            "mcc": self.mcc.as_dict(),
            "kappa": self.kappa.as_dict(),
        }


def agreement(confusion: np.ndarray, classes: tuple[str, ...]) -> Agreement:
    """Balanced accuracy, macro-F1, MCC and Cohen's kappa from a confusion matrix (sklearn's formulas)."""
    c = np.asarray(confusion, dtype=np.float64)
    truth = c.sum(axis=1)
    called = c.sum(axis=0)
    n = c.sum()
    counts = {f"truth_{k}": int(t) for k, t in zip(classes, truth, strict=True)}
    counts.update({f"called_{k}": int(p) for k, p in zip(classes, called, strict=True)})
    present = truth > 0
    if present.sum() < 2:
        undefined = Undefined(f"{ONE_CLASS} in the truth", counts)
        return Agreement(classes, confusion.astype(np.int64), undefined, undefined, undefined, undefined)
    diag = np.diag(c)
    balanced = Estimate(float(np.mean(diag[present] / truth[present])))
    seen = present | (called > 0)
    f1 = Estimate(float(np.mean(2 * diag[seen] / (truth[seen] + called[seen]))))
    cov_ytyp = diag.sum() * n - truth @ called
    cov_ypyp = n * n - called @ called
    cov_ytyt = n * n - truth @ truth
    mcc: Value = (
        Undefined("every scan got the same call", counts)
        if cov_ypyp == 0
        else Estimate(float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp)))
    )
    expected = np.outer(truth, called) / n
    off_expected = expected.sum() - np.trace(expected)
    kappa: Value = (
        Undefined("chance agreement is 1", counts)
        if off_expected == 0
        else Estimate(float(1.0 - (c.sum() - diag.sum()) / off_expected))
    )
    return Agreement(classes, confusion.astype(np.int64), balanced, f1, mcc, kappa)


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold chosen on these data, and the sensitivity and specificity it gives."""

    rule: str
    threshold: float
    sensitivity: Value
    specificity: Value

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "threshold": self.threshold,
            "sensitivity": self.sensitivity.as_dict(),
            "specificity": self.specificity.as_dict(),
        }


@dataclass(frozen=True)
class RocCurve:
    """The ROC curve at every distinct threshold (descending), with pointwise Wilson bands on sensitivity."""

    thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    tpr_lower: np.ndarray
    tpr_upper: np.ndarray


@dataclass(frozen=True)
class LabelMetrics:
    """Everything the audit reports for one label (binary, multilabel) or one class (one-vs-rest)."""

    label: str
    n: int
    positives: int
    negatives: int
    threshold: float | None
    prevalence: Value
    auc: Value
    auprc: Value
    sensitivity: Value
    specificity: Value
    ppv: Value
    npv: Value
    confusion: dict[str, int]
    agreement: Agreement
    brier: Value
    ece: Value
    calibration: Calibration | None
    youden: OperatingPoint | Undefined
    at_sensitivity: OperatingPoint | Undefined
    roc: RocCurve | None = field(default=None, repr=False)
    #: The DeLong variance of the AUC (for the unpaired test between time windows).
    auc_variance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def op(x: OperatingPoint | Undefined) -> dict[str, Any]:
            return x.as_dict()

        return {
            "label": self.label,
            "n": self.n,
            "positives": self.positives,
            "negatives": self.negatives,
            "threshold": self.threshold,
            "prevalence": self.prevalence.as_dict(),
            "auc": self.auc.as_dict(),
            "auprc": {**self.auprc.as_dict(), "baseline": self.prevalence.as_dict().get("value")},
            "sensitivity": self.sensitivity.as_dict(),
            "specificity": self.specificity.as_dict(),
            "ppv": self.ppv.as_dict(),
            "npv": self.npv.as_dict(),
            "confusion": dict(self.confusion),
            "balanced_accuracy": self.agreement.balanced_accuracy.as_dict(),
            "f1_macro": self.agreement.f1_macro.as_dict(),
            "mcc": self.agreement.mcc.as_dict(),
            "kappa": self.agreement.kappa.as_dict(),
            "brier": self.brier.as_dict(),
            "ece": self.ece.as_dict(),
            "calibration": self.calibration.as_dict() if self.calibration is not None else None,
            "youden": op(self.youden),
            "at_sensitivity": op(self.at_sensitivity),
        }

    def scalar(self, name: str) -> Value:
        """A named scalar metric (the names ``--require`` and the CSV use)."""
        if name in ("balanced_accuracy", "f1_macro", "mcc", "kappa"):
            value: Value = getattr(self.agreement, name)
            return value
        value = getattr(self, name)
        return value


SCALARS = (
    "auc", "auprc", "sensitivity", "specificity", "ppv", "npv", "prevalence",
    "balanced_accuracy", "f1_macro", "mcc", "kappa", "brier", "ece",
)  # fmt: skip


@dataclass(frozen=True)
class SortedScores:
    """Scores in descending order with the cumulative counts at each distinct threshold."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray


def sorted_scores(y: np.ndarray, p: np.ndarray, order: np.ndarray | None = None) -> SortedScores:
    """``order``: the ascending argsort of ``p`` if the caller has it (ties may be in any order)."""
    if order is None:
        order = np.argsort(p, kind="stable")
    ps = p[order[::-1]]
    ys = y[order[::-1]]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    tps = np.cumsum(ys, dtype=np.int64)[last]
    return SortedScores(thresholds=ps[last], tps=tps, fps=(last + 1) - tps)


def average_precision(s: SortedScores) -> float:
    """Step-wise area under the precision-recall curve (sklearn's ``average_precision_score``)."""
    precision = s.tps / (s.tps + s.fps)
    recall = s.tps / s.tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def label_metrics(
    label: str,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    calls: np.ndarray,
    threshold: float | None,
    at_sensitivity: float = 0.9,
    with_curves: bool = True,
    order: np.ndarray | None = None,
) -> LabelMetrics:
    """The metrics of one label. ``y_true`` 0/1, ``calls`` bool, all of one length (missing truth removed).

    ``order``: the ascending argsort of ``probabilities`` when the caller already has it (subgroups
    take theirs from the whole cohort's sort instead of sorting again).
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probabilities, dtype=np.float64)
    call = np.asarray(calls).astype(bool)
    n = len(y)
    pos = int(y.sum())
    neg = n - pos
    tp = int(np.sum(y & call))
    fp = int(np.sum(~y & call))
    fn = pos - tp
    tn = neg - fp
    confusion = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    counts = {"n": n, "positives": pos, "negatives": neg}
    no_scans = Undefined("no labelled scans", counts)
    if n == 0:
        return LabelMetrics(
            label, 0, 0, 0, threshold, no_scans, no_scans, no_scans, no_scans, no_scans, no_scans, no_scans,
            confusion, agreement(np.zeros((2, 2)), ("negative", "positive")), no_scans, no_scans, None,
            no_scans, no_scans,
        )  # fmt: skip

    prevalence = proportion(pos, n, "no labelled scans", counts)
    sens = proportion(tp, pos, "no positives", counts)
    spec = proportion(tn, neg, "no negatives", counts)
    ppv = proportion(tp, tp + fp, "no positive calls", {**counts, "positive_calls": tp + fp})
    npv = proportion(tn, tn + fn, "no negative calls", {**counts, "negative_calls": tn + fn})
    agree = agreement(np.array([[tn, fp], [fn, tp]]), ("negative", "positive"))
    cal = calibration(y, p)
    brier = Estimate(cal.brier)
    ece = Estimate(cal.ece, method=cal.binning)

    auc: Value
    auprc: Value
    youden: OperatingPoint | Undefined
    at_sens: OperatingPoint | Undefined
    roc = None
    variance = None
    if pos == 0 or neg == 0:
        reason = f"{ONE_CLASS}: no {'positives' if pos == 0 else 'negatives'}"
        auc = Undefined(reason, counts)
        # no negatives: every ranking has precision 1 (scikit-learn's 1.0), a gate any model passes
        auprc = Undefined("no positives" if pos == 0 else reason, counts)
        youden = at_sens = Undefined(reason, counts)
    else:
        if order is None:
            order = np.argsort(p, kind="stable")
        d = delong(y, p, order=order)
        variance = d.variance
        auc = Estimate(d.auc, *auc_interval(d.auc, d.variance, pos, neg))
        s = sorted_scores(y, p, order)
        auprc = Estimate(average_precision(s))
        tpr = s.tps / pos
        fpr = s.fps / neg
        j = int(np.argmax(tpr - fpr))
        youden = _operating_point("youden", s, j, pos, neg, counts)
        reach = np.flatnonzero(tpr >= at_sensitivity)
        at_sens = _operating_point(f"sensitivity>={at_sensitivity:g}", s, int(reach[0]), pos, neg, counts)
        if with_curves:
            lo_t, hi_t = wilson(s.tps, pos)
            roc = RocCurve(
                thresholds=np.r_[np.inf, s.thresholds],
                fpr=np.r_[0.0, fpr],
                tpr=np.r_[0.0, tpr],
                tpr_lower=np.r_[0.0, lo_t],
                tpr_upper=np.r_[wilson(0, pos)[1], hi_t],
            )
    return LabelMetrics(
        label=label, n=n, positives=pos, negatives=neg, threshold=threshold, prevalence=prevalence, auc=auc,
        auprc=auprc, sensitivity=sens, specificity=spec, ppv=ppv, npv=npv, confusion=confusion, agreement=agree,
        brier=brier, ece=ece, calibration=cal, youden=youden, at_sensitivity=at_sens, roc=roc,
        auc_variance=variance,
    )  # fmt: skip


def _operating_point(
    rule: str, s: SortedScores, index: int, pos: int, neg: int, counts: dict[str, int]
) -> OperatingPoint:
    tp = int(s.tps[index])
    tn = neg - int(s.fps[index])
    return OperatingPoint(
        rule=rule,
        threshold=float(s.thresholds[index]),
        sensitivity=proportion(tp, pos, "no positives", counts),
        specificity=proportion(tn, neg, "no negatives", counts),
    )
