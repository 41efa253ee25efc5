"""Fast DeLong equals the O(m*n) definition, scikit-learn's AUC and confidenceinterval's variance."""

import numpy as np
import pytest
from confidenceinterval.delong import delong_roc_variance
from sklearn.metrics import roc_auc_score

from meddaemon.audit.delong import auc_interval, delong, paired_test


def brute_force_delong(y, *scores):
    """DeLong (1988) straight from the definition: the pairwise kernel psi over every (positive, negative)."""
    y = np.asarray(y).astype(bool)
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    cov = np.atleast_2d(np.cov(np.array(v10))) / m + np.atleast_2d(np.cov(np.array(v01))) / n
    return np.array(aucs), cov


def cases():
    rng = np.random.default_rng(7)
    for n, prevalence, rounding in ((60, 0.5, None), (500, 0.1, 2), (1000, 0.3, None), (300, 0.7, 1)):
        y = (rng.random(n) < prevalence).astype(int)
        s = rng.normal(size=n) + y
        yield y, (np.round(s, rounding) if rounding is not None else s)


@pytest.mark.parametrize(("y", "s"), list(cases()))
def test_auc_and_variance_equal_the_pairwise_definition_with_and_without_ties(y, s):
    fast = delong(y, s)
    aucs, cov = brute_force_delong(y, s)
    assert abs(fast.auc - aucs[0]) < 1e-9
    assert abs(fast.variance - cov[0, 0]) < 1e-9
    assert abs(fast.auc - roc_auc_score(y, s)) < 1e-12


@pytest.mark.parametrize(("y", "s"), list(cases()))
def test_variance_equals_confidenceinterval(y, s):
    auc, variance = delong_roc_variance(y, s)
    fast = delong(y, s)
    assert abs(fast.auc - float(auc)) < 1e-6  # confidenceinterval computes in float32 for some inputs
    assert abs(fast.variance - float(np.asarray(variance).ravel()[0])) < 1e-6


def test_covariance_of_two_models_equals_the_pairwise_definition():
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.35).astype(int)
    a = rng.normal(size=400) + y
    b = np.round(0.7 * a + rng.normal(size=400), 1)
    fast = delong(y, a, b)
    aucs, cov = brute_force_delong(y, a, b)
    np.testing.assert_allclose(fast.aucs, aucs, atol=1e-9)
    np.testing.assert_allclose(fast.covariance, cov, atol=1e-9)


def test_paired_test_uses_the_covariance_and_is_two_sided():
    rng = np.random.default_rng(4)
    y = (rng.random(600) < 0.4).astype(int)
    a = rng.normal(size=600) + 1.5 * y
    b = rng.normal(size=600) + 0.5 * y
    t = paired_test(y, a, b)
    _, cov = brute_force_delong(y, a, b)
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert t.z == pytest.approx((t.auc_a - t.auc_b) / se, rel=1e-9)
    assert t.p_value < 1e-6
    swapped = paired_test(y, b, a)
    assert swapped.p_value == pytest.approx(t.p_value) and swapped.z == pytest.approx(-t.z)
    same = paired_test(y, a, a)
    assert same.difference == 0 and same.p_value == 1.0


def test_logit_interval_contains_the_auc_and_stays_in_the_unit_interval():
    lo, hi = auc_interval(0.98, 0.0004)
    assert 0 < lo < 0.98 < hi < 1
    assert (0.98 - lo) > (hi - 0.98)  # asymmetric towards the open side
    assert auc_interval(1.0, 0.0) == (1.0, 1.0)


def test_one_class_is_refused_not_nan():
    with pytest.raises(ValueError, match="positives=0"):
        delong(np.zeros(10), np.arange(10.0))
