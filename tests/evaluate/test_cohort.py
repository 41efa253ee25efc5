"""What a cohort is: the dataset its folder's layout tells, read with its labels, or a folder of
images without labels; never one read as the other."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from evaluate_factory import LAYOUT_CASES
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


@pytest.mark.parametrize("inner", [("2024", "jan", "feb"), ("STUDY1", "SERIES0", "SERIES1")])
def test_one_folder_of_folders_that_are_not_the_task_s_classes_is_a_folder_of_images(
    tmp_path: Path, inner: tuple[str, str, str]
) -> None:
    """``archive/2024/{jan,feb}/``, a one-study export's ``STUDY1/SERIES*/``: refused as a folder
    holding a dataset, ``2024``, though a folder per class only when its folders are the classes."""
    phantoms = write_phantoms("busi", tmp_path / "busi_SYNTHETIC", count=2, size=32).root
    root = tmp_path / "archive"
    top, *folders = inner
    for folder, image in zip(folders, sorted(phantoms.glob("benign/*).png")), strict=True):
        (root / top / folder).mkdir(parents=True)
        shutil.copy(image, root / top / folder / image.name)
    cohort = read_cohort(root, BUILTIN_TASKS["busi"])
    assert (cohort.layout, len(cohort.files), cohort.index) == ("images", 2, None)
    assert cohort.unlabelled_because == f"the folders of {top} are not labels of task 'busi'"


def test_one_folder_holding_the_task_s_classes_is_still_refused_naming_the_dataset(tmp_path: Path) -> None:
    phantoms = write_phantoms("busi", tmp_path / "busi_SYNTHETIC", count=2, size=32).root
    root = tmp_path / "Downloads"
    (root / "mine").mkdir(parents=True)
    for label in ("benign", "malignant"):
        shutil.copytree(phantoms / label, root / "mine" / label.upper(), ignore=shutil.ignore_patterns("*_mask*"))
    with pytest.raises(DatasetError, match="holds one folder, mine, which is a folder-per-class dataset"):
        read_cohort(root, BUILTIN_TASKS["busi"])


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


@pytest.mark.parametrize("added", ["__MACOSX", "$RECYCLE.BIN", "System Volume Information"])
def test_a_folder_an_operating_system_added_beside_a_dataset_is_not_part_of_it(tmp_path: Path, added: str) -> None:
    """BUSI unzipped from an archive made on macOS holds ``__MACOSX/`` beside its classes (the
    resource forks, ``._benign (1).png`` files): the folder was taken for a class, training refused
    the dataset, and an evaluation read it as a folder of images and scored its masks as scans."""
    root = write_phantoms("busi", tmp_path / "Dataset_BUSI_with_GT", count=3, size=32, seed=2).root
    images = sorted(p for p in root.rglob("*.png") if "_mask" not in p.name)
    forks = root / added / "benign"
    forks.mkdir(parents=True)
    (forks / "._benign (1).png").write_bytes(b"\x00\x05\x16\x07SYNTHETIC resource fork")
    (forks / "benign (1).png").write_bytes(images[0].read_bytes())

    cohort = read_cohort(root, BUILTIN_TASKS["busi"])

    assert cohort.layout == "busi" and sorted(cohort.files) == images


def test_a_folder_of_images_leaves_segmentation_masks_out_and_says_so(tmp_path: Path) -> None:
    """The COVID-19 Radiography Database's four folders (not the covid task's two labels) each hold
    ``images/`` and ``masks/``: read as a folder of images, the masks were scored as scans, and
    BUSI-named masks (``x_mask.png``) too."""
    phantoms = sorted(write_phantoms("busi", tmp_path / "busi_SYNTHETIC", count=2, size=32).root.glob("benign/*).png"))
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for folder in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        for sub in ("images", "masks"):
            (root / folder / sub).mkdir(parents=True)
            shutil.copy(phantoms[0], root / folder / sub / f"{folder}-1.png")
    shutil.copy(phantoms[1], root / "Normal" / "images" / "Normal-2_mask.png")

    cohort = read_cohort(root, BUILTIN_TASKS["covid"])

    assert cohort.layout == "images"
    assert [cohort.relative(f) for f in cohort.files] == [
        "COVID/images/COVID-1.png",
        "Lung_Opacity/images/Lung_Opacity-1.png",
        "Normal/images/Normal-1.png",
        "Viral Pneumonia/images/Viral Pneumonia-1.png",
    ]
    assert cohort.warnings == ("5 segmentation mask(s) left out (in masks/ folders, or named *_mask.png): not inputs",)


@pytest.mark.parametrize("layout", ["busi", "idc", "folder-per-class"])
def test_an_image_where_a_folder_layout_reads_none_is_named_as_left_out_never_dropped_unsaid(
    tmp_path: Path, layout: str
) -> None:
    """An image at the dataset's top, or in an IDC patient's folder beside 0/ and 1/, was scored by no
    run and named in no summary: the cohort shrank, its audit's n with it, without a word."""
    case = LAYOUT_CASES[layout](tmp_path / "data")
    some_image = case.path / sorted(case.files)[0]
    strays = [case.path / "stray.png"]
    copied = case.path / "copy_of_the_dataset"  # IDC's archive holds one: named once, by its folder
    if layout == "idc":
        patient = some_image.parent.parent
        strays += [patient / "stray.png", patient / "2" / "x1_y1_class2.png"]
        shutil.copytree(patient, copied / patient.name)
    for stray in strays:
        stray.parent.mkdir(exist_ok=True)
        shutil.copyfile(some_image, stray)

    cohort = read_cohort(case.path, BUILTIN_TASKS[case.task])

    assert cohort.layout == layout
    assert {cohort.relative(f) for f in cohort.files} == case.files
    assert cohort.index is not None
    left_out = {cohort.relative(s.path): s.reason for s in cohort.index.skipped}
    folders = {cohort.relative(copied)} if layout == "idc" else set()
    assert set(left_out) == {cohort.relative(s) for s in strays} | folders
    assert all(f"not read as part of the {layout} dataset" in why for why in left_out.values())
    for folder in folders:
        patches = len(list(copied.rglob("*.png")))
        assert left_out[folder].startswith(f"a folder of {patches} images, none in a patient's 0/ or 1/ folder")
    assert all(s.by_rule for s in cohort.index.skipped)  # not the dataset's fault: no share of its 5%
