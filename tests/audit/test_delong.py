"""Fast DeLong equals the O(m*n) definition, scikit-learn's AUC and confidenceinterval's variance."""

import numpy as np
import pytest
from confidenceinterval.delong import delong_roc_variance
from scipy.stats import beta as beta_dist
from sklearn.metrics import roc_auc_score
from statsmodels.stats.proportion import proportion_confint

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
    lo, hi, method = auc_interval(0.98, 0.0004, 100, 100)
    assert 0 < lo < 0.98 < hi < 1 and method == "delong-logit"
    assert (0.98 - lo) > (hi - 0.98)  # asymmetric towards the open side


def test_one_class_is_refused_not_nan():
    with pytest.raises(ValueError, match="positives=0"):
        delong(np.zeros(10), np.arange(10.0))


def clopper_pearson(successes, trials):
    """The oracle: statsmodels' exact binomial interval (method "beta")."""
    return proportion_confint(successes, trials, alpha=0.05, method="beta")


@pytest.mark.parametrize(("positives", "negatives"), [(2, 50), (50, 3), (1, 1)])
def test_a_perfect_auc_with_few_cases_gets_the_exact_bound_of_the_smaller_class(positives, negatives):
    lo, hi, method = auc_interval(1.0, 0.0, positives, negatives)
    k = min(positives, negatives)
    assert (lo, hi) == pytest.approx(clopper_pearson(k, k), abs=1e-12)
    assert lo == pytest.approx(0.025 ** (1 / k))  # k disjoint pairs all concordant: probability auc**k
    assert method == "clopper-pearson of auc*k in k = min(positives, negatives)"
    assert lo < 0.99


def test_an_auc_of_zero_is_the_mirror_image():
    lo, hi, _ = auc_interval(0.0, 0.0, 2, 50)
    assert (lo, hi) == pytest.approx(clopper_pearson(0, 2), abs=1e-12)
    assert hi > 0.8


def test_a_zero_variance_inside_the_unit_interval_gets_the_count_bound():
    y = np.array([0, 0, 0, 1, 1, 1])
    d = delong(y, np.full(6, 0.5))  # every score tied: AUC 0.5, DeLong variance 0
    assert d.auc == 0.5 and d.variance == 0.0
    lo, hi, method = auc_interval(d.auc, d.variance, 3, 3)
    assert (lo, hi) == pytest.approx((beta_dist.ppf(0.025, 1.5, 2.5), beta_dist.ppf(0.975, 2.5, 1.5)), abs=1e-12)
    assert method.startswith("clopper-pearson")


def test_a_large_sample_at_or_near_one_keeps_a_narrow_interval():
    lo, hi, _ = auc_interval(1.0, 0.0, 2000, 3000)
    assert lo > 0.998 and hi == 1.0
    rng = np.random.default_rng(11)
    y = np.r_[np.ones(2000), np.zeros(3000)].astype(int)
    s = np.where(y == 1, rng.normal(4.5, 1, 5000), rng.normal(0, 1, 5000))
    d = delong(y, s)
    assert 0.99 < d.auc < 1.0
    lo, hi, _ = auc_interval(d.auc, d.variance, 2000, 3000)
    assert lo < d.auc < hi and hi - lo < 0.005
    lo_perfect, _, _ = auc_interval(1.0, 0.0, 2000, 3000)
    assert lo <= lo_perfect


def test_an_auc_far_from_the_edges_with_many_cases_keeps_delong_s_interval():
    rng = np.random.default_rng(12)
    y = np.r_[np.ones(500), np.zeros(500)].astype(int)
    d = delong(y, np.where(y == 1, rng.normal(1.5, 1, 1000), rng.normal(0, 1, 1000)))
    lo, hi, method = auc_interval(d.auc, d.variance, 500, 500)
    assert method == "delong-logit" and lo < d.auc < hi


