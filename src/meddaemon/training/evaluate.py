"""After training: thresholds chosen on the validation set, test-set metrics with scikit-learn, and
flags for results that should not be trusted (a model that collapsed to one class, a test score
too good for the size of the test set)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

#: Below this many test images a perfect score is more likely luck or a leak than skill.
SMALL_TEST_SET = 200
IMPLAUSIBLE_ACCURACY = 0.99
#: flags that keep a version from being promoted unless the user insists (``medcli retrain --force``)
BLOCKING_FLAGS = ("COLLAPSE", "IMPLAUSIBLE")


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (0.5 when both classes are not present)."""
    if len(truth) == 0 or truth.min() == truth.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))


def choose_thresholds(
    kind: str, labels: Sequence[str], probs: np.ndarray, truth: np.ndarray
) -> dict[str, float] | None:
    """Per label on the validation set: Youden's J for binary (the positive class) and multilabel;
    None for multiclass, which calls the top class (argmax)."""
    if kind == "multiclass":
        return None
    if kind == "binary":
        t = youden_threshold(truth[:, 1], probs[:, 1])
        return {labels[0]: 1.0 - t, labels[1]: t}
    return {label: youden_threshold(truth[:, j], probs[:, j]) for j, label in enumerate(labels)}


def predictions(kind: str, probs: np.ndarray, thresholds: dict[str, float] | None, labels: Sequence[str]) -> np.ndarray:
    """(N, L) 0/1 calls as the daemon makes them: argmax for multiclass, thresholds otherwise."""
    if kind == "multiclass" or thresholds is None:
        calls = np.zeros_like(probs, dtype=np.int64)
        if len(probs):
            calls[np.arange(len(probs)), probs.argmax(axis=1)] = 1
        return calls
    if kind == "binary":
        positive = (probs[:, 1] >= thresholds[labels[1]]).astype(np.int64)
        return np.stack([1 - positive, positive], axis=1)
    limits = np.array([thresholds[label] for label in labels])
    return (probs >= limits).astype(np.int64)


def score_test_set(
    kind: str, labels: Sequence[str], probs: np.ndarray, truth: np.ndarray, thresholds: dict[str, float] | None
) -> dict[str, Any]:
    """Accuracy, per-label precision/recall/F1/ROC-AUC, macro ROC-AUC and the confusion matrix."""
    calls = predictions(kind, probs, thresholds, labels)
    per_label: dict[str, dict[str, float | int | None]] = {}
    if kind == "multilabel":
        accuracy = float((calls == truth).all(axis=1).mean()) if len(truth) else float("nan")
        precision, recall, f1, support = precision_recall_fscore_support(truth, calls, zero_division=0)
        matrix: Any = multilabel_confusion_matrix(truth, calls).tolist()
    else:
        y_true, y_pred = truth.argmax(axis=1), calls.argmax(axis=1)
        accuracy = float(accuracy_score(y_true, y_pred)) if len(truth) else float("nan")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(len(labels))), zero_division=0
        )
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels)))).tolist()
    aucs: list[float] = []
    for j, label in enumerate(labels):
        present = 0 < truth[:, j].sum() < len(truth)
        auc = float(roc_auc_score(truth[:, j], probs[:, j])) if present else None
        if auc is not None and (kind != "binary" or j == 1):
            aucs.append(auc)
        per_label[label] = {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
            "roc_auc": auc,
        }
    return {
        "n": len(truth),
        "accuracy": _finite_or_none(accuracy),
        "roc_auc": _finite_or_none(float(np.mean(aucs)) if aucs else float("nan")),
        "per_label": per_label,
        "confusion_matrix": matrix,
    }


def flags_for(
    kind: str,
    labels: Sequence[str],
    val_probs: np.ndarray,
    val_truth: np.ndarray,
    thresholds: dict[str, float] | None,
    test: dict[str, Any],
) -> list[str]:
    """Warnings that make the result untrustworthy, each a sentence."""
    flags: list[str] = []
    calls = predictions(kind, val_probs, thresholds, labels)
    if len(calls) and kind != "multilabel":
        predicted = set(calls.argmax(axis=1).tolist())
        present = set(val_truth.argmax(axis=1).tolist())
        if len(predicted) == 1 and len(present) > 1:
            only = labels[predicted.pop()]
            flags.append(
                f"COLLAPSE: the model predicts {only!r} for every validation image; it has learnt nothing useful"
            )
        elif never := sorted(present - predicted):
            names = ", ".join(repr(labels[j]) for j in never)
            flags.append(
                f"NEVER CALLED: {names} present in validation but never the model's call; its images all go "
                "to other classes"
            )
    elif len(calls):
        constant = [labels[j] for j in range(len(labels)) if calls[:, j].min() == calls[:, j].max()]
        if len(constant) == len(labels):
            flags.append("COLLAPSE: every label gets the same call on every validation image")
    if len(val_probs) > 1 and float(np.ptp(val_probs, axis=0).max()) < 1e-3:
        flags.append("COLLAPSE: the model gives (nearly) the same probabilities for every validation image")
    if not any(flag.startswith("COLLAPSE") for flag in flags) and (only := _only_test_call(kind, labels, test)):
        auc = test.get("roc_auc")
        ranking = f" (its test ROC-AUC {auc:.3f}: the ranking may hold)" if auc is not None else ""
        flags.append(
            f"ONE CALL ON TEST: the model calls {only!r} for every test image{ranking}; at its thresholds it tells "
            "the test set's classes apart not at all: check the thresholds, and the test set against validation"
        )
    n = test["n"]
    if n < SMALL_TEST_SET:
        if test["roc_auc"] is not None and test["roc_auc"] >= 1.0:
            flags.append(
                f"IMPLAUSIBLE: test ROC-AUC is 1.0 on only {n} test images; suspect a leak or data too easy "
                "(synthetic?) before trusting it"
            )
        elif test["accuracy"] is not None and test["accuracy"] >= IMPLAUSIBLE_ACCURACY:
            flags.append(
                f"IMPLAUSIBLE: test accuracy {test['accuracy']:.3f} on only {n} test images; suspect a leak or "
                "data too easy before trusting it"
            )
    return flags


def _only_test_call(kind: str, labels: Sequence[str], test: dict[str, Any]) -> str | None:
    """The one class a single-label model called for every test image of several classes, if it did
    (read from the test set's confusion matrix: a model varied on validation may not be on test)."""
    matrix = test.get("confusion_matrix")
    if kind == "multilabel" or not matrix:
        return None
    called = [j for j in range(len(labels)) if any(row[j] for row in matrix)]
    present = [i for i, row in enumerate(matrix) if any(row)]
    return labels[called[0]] if len(called) == 1 and len(present) > 1 else None


def promotion_blockers(flags: Sequence[str]) -> list[str]:
    """The flags among ``flags`` (as :func:`flags_for` words them) that make promoting the model unsafe."""
    return [flag for flag in flags if flag.split(":", 1)[0] in BLOCKING_FLAGS]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
