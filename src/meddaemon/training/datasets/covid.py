"""ieee8023/covid-chestxray-dataset: ``metadata.csv`` (``patientid``, ``finding`` such as
``Pneumonia/Viral/COVID-19``, ``view``, ``modality``, ``folder``, ``filename``), plus a folder of
normal images when the normals come from elsewhere (as in seed 004)."""

from __future__ import annotations

from pathlib import Path

from meddaemon.engine.tasks import TaskSpec
from meddaemon.training.datasets.folders import class_folders
from meddaemon.training.datasets.index import (
    DatasetError,
    DatasetIndex,
    Sample,
    Skipped,
    kind_for,
    require_every_label,
)
from meddaemon.training.datasets.tables import read_table, require_existing
from meddaemon.training.images import image_files

REQUIRED = ("patientid", "finding", "filename")
COVID_LABELS = ("normal", "covid")
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP SUPINE", "AP ERECT", "AP SEMI ERECT"})


def read_covid_metadata(root: Path, task: TaskSpec | None = None) -> DatasetIndex:
    labels = _labels(root, task)
    negative, positive = labels
    table = root / "metadata.csv"
    index = DatasetIndex("covid-chestxray", root, labels, kind_for(labels), [])
    named: list[tuple[int, Path]] = []
    for row_number, row in enumerate(read_table(table, REQUIRED), start=2):
        path = root / (row.get("folder") or "images") / row["filename"]
        why_not = _why_left_out(row)
        if why_not:
            index.skipped.append(Skipped(path, why_not, by_rule=True))
            continue
        label = positive if is_covid(row["finding"]) else negative
        extra = {k: v for k, v in row.items() if k not in REQUIRED}
        index.samples.append(Sample(path, (label,), row["patientid"] or None, extra=extra))
        named.append((row_number, path))
    require_existing(table, named)
    for extra_normals in class_folders(root):  # normal/, or NORMAL/ as Kaggle's chest-xray-pneumonia names it
        if extra_normals.name.lower() == negative.lower():
            index.samples.extend(Sample(p, (negative,)) for p in image_files(extra_normals))
    require_every_label(index, root, f"rows with finding 'No Finding' (or a {negative}/ folder) and COVID-19 rows")
    return index


def _labels(root: Path, task: TaskSpec | None) -> tuple[str, str]:
    if task is None:
        return COVID_LABELS
    if len(task.labels) != 2:
        raise DatasetError(root, f"task {task.name!r} has {len(task.labels)} labels", "a binary task (normal, covid)")
    return task.labels[0], task.labels[1]


def is_covid(finding: str) -> bool:
    """A finding that names COVID-19: alone, at the end of a path (``Pneumonia/Viral/COVID-19``) or
    beside another, as the 2020 releases write it (``COVID-19, ARDS``)."""
    return "COVID-19" in (part.strip() for part in finding.replace(",", "/").split("/"))


def _why_left_out(row: dict[str, str]) -> str | None:
    finding = row["finding"]
    if not (is_covid(finding) or finding.strip() == "No Finding"):
        return f"finding {finding!r} is neither COVID-19 nor No Finding"
    modality = row.get("modality", "")
    if modality and modality.lower() != "x-ray":
        return f"modality {modality!r}: the task reads X-rays"
    view = row.get("view", "")
    if view and view.upper() not in FRONTAL_VIEWS:
        return f"view {view!r}: the task reads frontal views (PA, AP)"
    return None
