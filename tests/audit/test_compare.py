"""Two model versions on the same scans (paired DeLong), and two time windows (shift)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from audit_factory import label_table, stored_predictions
from meddaemon.audit.compare import Window, compare_versions, shift
from meddaemon.audit.delong import paired_test
from meddaemon.audit.join import join
from meddaemon.audit.predictions import AuditInputError
from meddaemon.audit.values import Estimate, Undefined


def covid(n=300, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    p = 1 / (1 + np.exp(-(rng.normal(0, noise, n) + 2 * y - 1)))
    return y, np.stack([1 - p, p], axis=1)


def test_the_comparison_is_the_paired_test_on_the_scans_both_versions_scored():
    names = [f"s{i}.png" for i in range(300)]
    y, probs_a = covid(seed=1)
    _, probs_b = covid(seed=2, noise=3.0)
    a = stored_predictions("covid", names, probs=probs_a)
    b = stored_predictions("covid", names[:250], probs=probs_b[:250])
    cohort, _ = join(
        a, label_table([(nm, {"covid" if t else "normal"}, None, {}) for nm, t in zip(names, y, strict=True)])
    )
    [c] = compare_versions(cohort, b)
    assert c.n == 250
    ref = paired_test(y[:250], probs_a[:250, 1], probs_b[:250, 1])
    assert c.auc_a == pytest.approx(roc_auc_score(y[:250], probs_a[:250, 1]))
    assert c.difference.value == pytest.approx(ref.difference) and c.p_value == pytest.approx(ref.p_value)
    assert c.difference.lower < c.difference.value < c.difference.upper


def test_a_version_that_scored_none_of_the_scans_is_refused():
    y, probs = covid(n=10)
    a = stored_predictions("covid", [f"s{i}.png" for i in range(10)], probs=probs)
    b = stored_predictions("covid", ["other.png"], probs=probs[:1])
    b = type(b)(**{**b.__dict__, "scan_ids": np.array([999])})
    cohort, _ = join(a, label_table([(f"s{i}.png", {"covid" if t else "normal"}, None, {}) for i, t in enumerate(y)]))
    with pytest.raises(AuditInputError, match="scored none of the audited scans"):
        compare_versions(cohort, b)


def test_windows_parse_and_refuse_nonsense():
    w = Window.parse("2026-01-01..2026-03-31")
    assert str(w) == "2026-01-01..2026-03-31"
    assert w.contains(np.array(["2025-12-31", "2026-01-01", "2026-03-31", "2026-04-01"], dtype=object)).tolist() == [
        False, True, True, False
    ]  # fmt: skip
    with pytest.raises(AuditInputError, match="expected YYYY-MM-DD"):
        Window.parse("last month")
    with pytest.raises(AuditInputError, match="ends before it starts"):
        Window.parse("2026-03-01..2026-01-01")


def test_shift_compares_each_window_and_says_when_a_window_has_one_class():
    y, probs = covid(n=400, seed=3)
    names = [f"s{i}.png" for i in range(400)]
    cohort, _ = join(
        stored_predictions("covid", names, probs=probs),
        label_table([(nm, {"covid" if t else "normal"}, None, {}) for nm, t in zip(names, y, strict=True)]),
    )
    days = np.array(["2026-01-15" if i < 200 else "2026-05-15" for i in range(400)], dtype=object)
    [s] = shift(cohort, days, Window.parse("2026-01-01..2026-01-31"), Window.parse("2026-05-01..2026-05-31"))
    assert s.a.n == 200 and s.b.n == 200
    assert isinstance(s.auc_change, Estimate)
    expected = roc_auc_score(y[200:], probs[200:, 1]) - roc_auc_score(y[:200], probs[:200, 1])
    assert s.auc_change.value == pytest.approx(expected)
    assert 0 <= s.p_value <= 1
    # both windows' intervals DeLong's own: DeLong's variances, and the test named so
    assert min(s.a.positives, s.a.negatives, s.b.positives, s.b.negatives) >= 30
    se = np.sqrt(s.a.auc_variance + s.b.auc_variance)
    assert s.auc_change.upper - s.auc_change.value == pytest.approx(1.959964 * se, rel=1e-5)
    assert s.auc_change.method == "delong-unpaired"
    assert s.as_dict()["test"] == "unpaired DeLong (independent windows), two-sided"
    [empty] = shift(cohort, days, Window.parse("2026-01-01..2026-01-31"), Window.parse("2027-01-01..2027-01-31"))
    assert isinstance(empty.auc_change, Undefined) and "no labelled scans" in empty.auc_change.reason


def test_a_version_pair_with_no_variance_is_undefined_with_its_reason_not_p_0():
    names = [f"s{i}.png" for i in range(201)]
    y = np.r_[1, np.zeros(200)].astype(bool)
    pa = np.r_[0.99, np.linspace(0.01, 0.5, 200)]
    pb = np.r_[0.01, np.linspace(0.5, 0.99, 200)]
    cohort, _ = join(
        stored_predictions("covid", names, probs=np.stack([1 - pa, pa], axis=1)),
        label_table([(nm, {"covid" if t else "normal"}, None, {}) for nm, t in zip(names, y, strict=True)]),
    )
    [c] = compare_versions(cohort, stored_predictions("covid", names, probs=np.stack([1 - pb, pb], axis=1)))
    assert isinstance(c.difference, Undefined)
    assert c.difference.reason == "one positive only: the DeLong variance of the difference cannot be estimated"
    assert c.p_value is None and (c.auc_a, c.auc_b) == (1.0, 0.0)


def test_a_window_at_auc_1_weighs_as_much_as_its_own_interval_says():
    """Window A: 40 scans, 2 positives ranked perfectly (AUC 1, 0.158-1); window B: 1,000 scans at
    AUC about 0.9. A DeLong variance of 0 for A called the change certain (p 7.8e-23)."""
    rng = np.random.default_rng(5)
    y_a = np.r_[np.ones(2), np.zeros(38)].astype(bool)
    p_a = np.r_[0.95, 0.96, rng.uniform(0.0, 0.9, 38)]
    y_b = rng.random(1000) < 0.3
    p_b = 1 / (1 + np.exp(-(rng.normal(0, 1, 1000) + 2.5 * y_b - 1.2)))
    y, p = np.r_[y_a, y_b], np.r_[p_a, p_b]
    names = [f"s{i}.png" for i in range(len(y))]
    cohort, _ = join(
        stored_predictions("covid", names, probs=np.stack([1 - p, p], axis=1)),
        label_table([(nm, {"covid" if t else "normal"}, None, {}) for nm, t in zip(names, y, strict=True)]),
    )
    days = np.array(["2026-01-15"] * 40 + ["2026-05-15"] * 1000, dtype=object)
    [s] = shift(cohort, days, Window.parse("2026-01-01..2026-01-31"), Window.parse("2026-05-01..2026-05-31"))
    assert s.a.auc.value == 1.0 and s.a.auc.lower < s.b.auc.lower
    assert isinstance(s.auc_change, Estimate) and s.auc_change.lower < 0 < s.auc_change.upper
    assert s.p_value > 0.05
    # not DeLong's test, and said so (it was named "unpaired DeLong" whatever variance it used)
    assert s.auc_change.method == "interval-unpaired" and s.as_dict()["test"].startswith("unpaired z-test")
