"""The clustered bootstrap: each resample's AUC is the weighted AUC of the drawn patients' scans."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from meddaemon.audit.bootstrap import Target, _AucKernel, bootstrap, cluster_counts


def target(seed, n=600, clusters=200, rounding=None, prevalence=0.3):
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, clusters, n)
    y = rng.random(n) < prevalence
    p = rng.random(n) * 0.6 + 0.4 * y
    if rounding is not None:
        p = np.round(p, rounding)
    return Target(("overall", "x"), y, p, p >= 0.5, cluster), clusters


@pytest.mark.parametrize(("rounding", "prevalence"), [(None, 0.3), (2, 0.3), (1, 0.8)])
def test_each_resample_auc_equals_the_weighted_auc_of_its_draw(rounding, prevalence):
    t, k = target(1, rounding=rounding, prevalence=prevalence)
    counts = cluster_counts(k, 6, np.random.default_rng(2))
    aucs = _AucKernel(t, k)(counts)
    for b in range(6):
        weights = counts[t.cluster, b]
        assert aucs[b] == pytest.approx(roc_auc_score(t.y, t.p, sample_weight=weights), abs=1e-6)


def test_a_resample_draws_whole_patients_and_as_many_as_there_are():
    counts = cluster_counts(50, 20, np.random.default_rng(0))
    assert counts.shape == (50, 20)
    assert np.all(counts.sum(axis=0) == 50)
    assert np.all(counts == np.round(counts))


def test_intervals_cover_the_point_and_narrow_with_more_data():
    small, ks = target(3, n=300, clusters=100)
    large, kl = target(3, n=6000, clusters=2000)
    narrow = bootstrap([large], kl, resamples=300, seed=1)[large.key]["auc"]
    wide = bootstrap([small], ks, resamples=300, seed=1)[small.key]["auc"]
    assert wide.lower <= roc_auc_score(small.y, small.p) <= wide.upper
    assert (narrow.upper - narrow.lower) < (wide.upper - wide.lower)
    assert narrow.resamples == 300 and narrow.undefined == 0


def test_same_seed_same_intervals():
    t, k = target(4)
    a = bootstrap([t], k, resamples=100, seed=9)
    b = bootstrap([t], k, resamples=100, seed=9)
    assert a == b


def test_clustering_widens_the_interval_when_a_patients_scans_agree():
    rng = np.random.default_rng(5)
    patients = 150
    per = 8
    cluster = np.repeat(np.arange(patients), per)
    y = np.repeat(rng.random(patients) < 0.4, per)
    p = np.repeat(rng.random(patients) * 0.6, per) + 0.4 * y + rng.normal(0, 0.01, patients * per)
    clustered = Target(("c",), y, p, p >= 0.5, cluster)
    independent = Target(("i",), y, p, p >= 0.5, np.arange(patients * per))
    wc = bootstrap([clustered], patients, resamples=300)[("c",)]["auc"]
    wi = bootstrap([independent], patients * per, resamples=300)[("i",)]["auc"]
    assert (wc.upper - wc.lower) > 1.8 * (wi.upper - wi.lower)


def test_resamples_without_positives_are_counted_not_averaged():
    y = np.zeros(40, dtype=bool)
    y[0] = True
    t = Target(("rare",), y, np.linspace(0, 1, 40), np.ones(40, dtype=bool), np.arange(40))
    found = bootstrap([t], 40, resamples=200, seed=0)[("rare",)]
    assert found["auc"].undefined > 0
    assert found["sensitivity"].undefined == found["auc"].undefined
