"""Point metrics equal scikit-learn's; where scikit-learn returns nan or 0, the audit says why."""

import warnings

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    roc_auc_score,
    roc_curve,
)

from meddaemon.audit.metrics import agreement, label_metrics
from meddaemon.audit.values import Estimate, Undefined


def binary_case(seed, n=800, prevalence=0.3, rounding=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * y - 1))))
    if rounding is not None:
        p = np.round(p, rounding)
    return y, p, p >= 0.5


@pytest.mark.parametrize(("seed", "rounding"), [(0, None), (1, 2), (2, 1)])
def test_every_point_metric_equals_scikit_learn(seed, rounding):
    y, p, call = binary_case(seed, rounding=rounding)
    m = label_metrics("finding", y, p, call, 0.5)
    assert m.auc.value == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m.auprc.value == pytest.approx(average_precision_score(y, p), abs=1e-12)
    tn, fp, fn, tp = confusion_matrix(y, call).ravel()
    assert m.confusion == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    assert m.sensitivity.value == pytest.approx(tp / (tp + fn))
    assert m.specificity.value == pytest.approx(tn / (tn + fp))
    assert m.ppv.value == pytest.approx(tp / (tp + fp))
    assert m.npv.value == pytest.approx(tn / (tn + fn))
    assert m.agreement.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(y, call), abs=1e-12)
    assert m.agreement.f1_macro.value == pytest.approx(f1_score(y, call, average="macro"), abs=1e-12)
    assert m.agreement.mcc.value == pytest.approx(matthews_corrcoef(y, call), abs=1e-12)
    assert m.agreement.kappa.value == pytest.approx(cohen_kappa_score(y, call), abs=1e-12)
    assert m.brier.value == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert m.prevalence.value == pytest.approx(y.mean())


def test_intervals_are_stated_and_contain_the_estimate():
    y, p, call = binary_case(3)
    m = label_metrics("finding", y, p, call, 0.5)
    assert m.auc.method == "delong-logit"
    for value in (m.auc, m.sensitivity, m.specificity, m.ppv, m.npv):
        assert value.method in ("delong-logit", "wilson")
        assert 0 <= value.lower <= value.value <= value.upper <= 1


def test_multiclass_agreement_equals_scikit_learn():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 3, 500)
    called = np.where(rng.random(500) < 0.7, truth, rng.integers(0, 3, 500))
    c = confusion_matrix(truth, called, labels=[0, 1, 2])
    a = agreement(c, ("benign", "malignant", "normal"))
    assert a.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(truth, called), abs=1e-12)
    assert a.f1_macro.value == pytest.approx(f1_score(truth, called, average="macro"), abs=1e-12)
    assert a.mcc.value == pytest.approx(matthews_corrcoef(truth, called), abs=1e-12)
    assert a.kappa.value == pytest.approx(cohen_kappa_score(truth, called), abs=1e-12)


