"""The analysis of a cohort: a bootstrap interval is never narrower than the interval without it."""

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from audit_factory import label_table, stored_predictions
from meddaemon.audit.criteria import evaluate, parse_criteria
from meddaemon.audit.join import join
from meddaemon.audit.run import analyse

PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")


def covid_cohort(covid, p_covid):
    """SYNTHETIC binary cohort, two scans per patient (so the clustered bootstrap runs)."""
    n = len(covid)
    names = [f"s{i}.png" for i in range(n)]
    probs = np.stack([1 - p_covid, p_covid], axis=1)
    preds = stored_predictions("covid", names, probs=probs, patients=[f"P{i // 2}" for i in range(n)])
    rows = [(nm, {"covid" if c else "normal"}, None, {}) for nm, c in zip(names, covid, strict=True)]
    return join(preds, label_table(rows))[0]


def thirteen_of_thirteen():
    """200 scans: 13 positive calls, every one right (PPV 13/13), scores that separate the rest loosely."""
    rng = np.random.default_rng(3)
    covid = np.zeros(200, dtype=bool)
    covid[:40] = True
    p = np.where(covid, rng.uniform(0.2, 0.49, 200), rng.uniform(0.0, 0.45, 200))
    p[:13] = 0.9
    return covid_cohort(covid, p)


def test_a_ppv_of_13_of_13_keeps_its_wilson_interval_under_the_clustered_bootstrap():
    analysis = analyse(thirteen_of_thirteen(), resamples=300)
    [m] = analysis.overall
    assert m.ppv.value == 1.0
    wilson_lower, wilson_upper = proportion_confint(13, 13, alpha=0.05, method="wilson")
    assert m.ppv.lower == pytest.approx(wilson_lower, abs=1e-12) and m.ppv.upper == pytest.approx(wilson_upper)
    assert m.ppv.method.startswith("cluster-bootstrap-percentile (B=300") and m.ppv.method.endswith(") union wilson")
    [verdict] = evaluate(parse_criteria("ppv[covid]>=0.95"), analysis.overall)
    assert not verdict.passed
    assert any("union of Wilson/DeLong and a patient-clustered percentile bootstrap" in note for note in analysis.notes)


def test_every_bootstrapped_proportion_contains_its_wilson_interval():
    [m] = analyse(thirteen_of_thirteen(), resamples=300).overall
    tp, fp, fn, tn = m.confusion["tp"], m.confusion["fp"], m.confusion["fn"], m.confusion["tn"]
    for name, (x, n) in zip(PROPORTIONS, ((tp, tp + fn), (tn, tn + fp), (tp, tp + fp), (tn, tn + fn)), strict=True):
        value = getattr(m, name)
        lower, upper = proportion_confint(x, n, alpha=0.05, method="wilson")
        assert value.lower <= lower + 1e-12 and value.upper >= upper - 1e-12, name


def test_a_perfect_auc_under_the_clustered_bootstrap_has_a_width():
    covid = np.r_[np.ones(6), np.zeros(60)].astype(bool)
    p = np.where(covid, 0.9, np.linspace(0.0, 0.4, 66))
    [m] = analyse(covid_cohort(covid, p), resamples=200).overall
    assert m.auc.value == 1.0
    assert m.auc.lower == pytest.approx(0.025 ** (1 / 6)) and m.auc.upper == 1.0
    assert m.auc.method.startswith("cluster-bootstrap-percentile (B=200")
    assert m.auc.method.endswith(") union clopper-pearson of auc*k in k = min(positives, negatives)")
