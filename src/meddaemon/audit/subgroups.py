"""Subgroups: the same metrics within each level of a column (sex, age band, manufacturer, view, site...).

A grouping column comes from the labels file first (any of its columns), else from the stored
DICOM metadata (``sex``, ``age``, ``manufacturer``, ``view``, ``modality``, ``body_part``).
``age_band`` is derived from an ``age`` column or the DICOM age (``045Y``, ``006M``). A column is
named as in the file (``Patient Gender``) or as the audit names it (``sex``), in any case and
spacing (``patient_gender``). A level with
fewer than ``min_n`` labelled scans is reported as insufficient, with its counts, not as a number.
A column that identifies patients (``patient_id``, ``Patient ID``) is never one: its levels would be
printed, stored with the audit and shown in the console.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from meddaemon.audit.join import Cohort
from meddaemon.audit.labels import NIH_ATTRIBUTES, closest_name, is_personal, spellings
from meddaemon.audit.metrics import LabelMetrics, label_metrics
from meddaemon.audit.predictions import AuditInputError
from meddaemon.audit.values import Undefined

MISSING = "(missing)"
#: the band of an age given but not readable as one (``unknown``, ``61 years``): kept apart from the
#: ages not given, which it was counted among without a word
UNREADABLE_AGE = "(unreadable)"
AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
_DICOM_AGE = re.compile(r"^\s*(\d+(?:[.,]\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def age_band(value: str | None) -> str:
    """The band of an age in years (``58``, ``0.5``, or with a decimal comma as a semicolon file of a
    decimal-comma locale writes it, ``0,5``) or in DICOM's AS form (``058Y``, ``006M``)."""
    if not (value or "").strip():
        return MISSING
    match = _DICOM_AGE.match(value or "")
    if not match:
        return UNREADABLE_AGE
    years = float(match.group(1).replace(",", ".")) * _AGE_UNIT_YEARS[match.group(2).upper()]
    return next((name for lo, hi, name in AGE_BANDS if lo <= years < hi), UNREADABLE_AGE)


def available_columns(cohort: Cohort) -> list[str]:
    names = [*cohort.label_attributes, *cohort.scan_attributes, "age_band"]
    return sorted(n for n in set(names) if not is_personal(n))


def resolve_column(cohort: Cohort, name: str) -> str:
    """The cohort's column that ``name`` (as in the file, or normalised) names: the labels file's
    first, then the stored metadata's, so that a file's ``Sex`` is grouped on, not the DICOM sex
    the audit also calls ``sex`` (which PNG scans lack)."""
    if is_personal(name):
        raise AuditInputError(
            f"--by {name!r} identifies patients: its levels would be patient data, printed and stored"
            " with the audit; group by what patients share (sex, age_band, site, view...)"
        )
    wanted = spellings(name)
    for pool in (cohort.label_attributes, [*cohort.scan_attributes, "age_band"]):
        columns = sorted(n for n in set(pool) if not is_personal(n))
        if name in columns:
            return name
        found = [column for column in columns if spellings(column) & wanted]
        if len(found) == 1:
            return found[0]
        if found:
            raise AuditInputError(f"--by {name!r} could be any of the columns {', '.join(found)}: give one as spelt")
    available = available_columns(cohort)
    names = [*available, *(k for k, v in NIH_ATTRIBUTES.items() if v in available)]
    meant = closest_name(name, names)
    raise AuditInputError(
        f"no column {name!r} to group by in the labels file or the stored metadata"
        + (f"; did you mean {meant!r}?" if meant else "")
        + f"; available: {', '.join(available)}"
    )


def _file_age(cohort: Cohort) -> list[str] | None:
    """The labels file's age column (``age``, ``Age``, ``Patient Age``...), if it has one."""
    found = [c for c in cohort.label_attributes if spellings(c) & spellings("age")]
    return cohort.label_attributes[found[0]] if len(found) == 1 else None


def grouping_values(cohort: Cohort, name: str) -> np.ndarray:
    """The level of every scan of the cohort for the grouping column ``name`` (see ``resolve_column``)."""
    name = resolve_column(cohort, name)
    if name in cohort.label_attributes:
        raw: list[str | None] = list(cohort.label_attributes[name])
    elif name == "age_band":
        source = _file_age(cohort) or cohort.scan_attributes["age"]
        distinct, inverse = np.unique(np.array([v or "" for v in source], dtype=object), return_inverse=True)
        return np.array([age_band(v) for v in distinct], dtype=object)[inverse]
    else:
        raw = list(cohort.scan_attributes[name])
    distinct, inverse = np.unique(np.array([v or "" for v in raw], dtype=object), return_inverse=True)
    return np.array([v.strip() or MISSING for v in distinct], dtype=object)[inverse]


@dataclass(frozen=True)
class Subgroup:
    by: str
    level: str
    label: str
    n: int
    positives: int
    negatives: int
    metrics: LabelMetrics | None
    insufficient: Undefined | None
    rows: np.ndarray  # indices into the cohort (labelled scans of this level and label)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "by": self.by,
            "level": self.level,
            "label": self.label,
            "n": self.n,
            "positives": self.positives,
            "negatives": self.negatives,
        }
        if self.insufficient is not None:
            out["insufficient"] = self.insufficient.as_dict()
        if self.metrics is not None:
            m = self.metrics.as_dict()
            m.pop("calibration", None)
            out["metrics"] = m
        return out


def subgroups(cohort: Cohort, by: list[str], min_n: int = 30, at_sensitivity: float = 0.9) -> list[Subgroup]:
    out: list[Subgroup] = []
    orders = [np.argsort(cohort.probabilities[:, j], kind="stable") for j in range(len(cohort.labels))]
    position = np.full(cohort.n, -1, dtype=np.int64)
    for name in (resolve_column(cohort, given) for given in by):
        values = grouping_values(cohort, name)
        for level in sorted(set(values.tolist())):
            in_level = values == level
            for j, label in enumerate(cohort.labels):
                rows = np.flatnonzero(in_level & (cohort.y[:, j] >= 0))
                y = cohort.y[rows, j]
                n, pos = len(rows), int(y.sum())
                counts = {"n": n, "positives": pos, "negatives": n - pos, "min_n": min_n}
                if n < min_n:
                    reason = f"insufficient: {n} labelled scans, fewer than the minimum {min_n}"
                    out.append(Subgroup(name, level, label, n, pos, n - pos, None, Undefined(reason, counts), rows))
                    continue
                metrics = label_metrics(
                    label,
                    y,
                    cohort.probabilities[rows, j],
                    cohort.calls[rows, j],
                    cohort.threshold(j),
                    at_sensitivity=at_sensitivity,
                    with_curves=False,
                    order=_sub_order(orders[j], rows, position),
                )
                out.append(Subgroup(name, level, label, n, pos, n - pos, metrics, None, rows))
    return out


def _sub_order(order: np.ndarray, rows: np.ndarray, position: np.ndarray) -> np.ndarray:
    """The ascending order of the subset ``rows`` (sorted cohort indices), read off the whole
    cohort's ``order`` in O(n) instead of sorting again; ``position`` is scratch space of length n."""
    position[rows] = np.arange(len(rows))
    picked = position[order]
    position[rows] = -1
    sub: np.ndarray = picked[picked >= 0]
    return sub
