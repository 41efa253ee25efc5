"""Phantoms: each is written in its dataset's published layout, read back by that layout's adapter
with the counts, labels and patients it was written with, marked SYNTHETIC, and reproducible."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddaemon.engine.tasks import BUILTIN_TASKS, NIH_FINDINGS
from meddaemon.training.datasets import detect_layout, load_dataset
from meddaemon.training.phantoms import NIH_ENTRY_HEADER, PhantomSet, write_phantoms
from meddaemon.training.splits import make_split

LAYOUTS = {"busi": "busi", "chestxray14": "nih-chestxray14", "covid": "covid-chestxray", "histopathology": "idc"}


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_each_phantom_is_read_back_by_its_adapter(phantoms: dict[str, PhantomSet], task: str) -> None:
    written = phantoms[task]
    assert detect_layout(written.root) == LAYOUTS[task]
    index = load_dataset(written.root, BUILTIN_TASKS[task])
    assert index.labels == BUILTIN_TASKS[task].labels
    assert not [s for s in index.skipped if "unreadable" in s.reason]
    if task == "chestxray14":
        assert len(index.samples) == written.images
        assert index.counts() == written.per_label
        assert index.patients() == written.patients
    elif task == "histopathology":
        assert index.counts() == {"idc_negative": written.per_label["0"], "idc_positive": written.per_label["1"]}
        assert index.patients() == written.patients
    else:
        assert index.counts() == {label: written.per_label[label] for label in index.labels}


def test_busi_phantom_has_the_published_names_masks_and_second_masks(phantoms: dict[str, PhantomSet]) -> None:
    root = phantoms["busi"].root
    assert (root / "benign" / "benign (1).png").is_file()
    assert (root / "benign" / "benign (1)_mask.png").is_file()
    assert list(root.glob("*/* (*)_mask_1.png"))
    index = load_dataset(root, BUILTIN_TASKS["busi"])
    assert all(s.masks and "_mask" not in s.path.name for s in index.samples)
    mask = Image.open(index.samples[0].masks[0])
    assert mask.size == Image.open(index.samples[0].path).size
    assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}


def test_chestxray14_phantom_has_the_published_csvs_and_patient_wise_lists(phantoms: dict[str, PhantomSet]) -> None:
    root = phantoms["chestxray14"].root
    with open(root / "Data_Entry_2017.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == NIH_ENTRY_HEADER
    assert all(len(r) == len(NIH_ENTRY_HEADER) for r in rows)
    assert any("|" in r[1] for r in rows[1:]) and any(r[1] == "No Finding" for r in rows[1:])
    index = load_dataset(root, BUILTIN_TASKS["chestxray14"])
    assert set(index.counts()) == {*NIH_FINDINGS, "No Finding"}
    assert all(index.counts()[f] > 0 for f in NIH_FINDINGS)  # 60 images: every finding drawn at least once
    boxed = [s for s in index.samples if s.labels]
    assert all({b.label for b in s.boxes} == set(s.labels) for s in boxed)
    assert index.official_test
    test_patients = {s.patient_id for s in index.samples if s.path in index.official_test}
    train_patients = {s.patient_id for s in index.samples if s.path not in index.official_test}
    assert test_patients and not test_patients & train_patients


def test_covid_phantom_lists_rows_the_task_leaves_out(phantoms: dict[str, PhantomSet]) -> None:
    index = load_dataset(phantoms["covid"].root, BUILTIN_TASKS["covid"])
    reasons = sorted(s.reason for s in index.skipped)
    assert sorted(d.reason for d in make_split(index).report.dropped) == reasons
    assert len(reasons) == 3
    assert sum("neither COVID-19 nor No Finding" in r for r in reasons) == 2
    assert any("view 'L'" in r for r in reasons)
    assert all(s.path.name.startswith("synthetic_") for s in index.samples)


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_every_phantom_is_marked_synthetic(phantoms: dict[str, PhantomSet], task: str) -> None:
    root = phantoms[task].root
    assert "SYNTHETIC" in (root / "README.txt").read_text()
    for png in list(root.rglob("*.png"))[:20]:
        assert "SYNTHETIC" in Image.open(png).info["Comment"]


def test_the_same_seed_writes_the_same_dataset(tmp_path: Path) -> None:
    first = write_phantoms("busi", tmp_path / "a", count=3, size=48, seed=3)
    second = write_phantoms("busi", tmp_path / "b", count=3, size=48, seed=3)
    other = write_phantoms("busi", tmp_path / "c", count=3, size=48, seed=4)
    name = Path("malignant") / "malignant (2).png"
    assert (first.root / name).read_bytes() == (second.root / name).read_bytes()
    assert (first.root / name).read_bytes() != (other.root / name).read_bytes()


def test_phantoms_are_not_written_into_a_folder_that_holds_files(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_phantoms("covid", tmp_path, count=2, size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_name_another_program_took_in_the_folder_given_is_neither_replaced_nor_left_beside_half_a_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moved up entry by entry, the dataset replaced another program's README.txt written there
    meanwhile without a word, and a name it could not take (a folder of files) left the entries
    moved before it in place: half a dataset, which the next run refused as not empty."""
    from meddaemon.training import phantoms

    out = tmp_path / "given"
    out.mkdir()
    real = phantoms.write_busi

    def another_program_writes_meanwhile(root: Path, **kwargs: object) -> PhantomSet:
        written = real(root, **kwargs)
        (out / "README.txt").write_text("SYNTHETIC: another program's")
        return written

    monkeypatch.setattr(phantoms, "write_busi", another_program_writes_meanwhile)
    with pytest.raises(FileExistsError, match=r"README\.txt appeared"):
        write_phantoms("busi", out, count=2, size=32)
    assert [p.name for p in out.iterdir()] == ["README.txt"]
    assert (out / "README.txt").read_text() == "SYNTHETIC: another program's"


def test_a_dataset_moved_into_the_folder_given_is_moved_out_again_when_a_move_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "given"
    out.mkdir()
    real, calls = Path.rename, []

    def third_fails(self: Path, target: Path) -> Path:  # type: ignore[override]
        if Path(target).parent == out:
            calls.append(target)
            if len(calls) == 3:
                raise KeyboardInterrupt  # Ctrl-C between two renames
        return real(self, target)

    monkeypatch.setattr(Path, "rename", third_fails)
    with pytest.raises(KeyboardInterrupt):
        write_phantoms("busi", out, count=2, size=32)
    assert list(out.iterdir()) == []
