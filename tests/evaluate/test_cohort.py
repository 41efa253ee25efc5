"""What a cohort is: the dataset its folder's layout tells, read with its labels, or a folder of
images without labels; never one read as the other."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.evaluate.cohort import read_cohort
from meddaemon.training.datasets import DatasetError
from meddaemon.training.phantoms import write_phantoms


@pytest.mark.parametrize(("task", "table"), [("covid", "metadata.csv"), ("chestxray14", "Data_Entry_2017.csv")])
def test_a_dataset_whose_label_table_names_a_missing_image_is_refused_not_read_as_images(
    tmp_path: Path, task: str, table: str
) -> None:
    """It was scored as a folder of images, without a word: every image the layout leaves out (the
    CT slices, the lateral views, the other findings) with the rest, the run "completed"."""
    root = write_phantoms(task, tmp_path / f"{task}_SYNTHETIC", count=4, size=32, seed=1).root
    images = sorted(p for p in root.rglob("*.png"))
    images[0].unlink()
    with pytest.raises(DatasetError, match="do not exist") as caught:
        read_cohort(root, BUILTIN_TASKS[task])
    assert caught.value.path.name == table and images[0].name in str(caught.value)


def test_a_folder_of_folders_that_are_not_the_task_s_classes_is_a_folder_of_images(tmp_path: Path) -> None:
    """An archive filed by date (2024/, 2025/) looks like a folder per class: it is read as images."""
    phantoms = write_phantoms("busi", tmp_path / "busi_SYNTHETIC", count=2, size=32).root
    archive = tmp_path / "archive"
    for year, image in zip(("2024", "2025"), sorted(phantoms.glob("benign/*).png")), strict=True):
        (archive / year).mkdir(parents=True)
        shutil.copy(image, archive / year / image.name)
    cohort = read_cohort(archive, BUILTIN_TASKS["busi"])
    assert (cohort.layout, len(cohort.files), cohort.index) == ("images", 2, None)


def test_a_cohort_two_of_whose_files_would_be_stored_under_one_name_is_refused(tmp_path: Path) -> None:
    """A Latin-1 name is stored with its byte written %XX: ``synthetic_\\xe9.png`` and a file really
    named ``synthetic_%E9.png`` were one name to the database, and the run stopped on its unique key
    every time, or the second file's row replaced the first's without a word."""
    root = write_phantoms("busi", tmp_path / "busi_SYNTHETIC", count=2, size=32, seed=1).root
    image = next(root.rglob("*).png"))
    shutil.copy(image, image.parent / "synthetic_%E9.png")
    shutil.copy(image, os.fsdecode(os.fsencode(image.parent) + b"/synthetic_\xe9.png"))
    with pytest.raises(DatasetError, match=r"would both be stored as '\w+/synthetic_%E9.png'") as caught:
        read_cohort(root, BUILTIN_TASKS["busi"])
    assert "synthetic_\\xe9.png" in str(caught.value) and "rename one" in str(caught.value)
