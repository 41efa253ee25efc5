"""Listing a folder of images, as ``medcli evaluate PATH`` does before anything is read (issue 15).

``image_files`` (one ``os.scandir`` a folder) against the listing it replaced (``rglob``, the paths
sorted, ``is_file`` on each), on the same tree of SYNTHETIC empty ``.png`` files (listing never opens
an image), laid out as NIH ChestX-ray14's ``images_001/images/`` ... folders, with a notes file per
folder. Both orders are checked equal; rounds alternate; wall and CPU seconds (user + system), best
of the rounds, each listing after a warm one so that the directory entries are in the page cache.

NIH's index (``datasets/nih.py``, ``read_nih``) is timed on the same tree, with a SYNTHETIC
``Data_Entry_2017.csv`` naming every file: as it reads now (the image folders listed once, a ``stat``
only for a row whose image no folder listed) against the same read plus the ``is_file`` on every
row's image that it made before, to find the missing ones.

    .venv/bin/python benchmarks/cohort_listing.py                      # 40,000 files, 3 rounds: about 30 s
    .venv/bin/python benchmarks/cohort_listing.py --files 112120 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from meddaemon.training.datasets.nih import read_nih
from meddaemon.training.images import image_files, is_image_file

FILES_PER_FOLDER = 10_000


def rglob_listing(folder: Path) -> list[Path]:
    """The listing before ``os.scandir`` (main at 2d3c53f)."""
    return [
        path
        for path in sorted(folder.rglob("*"))
        if is_image_file(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


def write_tree(root: Path, files: int) -> None:
    for start in range(0, files, FILES_PER_FOLDER):
        folder = root / f"images_{start // FILES_PER_FOLDER + 1:03d}" / "images"
        folder.mkdir(parents=True)
        (folder.parent / "README.txt").write_text("SYNTHETIC listing benchmark")
        for i in range(start, min(files, start + FILES_PER_FOLDER)):
            (folder / f"synthetic_{i:08d}_000.png").touch()


def write_data_entry(root: Path, files: int) -> None:
    with open(root / "Data_Entry_2017.csv", "w") as table:
        table.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n")
        for i in range(files):
            table.write(f"synthetic_{i:08d}_000.png,{'Effusion' if i % 2 else 'No Finding'},0,{i // 3},50,M,PA\n")


def nih_with_a_stat_a_row(root: Path) -> list[Path]:
    """The index as read before: every row's image checked with ``is_file`` (main at 14ed7b2)."""
    paths = [sample.path for sample in read_nih(root).samples]
    assert all(path.is_file() for path in paths)
    return paths


def timed(listing: Callable[[], list[Path]]) -> tuple[float, float, list[Path]]:
    listing()
    cpu, wall = time.process_time(), time.perf_counter()
    paths = listing()
    return time.perf_counter() - wall, time.process_time() - cpu, paths


def race(title: str, contenders: dict[str, Callable[[], list[Path]]], files: int, rounds: int) -> None:
    """Best wall and CPU seconds of each contender over ``rounds``, the order alternated."""
    best: dict[str, tuple[float, float]] = {}
    for round_ in range(rounds):
        order = list(contenders.items()) if round_ % 2 == 0 else list(reversed(contenders.items()))
        listed = []
        for name, listing in order:
            wall, cpu, paths = timed(listing)
            listed.append(paths)
            previous = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(previous[0], wall), min(previous[1], cpu))
        assert listed[0] == listed[1] and len(listed[0]) == files, "the contenders' paths differ"
    print(f"| {title} | wall (s) | CPU (s) | us a file |\n|---|---:|---:|---:|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {1e6 * wall / files:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cohort-listing-"))
    try:
        write_tree(root, args.files)
        write_data_entry(root, args.files)
        print(f"{args.files} files in {len(os.listdir(root)) - 1} folders, best of {args.rounds} rounds")
        listings: dict[str, Callable[[], list[Path]]] = {
            "image_files (os.scandir)": lambda: list(image_files(root)),
            "rglob, sorted, is_file": lambda: rglob_listing(root),
        }
        race("listing", listings, args.files, args.rounds)
        indexes: dict[str, Callable[[], list[Path]]] = {
            "read_nih": lambda: [sample.path for sample in read_nih(root).samples],
            "read_nih, is_file a row": lambda: nih_with_a_stat_a_row(root),
        }
        race("NIH index", indexes, args.files, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
