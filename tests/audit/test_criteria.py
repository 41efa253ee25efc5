"""--require: parsed strictly, judged on the interval bound, undefined metrics fail."""

import numpy as np
import pytest

from meddaemon.audit.criteria import CriteriaError, evaluate, parse_criteria
from meddaemon.audit.metrics import label_metrics


def metrics(label, n=400, prevalence=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, n), 0, 1)
    return label_metrics(label, y, p, p >= 0.5, 0.5)


def test_parse_metrics_labels_and_operators():
    cs = parse_criteria("auc>=0.90, sensitivity[Mass]>0.85,ece<=0.05")
    assert [(c.metric, c.label, c.op, c.limit) for c in cs] == [
        ("auc", None, ">=", 0.9), ("sensitivity", "Mass", ">", 0.85), ("ece", None, "<=", 0.05)
    ]  # fmt: skip


def test_a_label_in_another_case_is_the_reported_label_as_labels_files_are_read():
    """``auc[effusion]`` was refused (exit 2) though the labels file's ``effusion`` is read as Effusion."""
    [criterion] = parse_criteria("auc[effusion]>0.8", ("Effusion", "Mass"))
    assert criterion.label == "Effusion"
    [verdict] = evaluate([criterion], [metrics("Effusion"), metrics("Mass", seed=1)])
    assert verdict.label == "Effusion"


@pytest.mark.parametrize(("text", "match"), [("auc=0.9", "cannot read"), ("accuracy>=0.9", "unknown metric"),
                                              ("", "empty"), ("auc[Foo]>=0.5", "unknown label")])  # fmt: skip
def test_bad_criteria_are_refused(text, match):
    with pytest.raises(CriteriaError, match=match):
        parse_criteria(text, ("Mass",))


def test_a_lower_limit_is_judged_on_the_lower_bound():
    m = metrics("Mass")
    between = (m.auc.lower + m.auc.value) / 2  # the point passes, the lower bound does not
    [v] = evaluate(parse_criteria(f"auc>={between}"), [m])
    assert not v.passed and v.judged == m.auc.lower and v.basis == "lower 95% bound"
    [v] = evaluate(parse_criteria(f"auc>={m.auc.lower - 1e-6}"), [m])
    assert v.passed


def test_an_upper_limit_is_judged_on_the_upper_bound_or_the_point_without_interval():
    m = metrics("Mass")
    [v] = evaluate(parse_criteria(f"ppv<{m.ppv.upper}"), [m])
    assert not v.passed and v.basis == "upper 95% bound"
    [v] = evaluate(parse_criteria(f"brier<={m.brier.value}"), [m])
    assert v.passed and v.basis == "point value (no interval)"


def test_an_undefined_metric_fails_with_its_reason_and_labels_are_selected():
    ok, empty = metrics("Mass"), metrics("Hernia", prevalence=0.0)
    verdicts = evaluate(parse_criteria("auc>=0.5"), [ok, empty])
    assert [v.passed for v in verdicts] == [True, False]
    assert "no positives" in verdicts[1].basis
    assert [v.label for v in evaluate(parse_criteria("auc[Mass]>=0.5"), [ok, empty])] == ["Mass"]


def test_a_perfect_auc_on_two_positives_does_not_pass_a_high_auc_gate():
    y = np.r_[np.ones(2), np.zeros(60)].astype(int)
    p = np.r_[0.9, 0.95, np.linspace(0.0, 0.6, 60)]
    m = label_metrics("Hernia", y, p, p >= 0.5, 0.5)
    assert m.auc.value == 1.0
    [v] = evaluate(parse_criteria("auc>=0.99"), [m])
    assert not v.passed and v.judged == pytest.approx(0.025**0.5) and v.basis == "lower 95% bound"


def test_a_perfect_auc_on_many_cases_still_passes():
    y = np.r_[np.ones(1500), np.zeros(1500)].astype(int)
    p = np.r_[np.linspace(0.7, 1.0, 1500), np.linspace(0.0, 0.3, 1500)]
    [v] = evaluate(parse_criteria("auc>=0.99"), [label_metrics("Effusion", y, p, p >= 0.5, 0.5)])
    assert v.passed and v.judged > 0.997
