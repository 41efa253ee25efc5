"""Near-duplicates: the copies BUSI phantoms plant are found, distinct images are not grouped, and a
DICOM file hashes like the PNG of the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom, write_png

from meddaemon.training import nearduplicates
from meddaemon.training.images import image_files
from meddaemon.training.nearduplicates import hamming, hash_files, near_duplicate_groups
from meddaemon.training.phantoms import PhantomSet


def test_planted_near_duplicates_are_grouped_and_distinct_images_are_not(phantoms: dict[str, PhantomSet]) -> None:
    written = phantoms["busi"]
    images = [p for p in image_files(written.root) if "_mask" not in p.name]
    groups = near_duplicate_groups(hash_files(images))
    grouped = [{p.relative_to(written.root).as_posix() for p in g.members} for g in groups]
    planted = {name for pair in written.near_duplicates for name in pair}
    assert written.near_duplicates
    for original, copy in written.near_duplicates:
        assert any({original, copy} <= g for g in grouped), (original, copy)
    assert set().union(*grouped) == planted


def test_a_dicom_file_hashes_like_the_png_of_its_pixels(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, size=(64, 64), dtype=np.uint8)
    arr[20:40, 10:30] = 255
    hashes = hash_files([write_png(tmp_path / "a.png", arr), write_dicom(tmp_path / "a.dcm", pixels=arr)])
    assert len(set(hashes.values())) == 1
    assert len(near_duplicate_groups(hashes, max_distance=0)) == 1


def test_grouping_in_blocks_finds_what_comparing_every_pair_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    hashes = [int(h) for h in rng.integers(0, 2**63, size=60, dtype=np.int64)]
    hashes += [h ^ (1 << int(b)) for h, b in zip(hashes[:15], rng.integers(0, 64, 15), strict=True)]
    keyed = {Path(f"{i}.png"): h for i, h in enumerate(hashes)}
    close = {frozenset((a, b)) for a in keyed for b in keyed if a != b and hamming(keyed[a], keyed[b]) <= 8}
    monkeypatch.setattr(nearduplicates, "_CELLS_PER_BLOCK", 7 * len(keyed))  # 7 rows a block
    groups = near_duplicate_groups(keyed, max_distance=8)
    assert {frozenset(g.members) for g in groups} == close
