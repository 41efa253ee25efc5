"""Wilson intervals equal statsmodels' proportion_confint(method="wilson"), edges included."""

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from meddaemon.audit.intervals import wilson


def test_wilson_equals_statsmodels_including_zero_and_all():
    successes = np.array([0, 1, 5, 50, 99, 100, 3, 0])
    trials = np.array([100, 100, 100, 100, 100, 100, 3, 1])
    lo, hi = wilson(successes, trials)
    ref_lo, ref_hi = proportion_confint(successes, trials, alpha=0.05, method="wilson")
    np.testing.assert_allclose(lo, ref_lo, atol=1e-12)
    np.testing.assert_allclose(hi, ref_hi, atol=1e-12)
    assert lo[0] == 0.0 or lo[0] < 1e-15
    assert hi[0] > 0.0  # unlike Wald, a 0% rate still has an upper bound


def test_no_trials_gives_nan_for_the_caller_to_report():
    lo, hi = wilson(0, 0)
    assert np.isnan(lo) and np.isnan(hi)


def test_the_bounds_never_leave_zero_to_one():
    """At 40 of 40 the upper bound was 1.0000000000000002, printed by --json and judged by --require."""
    lo, hi = wilson(np.arange(0, 201), np.full(201, 200))
    assert lo.min() >= 0.0 and hi.max() <= 1.0
    assert wilson(40, 40)[1] == 1.0 and wilson(0, 3)[0] == 0.0
