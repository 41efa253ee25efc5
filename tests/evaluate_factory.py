"""Helpers for the evaluation tests: an evaluation's world (settings and database), a listing of a
tree that shows any change to it, a tree made read-only, and a SYNTHETIC dataset in each layout
``medcli evaluate`` reads."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dicom_factory import write_png
from sqlalchemy import func, select

from meddaemon.config import Settings
from meddaemon.db.engine import create_db_engine
from meddaemon.db.models import EvaluationFile
from meddaemon.db.readonly import read_only_engine
from meddaemon.engine.tasks import InputContract
from meddaemon.training.phantoms import COVID_FINDING, NORMAL_FINDING, write_phantoms
from model_factory import CONTRACT

RGB_CONTRACT = InputContract(3, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@dataclass
class World:
    """Settings and the database of an evaluation, its model promoted there."""

    settings: Settings
    db_url: str

    def engine(self):  # type: ignore[no-untyped-def]
        return create_db_engine(self.db_url)


def read_chunk_harming_decoders(paths, contract, options, scored=None):  # type: ignore[no-untyped-def]
    """``evaluate.reading.read_chunk`` in a decoding process whose decoder harms it on some files, by
    their names: ``crash*`` kills the process (SIGKILL, as a segfault in a native decoder ends it),
    ``crash_once*`` kills it the first time only (the kernel's OOM killer under a healthy read: a
    SYNTHETIC marker ``<name>.killed`` is left beside it), ``stall*`` never ends (a decoder caught in a
    loop; a marker ``<name>.reading`` says it began)."""
    from meddaemon.evaluate.reading import read_chunk

    for path in map(Path, paths):
        killed_once = path.with_name(path.name + ".killed")
        if path.name.startswith("crash_once") and not killed_once.exists():
            killed_once.write_text("SYNTHETIC marker: this file's first read was killed\n")
            os.kill(os.getpid(), signal.SIGKILL)
        elif path.name.startswith("crash") and not path.name.startswith("crash_once"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif path.name.startswith("stall"):
            path.with_name(path.name + ".reading").write_text("SYNTHETIC marker: its read has begun\n")
            while True:
                time.sleep(1)
    return read_chunk(paths, contract, options, scored)


def files_written(db_url: str) -> int:
    """How many files evaluations have written to the database so far, read while a run writes: on
    a read-only connection, so the poll takes no write lock from the run it watches (a write-lock
    read could wait out the run under load and see its files only at the end); 0 before the table
    exists."""
    engine = read_only_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(EvaluationFile)) or 0)
    except Exception:
        return 0
    finally:
        engine.dispose()


def listing(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """Every entry under ``root``: mode, inode, size, mtime (ns) and the SHA-256 of a file's bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[path.relative_to(root).as_posix()] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, digest)
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, "")
    return out