@pytest.mark.parametrize("per_class", [30, 50, 100, 200, 2000])
def test_a_model_that_misranks_one_positive_is_never_surer_than_a_perfect_one(per_class):
    """One positive scored below three negatives: AUC just under 1. With 30 to 200 cases a class
    DeLong gave it a lower bound above the perfect model's count bound (30: 0.962 against 0.884),
    so `--require "auc>=0.9"` passed it and failed the perfect model. It is held at that bound."""
    negatives = np.linspace(0.0, 1.0, per_class)
    positives = np.linspace(2.0, 3.0, per_class)
    y = np.r_[np.ones(per_class), np.zeros(per_class)].astype(int)
    perfect = delong(y, np.r_[positives, negatives])
    worse = delong(y, np.r_[negatives[-4] + 1e-6, positives[1:], negatives])
    assert perfect.auc == 1.0 and 1.0 - 4.0 / per_class**2 < worse.auc < 1.0
    lo_perfect, _, _ = auc_interval(perfect.auc, perfect.variance, per_class, per_class)
    lo_worse, _, method = auc_interval(worse.auc, worse.variance, per_class, per_class)
    assert lo_worse == pytest.approx(lo_perfect) and method.startswith("delong-logit, capped")


def test_an_auc_just_below_one_with_few_positives_never_gets_a_narrower_interval_than_one_of_one():
    """2 positives, 1,000 negatives: AUC 1 got 0.158-1 (the count bound) and AUC 0.999 the DeLong
    0.989-1, so `--require "auc>=0.9"` passed the worse model and failed the perfect one."""
    rng = np.random.default_rng(3)
    negatives = rng.normal(0, 1, 1000)
    y = np.r_[np.ones(2), np.zeros(1000)].astype(int)
    perfect = delong(y, np.r_[[10.0, 11.0], negatives])
    worse = delong(y, np.r_[[10.0, np.sort(negatives)[-2] - 1e-9], negatives])
    assert perfect.auc == 1.0 and 0.998 < worse.auc < 1.0
    lo_perfect, _, _ = auc_interval(perfect.auc, perfect.variance, 2, 1000)
    lo_worse, hi_worse, method = auc_interval(worse.auc, worse.variance, 2, 1000)
    assert lo_worse <= lo_perfect and hi_worse == pytest.approx(1.0, abs=1e-9)
    assert method.startswith("union")


def test_a_paired_difference_with_no_variance_and_a_difference_has_no_p_value_rather_than_p_0():
    """One positive and 200 negatives, A ranks it first and B last: DeLong's variance of the
    difference is 0; p was 0 (an exact permutation test gives about 0.5)."""
    y = np.r_[1, np.zeros(200)].astype(int)
    a = np.r_[1.0, np.linspace(0, 0.5, 200)]
    b = np.r_[0.0, np.linspace(0.5, 1, 200)]
    t = paired_test(y, a, b)
    assert (t.auc_a, t.auc_b) == (1.0, 0.0)
    assert np.isnan(t.p_value) and np.isnan(t.lower) and np.isnan(t.upper)
    same = paired_test(y, a, a)
    assert (same.difference, same.p_value) == (0.0, 1.0)


def test_a_paired_difference_with_a_lone_positive_has_no_p_value_though_its_variance_is_not_0():
    """One positive, 20 negatives; A ranks it first, B in the middle: the negatives' placements
    vary, the positive's share of the variance was taken as 0, and p came out 1e-5."""
    y = np.r_[1, np.zeros(20)].astype(int)
    negatives = np.linspace(0, 1, 20)
    t = paired_test(y, np.r_[2.0, negatives], np.r_[0.5 + 1e-6, negatives])
    assert t.auc_a == 1.0 and 0.4 < t.auc_b < 0.6
    assert np.isnan(t.p_value) and np.isnan(t.lower) and np.isnan(t.upper)
    flipped = paired_test(1 - y, np.r_[-2.0, negatives], np.r_[0.5, negatives])  # a lone negative
    assert np.isnan(flipped.p_value)
