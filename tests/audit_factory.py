"""SYNTHETIC predictions for audit tests: Task, ModelVersion, Scan and Result rows written through the ORM.

No model runs: probabilities are drawn so that positives score higher on average, seeded, and the
scans are named ``synthetic_<i>.png``. Nothing here is real patient data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import Engine

from meddaemon.audit.labels import LabelRow, LabelTable
from meddaemon.audit.predictions import Predictions
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import ModelVersion, Result, Scan, Task
from meddaemon.engine.tasks import BUILTIN_TASKS


@dataclass
class SyntheticCohort:
    """The truth and the scores written to the DB, to compare the audit with references."""

    task: str
    labels: tuple[str, ...]
    names: list[str]
    truth: np.ndarray  # multilabel/binary: (n, labels) 0/1; multiclass: (n,) class index
    probabilities: np.ndarray  # (n, labels) as stored
    calls: np.ndarray  # (n, labels) as stored
    patient_ids: list[str]
    sexes: list[str]


def synthetic_scores(task: str, n: int, seed: int, separation: float = 1.5):  # type: ignore[no-untyped-def]
    """SYNTHETIC truth, probabilities and calls for ``n`` scans of a built-in task."""
    spec = BUILTIN_TASKS[task]
    rng = np.random.default_rng(seed)
    k = len(spec.labels)
    if spec.kind == "multiclass":
        truth = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k))
        logits[np.arange(n), truth] += separation
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        calls = np.zeros((n, k), dtype=bool)
        calls[np.arange(n), probs.argmax(axis=1)] = True
        return truth, probs, calls
    if spec.kind == "binary":
        y = (rng.random(n) < 0.4).astype(int)
        p = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * (2 * y - 1))))
        probs = np.stack([1 - p, p], axis=1)
        calls = np.stack([p < 0.5, p >= 0.5], axis=1)
        return np.stack([1 - y, y], axis=1), probs, calls
    y = (rng.random((n, k)) < 0.25).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) - 1 + separation * y)))
    return y, p, p >= 0.5


def add_version(engine: Engine, task: str, version: str, status: str = "active") -> int:
    spec = BUILTIN_TASKS[task]
    with transaction(session_factory(engine)) as session:
        if session.get(Task, task) is None:
            session.add(Task(name=task, description=spec.description))
            session.flush()
        row = ModelVersion(
            task_name=task,
            version=version,
            architecture=spec.architecture,
            sha256=f"{version:0>64}"[-64:],
            path=f"/synthetic/{task}/{version}",
            status=status,
            manifest={"labels": list(spec.labels), "kind": spec.kind, "thresholds": dict.fromkeys(spec.labels, 0.5)},
        )
        session.add(row)
        session.flush()
        return row.id


def write_predictions(
    engine: Engine,
    task: str,
    version_id: int,
    names: Sequence[str],
    probabilities: np.ndarray,
    calls: np.ndarray,
    patient_ids: Sequence[str | None] | None = None,
    sexes: Sequence[str | None] | None = None,
    registered: Sequence[datetime] | None = None,
) -> list[int]:
    """Scans (created if new, by name) and one Result per label; returns the scan ids."""
    labels = BUILTIN_TASKS[task].labels
    ids = []
    with transaction(session_factory(engine)) as session:
        existing = {s.source_name: s for s in session.query(Scan).filter(Scan.source_name.in_(list(names)))}
        for i, name in enumerate(names):
            scan = existing.get(name)
            if scan is None:
                scan = Scan(
                    sha256=hashlib.sha256(f"SYNTHETIC {task} {name}".encode()).hexdigest(),
                    state="inferred",
                    task_name=task,
                    source_name=name,
                    sop_instance_uid=f"1.2.826.0.1.3680043.99.{i}",
                    patient_id=patient_ids[i] if patient_ids else None,
                    patient_sex=sexes[i] if sexes else None,
                    patient_age=f"{20 + (i * 7) % 70:03d}Y",
                    manufacturer=("SYNTH-A", "SYNTH-B")[i % 2],
                    registered_at=registered[i]
                    if registered
                    else datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=i % 60),
                )
                session.add(scan)
                session.flush()
            ids.append(scan.id)
            for j, label in enumerate(labels):
                session.add(
                    Result(
                        scan_id=scan.id,
                        model_version_id=version_id,
                        label=label,
                        probability=float(probabilities[i, j]),
                        threshold=0.5,
                        positive=bool(calls[i, j]),
                    )
                )
    return ids


def synthetic_cohort(engine: Engine, task: str, n: int, seed: int = 0, version: str = "v1") -> SyntheticCohort:
    """A SYNTHETIC cohort of ``n`` scans in the DB under an active version, patients of 1-3 scans each."""
    truth, probs, calls = synthetic_scores(task, n, seed)
    names = [f"{task}/synthetic_{i}.png" for i in range(n)]
    patients = [f"P{i // 2:05d}" if i % 3 else f"P{i:05d}x" for i in range(n)]
    sexes = ["F" if i % 2 else "M" for i in range(n)]
    vid = add_version(engine, task, version)
    write_predictions(engine, task, vid, names, probs, calls, patients, sexes)
    return SyntheticCohort(task, BUILTIN_TASKS[task].labels, names, truth, probs, calls, patients, sexes)


def stored_predictions(task, names, probs=None, patients=None, read_in_place=False):
    """SYNTHETIC stored predictions for ``names`` (no database); ``read_in_place``: as ``medcli
    evaluate`` stores them (the dataset's own paths), else as they arrived in the inbox."""
    spec = BUILTIN_TASKS[task]
    n, k = len(names), len(spec.labels)
    probs = np.random.default_rng(0).random((n, k)) if probs is None else probs
    return Predictions(
        task=task, kind=spec.kind, labels=spec.labels, model_version="v1", model_version_id=1, model_sha256="0" * 64,
        scan_ids=np.arange(1, n + 1), source_names=list(names), sha256=[f"{i:064x}" for i in range(n)],
        sop_instance_uids=[f"1.2.{i}" for i in range(n)], probabilities=probs, calls=probs >= 0.5,
        thresholds=np.full(k, 0.5),
        scan_attributes={"patient_id": list(patients or [None] * n), "sex": ["F"] * n, "age": [None] * n,
                         "registered_day": ["2026-01-01"] * n},
        incomplete=0, read_in_place=[read_in_place] * n,
    )  # fmt: skip


def label_table(rows, key="file", attributes=()):
    """A LabelTable from (key, positives, known, attributes) tuples; lines numbered from 2 as in a CSV."""
    rows = [LabelRow(k, i + 2, frozenset(p), known, a) for i, (k, p, known, a) in enumerate(rows)]
    return LabelTable("labels.csv", "f" * 64, "csv-label", key, rows, (), tuple(attributes))
