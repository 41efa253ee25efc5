"""Listing a folder of images, as ``medcli evaluate PATH`` does before anything is read (issue 15).

``image_files`` (one ``os.scandir`` a folder) against the listing it replaced (``rglob``, the paths
sorted, ``is_file`` on each), on the same tree of SYNTHETIC empty ``.png`` files (listing never opens
an image), laid out as NIH ChestX-ray14's ``images_001/images/`` ... folders, with a notes file per
folder. Both orders are checked equal; rounds alternate; wall and CPU seconds (user + system), best
of the rounds, each listing after a warm one so that the directory entries are in the page cache.

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


def timed(listing: Callable[[], list[Path]]) -> tuple[float, float, list[Path]]:
    listing()
    cpu, wall = time.process_time(), time.perf_counter()
    paths = listing()
    return time.perf_counter() - wall, time.process_time() - cpu, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cohort-listing-"))
    try:
        write_tree(root, args.files)
        best: dict[str, tuple[float, float]] = {}
        contenders: dict[str, Callable[[], list[Path]]] = {
            "image_files (os.scandir)": lambda: list(image_files(root)),
            "rglob, sorted, is_file": lambda: rglob_listing(root),
        }
        for round_ in range(args.rounds):
            order = list(contenders.items()) if round_ % 2 == 0 else list(reversed(contenders.items()))
            listed = []
            for name, listing in order:
                wall, cpu, paths = timed(listing)
                listed.append(paths)
                previous = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(previous[0], wall), min(previous[1], cpu))
            assert listed[0] == listed[1] and len(listed[0]) == args.files, "the listings differ"
        print(f"{args.files} files in {len(os.listdir(root))} folders, best of {args.rounds} rounds")
        print("| listing | wall (s) | CPU (s) | us a file |\n|---|---:|---:|---:|")
        for name, (wall, cpu) in best.items():
            print(f"| {name} | {wall:.3f} | {cpu:.3f} | {1e6 * wall / args.files:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
