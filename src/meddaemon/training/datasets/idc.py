"""Breast histopathology IDC: ``<patient_id>/{0,1}/<patient>_idx5_x<X>_y<Y>_class<C>.png`` 50x50
patches; the folder is the patient, and a split must keep a patient's patches on one side."""

from __future__ import annotations

import re
from pathlib import Path

from meddaemon.engine.tasks import TaskSpec
from meddaemon.files import folder_paths
from meddaemon.training.datasets.index import (
    DatasetError,
    DatasetIndex,
    Sample,
    Skipped,
    kind_for,
    require_every_label,
)
from meddaemon.training.images import image_files

IDC_LABELS = ("idc_negative", "idc_positive")
PATCH_NAME = re.compile(r"^(?P<patient>.+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$", re.IGNORECASE)


def patient_folders(root: Path) -> list[Path]:
    """Folders of ``root`` holding a ``0`` or ``1`` folder."""
    return sorted(p for p in folder_paths(root) if p.is_dir() and ((p / "0").is_dir() or (p / "1").is_dir()))


def read_idc(root: Path, task: TaskSpec | None = None) -> DatasetIndex:
    labels = task.labels if task is not None else IDC_LABELS
    if len(labels) != 2:
        raise DatasetError(root, f"task {task.name if task else ''!r} has {len(labels)} labels", "a binary task")
    index = DatasetIndex("idc", root, labels, kind_for(labels), [])
    patients = patient_folders(root)
    if not patients:
        raise DatasetError(root, "has no patient folders", "<patient_id>/0/ and <patient_id>/1/ folders of patches")
    for patient in patients:
        for digit in ("0", "1"):
            folder = patient / digit
            if folder.is_dir():
                for path in image_files(folder):
                    _add_patch(index, patient.name, int(digit), path)
    require_every_label(index, root, "patches in <patient_id>/0/ and <patient_id>/1/")
    return index


def _add_patch(index: DatasetIndex, patient: str, digit: int, path: Path) -> None:
    match = PATCH_NAME.match(path.name)
    extra: dict[str, str] = {}
    if match:
        if int(match["label"]) != digit:
            index.skipped.append(Skipped(path, f"named class{match['label']} but filed under {digit}/"))
            return
        extra = {"x": match["x"], "y": match["y"]}
    index.samples.append(Sample(path, (index.labels[digit],), patient, extra=extra))
