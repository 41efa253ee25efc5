"""Audit benchmark: 100,000 predictions x 14 labels, DeLong CIs and subgroups, and the clustered bootstrap.

A SYNTHETIC chestxray14-like cohort (seeded): 100,000 scans of ~35,000 patients (1-5 scans
each), 14 labels with prevalences 0.2-15%, sigmoid-like probabilities rounded to float32 (so
ties occur as they do with a real model's outputs), sex / age band / view from the labels. Timed,
on the arrays (``meddaemon.audit.run.analyse``: the database and the label file are not in it):

* **analytic**: every metric of every label (DeLong AUC CI, Wilson CIs, AUPRC, calibration,
  operating points, ROC curves) overall and in every subgroup level of ``--by``;
* **bootstrap**: the same plus the patient-clustered percentile bootstrap (``--resamples``) of
  AUC, sensitivity, specificity, PPV and NPV, overall and in every subgroup level.

docs/design.md's goals: analytic < 5 s, bootstrap of 2,000 resamples < 60 s on 2 cores. The load
average is printed before and after: on a shared machine, compare runs with a quiet load only.

    .venv/bin/python benchmarks/audit.py
    .venv/bin/python benchmarks/audit.py --scans 20000 --resamples 500 --by sex,view
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from meddaemon.audit.join import Cohort
from meddaemon.audit.run import analyse
from meddaemon.engine.tasks import NIH_FINDINGS


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def synthetic_cohort(scans: int, seed: int) -> Cohort:
    """SYNTHETIC multilabel cohort, built directly as arrays."""
    rng = np.random.default_rng(seed)
    labels = NIH_FINDINGS
    prevalence = np.geomspace(0.002, 0.15, len(labels))
    y = (rng.random((scans, len(labels))) < prevalence).astype(np.int8)
    logits = rng.normal(size=(scans, len(labels))) - 2.0 + 2.0 * y
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    patient_scans = rng.integers(1, 6, scans)
    clusters = np.repeat(np.arange(scans), patient_scans)[:scans]
    clusters = np.unique(clusters, return_inverse=True)[1]
    n_patients = int(clusters.max()) + 1
    sex = np.array(["F", "M"])[rng.integers(0, 2, n_patients)][clusters]
    age = rng.integers(1, 95, n_patients)[clusters].astype(str)
    view = np.array(["PA", "AP"])[(rng.random(scans) < 0.35).astype(int)]
    return Cohort(
        task="chestxray14",
        kind="multilabel",
        labels=labels,
        y=y,
        probabilities=probs,
        calls=probs >= 0.5,
        thresholds=np.full(len(labels), 0.5),
        scan_ids=np.arange(1, scans + 1),
        label_lines=np.arange(2, scans + 2),
        clusters=clusters,
        label_attributes={"sex": sex.tolist(), "age": age.tolist(), "view": view.tolist()},
        scan_attributes={"patient_id": [None] * scans, "registered_day": [None] * scans},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=100_000)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--by", default="sex,age_band,view")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    by = tuple(c for c in args.by.split(",") if c)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, numpy {np.__version__}")  # fmt: skip
    print(f"load average before: {_load()}")
    cohort = synthetic_cohort(args.scans, args.seed)
    print(f"cohort: {cohort.n} scans, {cohort.n_clusters} patients, {len(cohort.labels)} labels, by {', '.join(by)}")

    start = time.perf_counter()
    analytic = analyse(cohort, by=by, min_n=30, resamples=0)
    analytic_s = time.perf_counter() - start
    levels = len({(g.by, g.level) for g in analytic.subgroups})
    print(f"analytic (DeLong + Wilson, overall + {levels} subgroup levels): {analytic_s:.2f} s  (goal < 5 s)")

    start = time.perf_counter()
    boot = analyse(cohort, by=by, min_n=30, resamples=args.resamples, seed=args.seed)
    boot_s = time.perf_counter() - start
    targets = len(cohort.labels) + sum(g.metrics is not None for g in boot.subgroups)
    print(f"with bootstrap ({args.resamples} clustered resamples x {targets} label/subgroup targets): "
          f"{boot_s:.2f} s  (goal < 60 s)")  # fmt: skip
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