@contextmanager
def read_only(tree: Path) -> Iterator[None]:
    """``tree`` with every write permission taken away, given back afterwards (for tmp_path's cleanup)."""
    paths = [tree, *tree.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


@dataclass(frozen=True)
class LayoutCase:
    """A dataset in one layout, written as SYNTHETIC files: the PATH ``medcli evaluate`` is given,
    the tree that holds everything it reads, and what an evaluation must find there, worked out from
    what was written rather than by the adapters under test."""

    task: str
    path: Path
    tree: Path
    #: the files an evaluation scores, relative to the layout's root (a manifest's folder)
    files: frozenset[str]
    #: per label of the task: how many scored files carry it
    positives: dict[str, int]
    patients: int | None = None
    #: the input contract of the model that scores it (the IDC patches are colour)
    contract: InputContract = CONTRACT


def busi_case(out: Path) -> LayoutCase:
    phantoms = write_phantoms("busi", out / "Dataset_BUSI_with_GT", count=2, size=48)
    images = [p for p in phantoms.root.rglob("*.png") if "_mask" not in p.name]
    return LayoutCase("busi", phantoms.root, phantoms.root, _names(images, phantoms.root), phantoms.per_label)


def nih_case(out: Path) -> LayoutCase:
    """Data_Entry_2017.csv names the findings; patients have several images."""
    phantoms = write_phantoms("chestxray14", out / "nih", count=12, size=48)
    images = phantoms.root.glob("images/*.png")
    positives = {k: v for k, v in phantoms.per_label.items() if k != "No Finding"}
    return LayoutCase("chestxray14", phantoms.root, phantoms.root, _names(images, phantoms.root), positives,
                      patients=phantoms.patients)  # fmt: skip


def covid_case(out: Path) -> LayoutCase:
    """metadata.csv also names bacterial pneumonias and a lateral view, which the covid task leaves out."""
    phantoms = write_phantoms("covid", out / "covid-chestxray-dataset", count=2, size=48)
    with open(phantoms.root / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if r["finding"] in (COVID_FINDING, NORMAL_FINDING) and r["view"] in ("PA", "AP")]
    assert len(kept) == len(rows) - phantoms.extra["left_out"]
    files = frozenset(f"{r['folder']}/{r['filename']}" for r in kept)
    positives = {"normal": sum(r["finding"] == NORMAL_FINDING for r in kept)}
    positives["covid"] = len(kept) - positives["normal"]
    return LayoutCase("covid", phantoms.root, phantoms.root, files, positives,
                      patients=len({r["patientid"] for r in kept}))  # fmt: skip


def idc_case(out: Path) -> LayoutCase:
    """``<patient>/0/`` and ``<patient>/1/`` folders of 50x50 colour patches."""
    phantoms = write_phantoms("histopathology", out / "IDC_regular_ps50_idx5", count=3)
    images = list(phantoms.root.rglob("*.png"))
    positives = {"idc_negative": phantoms.per_label["0"], "idc_positive": phantoms.per_label["1"]}
    return LayoutCase("histopathology", phantoms.root, phantoms.root, _names(images, phantoms.root), positives,
                      patients=phantoms.patients, contract=RGB_CONTRACT)  # fmt: skip


def folder_per_class_case(out: Path) -> LayoutCase:
    """A folder per label of the busi task, in capitals, with no masks: not BUSI as published."""
    root = out / "ultrasound_by_class"
    counts = {"benign": 3, "malignant": 2, "normal": 1}
    for n, (label, count) in enumerate(counts.items()):
        for i in range(count):
            _write_image(root / label.upper() / f"scan_{i}.png", seed=10 * n + i)
    return LayoutCase("busi", root, root, _names(root.rglob("*.png"), root), counts)


def manifest_case(out: Path) -> LayoutCase:
    """labels.csv (path,label,patient_id) beside the folder of images it names, in nested folders;
    one image in that folder is not in the manifest and is not scored."""
    root = out / "cohort"
    rows = [("scans/a/1.png", "benign", "p1"), ("scans/a/2.png", "malignant", "p1"), ("scans/b/3.png", "normal", "p2"),
            ("scans/b/4.png", "benign", "p3"), ("scans/5.png", "normal", "p3")]  # fmt: skip
    for i, (name, _, _) in enumerate(rows):
        _write_image(root / name, seed=i)
    _write_image(root / "scans" / "not_listed.png", seed=99)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("path", "label", "patient_id"), *rows])
    positives = {label: sum(r[1] == label for r in rows) for label in ("benign", "malignant", "normal")}
    return LayoutCase("busi", root / "labels.csv", root, frozenset(r[0] for r in rows), positives,
                      patients=len({r[2] for r in rows}))  # fmt: skip


#: layout name (as the evaluation reports it) -> its writer
LAYOUT_CASES: dict[str, Callable[[Path], LayoutCase]] = {
    "busi": busi_case,
    "nih-chestxray14": nih_case,
    "covid-chestxray": covid_case,
    "idc": idc_case,
    "folder-per-class": folder_per_class_case,
    "manifest": manifest_case,
}


def _names(paths: Iterable[Path], root: Path) -> frozenset[str]:
    return frozenset(p.relative_to(root).as_posix() for p in paths)


def _write_image(path: Path, seed: int) -> None:
    """A SYNTHETIC 40x48 grey PNG of noise."""
    write_png(path, np.random.default_rng(seed).integers(0, 255, (40, 48), dtype=np.uint8))
