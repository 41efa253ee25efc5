"""Dataset adapters: what layout a folder is in (:func:`detect_layout`), and an index of its samples
read as the dataset is published (:func:`load_dataset`). docs/design.md section 5 lists the layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from meddaemon.engine.tasks import TaskSpec
from meddaemon.files import folder_paths
from meddaemon.training.datasets.covid import read_covid_metadata
from meddaemon.training.datasets.folders import BUSI_CLASSES, BUSI_MASK, class_folders, read_busi, read_folder_per_class
from meddaemon.training.datasets.idc import patient_folders, read_idc
from meddaemon.training.datasets.index import (
    DEFAULT_MAX_BAD_FRACTION,
    DatasetError,
    DatasetIndex,
    FindingBox,
    Sample,
    Skipped,
    UnreadableDataset,
    access_errors_named,
    drop_unreadable,
)
from meddaemon.training.datasets.manifest import read_manifest
from meddaemon.training.datasets.nih import entry_file, read_nih
from meddaemon.training.images import image_files, is_image_file

__all__ = [
    "FOLDER_LAYOUTS",
    "LAYOUTS",
    "DatasetError",
    "DatasetIndex",
    "FindingBox",
    "NestedDataset",
    "Sample",
    "Skipped",
    "UnreadableDataset",
    "access_errors_named",
    "detect_layout",
    "load_dataset",
]

Reader = Callable[[Path, TaskSpec | None], DatasetIndex]

#: Layout name (as in ``TaskSpec.dataset_layout``) -> its adapter.
LAYOUTS: dict[str, Reader] = {
    "busi": read_busi,
    "nih-chestxray14": read_nih,
    "covid-chestxray": read_covid_metadata,
    "idc": read_idc,
    "folder-per-class": read_folder_per_class,
    "manifest": read_manifest,
}
#: the layouts whose folders, not a table, say which files are the dataset's: where each reads images
FOLDER_LAYOUTS: dict[str, str] = {
    "busi": "the task's class folders",
    "idc": "a patient's 0/ or 1/ folder",
    "folder-per-class": "a folder named for a label of the task",
}
EXPECTED = (
    "a CSV manifest (path,label[,patient_id]); a folder with Data_Entry_2017.csv (ChestX-ray14), "
    "metadata.csv (covid-chestxray-dataset), <patient>/0/ and <patient>/1/ folders (IDC), "
    "benign/malignant/normal folders with _mask.png files (BUSI), or a folder per class"
)


class NestedDataset(DatasetError):
    """``path`` holds nothing but a dataset one level down (``Downloads/Dataset_BUSI_with_GT/``):
    the user meant that dataset (``inner``, read as ``layout``), not a folder of images holding it."""

    def __init__(self, path: Path, inner: Path, layout: str) -> None:
        problem = f"holds one folder, {inner.name}, which is a {layout} dataset"
        super().__init__(path, problem, f"the dataset root {inner}")
        self.inner = inner
        self.layout = layout


def detect_layout(path: Path) -> str:
    """The layout of ``path`` (a dataset folder or a CSV manifest); a DatasetError when none fits,
    or when a folder that tells the layout cannot be listed."""
    with access_errors_named(path):
        return _detect_layout(path)


def _detect_layout(path: Path) -> str:
    if not path.exists():
        raise DatasetError(path, "does not exist", EXPECTED)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "manifest"
        raise DatasetError(path, "is a file but not a CSV manifest", EXPECTED)
    if entry_file(path) is not None:
        return "nih-chestxray14"
    if (path / "metadata.csv").is_file():
        return "covid-chestxray"
    if patient_folders(path):
        return "idc"
    folders = class_folders(path)
    if folders and _is_busi(folders):
        return "busi"
    if len(folders) == 1 and not any(is_image_file(p) for p in folder_paths(path)):
        _refuse_wrapper_folder(path, folders[0])
    if any(next(image_files(f), None) is not None for f in folders):
        return "folder-per-class"
    found = ", ".join(sorted(p.name for p in folder_paths(path))[:8]) or "nothing"
    raise DatasetError(path, f"matches no dataset layout (found: {found})", EXPECTED)


def _refuse_wrapper_folder(path: Path, only: Path) -> None:
    """A folder holding nothing but the dataset (``Downloads/Dataset_BUSI_with_GT/``) names it. A
    folder of images beside its one folder, or whose one folder holds a single folder of images
    (``2024/jan/``: no classes), is no such wrapper."""
    try:
        inner = detect_layout(only)
    except DatasetError:
        return
    if inner == "folder-per-class" and len(class_folders(only)) < 2:
        return
    raise NestedDataset(path, only, inner)


def _is_busi(folders: list[Path]) -> bool:
    names = {f.name.lower() for f in folders}
    if not names <= set(BUSI_CLASSES):
        return False
    return any(BUSI_MASK.match(p.name) for f in folders for p in folder_paths(f))


def load_dataset(
    path: Path,
    task: TaskSpec | None = None,
    *,
    layout: str | None = None,
    check_images: bool = True,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
) -> DatasetIndex:
    """Index the dataset at ``path`` in ``layout`` (detected when not given), labelled with
    ``task``'s labels when given. With ``check_images`` every image is decoded once: the unreadable
    ones are skipped and listed, and more than ``max_bad_fraction`` of them is a DatasetError."""
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise DatasetError(path, f"unknown layout {layout!r}", f"one of {', '.join(LAYOUTS)}")
    with access_errors_named(path):
        index = LAYOUTS[layout](path, task)
    if not index.samples:
        raise DatasetError(path, "holds no usable images", EXPECTED)
    return drop_unreadable(index, max_bad_fraction) if check_images else index