def test_multiclass_macro_f1_with_a_class_never_called_equals_scikit_learn():
    truth = np.array([0, 0, 1, 1, 2, 2, 2])
    called = np.array([0, 1, 1, 0, 0, 1, 0])
    a = agreement(confusion_matrix(truth, called, labels=[0, 1, 2]), ("a", "b", "c"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert a.f1_macro.value == pytest.approx(f1_score(truth, called, average="macro", zero_division=0))


def test_one_class_only_is_undefined_with_counts_where_scikit_learn_gives_nan():
    y = np.zeros(50, dtype=int)
    p = np.linspace(0, 1, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(roc_auc_score(y, p))
    m = label_metrics("finding", y, p, p >= 0.5, 0.5)
    assert isinstance(m.auc, Undefined)
    assert m.auc.reason == "one class only: no positives"
    assert m.auc.counts == {"n": 50, "positives": 0, "negatives": 50}
    assert isinstance(m.sensitivity, Undefined) and m.sensitivity.reason == "no positives"
    assert isinstance(m.specificity, Estimate)
    assert isinstance(m.youden, Undefined)
    for name in ("balanced_accuracy", "f1_macro", "mcc", "kappa"):
        assert isinstance(m.scalar(name), Undefined)
        assert "one class only" in m.scalar(name).reason


def test_no_positives_gives_undefined_auprc_where_scikit_learn_gives_zero():
    y = np.zeros(20, dtype=int)
    p = np.linspace(0, 1, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert average_precision_score(y, p) == 0
    m = label_metrics("finding", y, p, p >= 0.5, 0.5)
    assert isinstance(m.auprc, Undefined) and m.auprc.reason == "no positives"


def test_no_negatives_gives_undefined_auprc_where_scikit_learn_gives_one_that_any_model_earns():
    """1.000 passed ``--require auprc>=0.95`` on a cohort that cannot test discrimination, beside an
    AUC, a specificity and an MCC each undefined for the one class."""
    y = np.ones(20, dtype=int)
    p = np.random.default_rng(0).random(20)  # SYNTHETIC scores, a random model's
    assert average_precision_score(y, p) == pytest.approx(1)
    m = label_metrics("finding", y, p, p >= 0.5, 0.5)
    assert isinstance(m.auprc, Undefined) and m.auprc.reason == "one class only: no negatives"
    assert m.auprc.counts == {"n": 20, "positives": 20, "negatives": 0}


def test_a_constant_call_gives_undefined_mcc_and_ppv_where_scikit_learn_gives_zero():
    y, p, _ = binary_case(6, n=200)
    never = np.zeros(200, dtype=bool)
    assert matthews_corrcoef(y, never) == 0.0
    m = label_metrics("finding", y, p, never, 0.99)
    assert isinstance(m.agreement.mcc, Undefined) and m.agreement.mcc.reason == "every scan got the same call"
    assert isinstance(m.ppv, Undefined) and m.ppv.reason == "no positive calls"
    assert m.ppv.counts["positive_calls"] == 0
    assert isinstance(m.npv, Estimate)


def test_no_scans_is_undefined_everywhere():
    m = label_metrics("finding", np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool), 0.5)
    assert all(isinstance(m.scalar(k), Undefined) for k in ("auc", "sensitivity", "brier", "ece", "mcc"))


def test_calibration_bins_are_ten_equal_width_and_match_scikit_learn_on_filled_bins():
    y, p, call = binary_case(8, n=2000)
    m = label_metrics("finding", y, p, call, 0.5)
    cal = m.calibration
    assert cal.binning == "10 equal-width bins on [0, 1]"
    assert len(cal.counts) == 10 and cal.counts.sum() == 2000
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    filled = cal.counts > 0
    np.testing.assert_allclose(cal.observed[filled], observed, atol=1e-12)
    np.testing.assert_allclose(cal.mean_predicted[filled], predicted, atol=1e-12)
    expected_ece = np.sum(cal.counts[filled] / 2000 * np.abs(observed - predicted))
    assert m.ece.value == pytest.approx(expected_ece, abs=1e-12)
    assert m.ece.method == "10 equal-width bins on [0, 1]"


def test_operating_points_match_the_roc_curve():
    y, p, call = binary_case(9, n=1000, rounding=3)
    m = label_metrics("finding", y, p, call, 0.5, at_sensitivity=0.9)
    fpr, tpr, thr = roc_curve(y, p)
    j = np.argmax(tpr - fpr)
    assert m.youden.threshold == pytest.approx(thr[j])
    assert m.youden.sensitivity.value == pytest.approx(tpr[j])
    assert m.youden.specificity.value == pytest.approx(1 - fpr[j])
    k = np.flatnonzero(tpr >= 0.9)[0]
    assert m.at_sensitivity.threshold == pytest.approx(thr[k])
    assert m.at_sensitivity.sensitivity.value >= 0.9
    assert m.at_sensitivity.specificity.value == pytest.approx(1 - fpr[k])
    calls = p >= m.at_sensitivity.threshold
    assert m.at_sensitivity.sensitivity.value == pytest.approx(calls[y == 1].mean())
