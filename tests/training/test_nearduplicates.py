"""Near-duplicates: the copies BUSI phantoms plant are found, distinct images are not grouped, and a
DICOM file hashes like the PNG of the same pixels."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom, write_png

from meddaemon.training import nearduplicates
from meddaemon.training.images import image_files, read_image
from meddaemon.training.nearduplicates import (
    hamming,
    hash_files,
    hash_images,
    near_duplicate_groups,
    perceptual_hash,
)
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


def chain(length: int, step_bits: int = 2, seed: int = 12) -> dict[Path, int]:
    """SYNTHETIC hashes a~b~c~...: each ``step_bits`` new bits from the one before, so neighbours
    are ``step_bits`` apart and the ends ``step_bits * (length - 1)`` (capped by the 64 bits)."""
    current = int(np.random.default_rng(seed).integers(0, 2**63))
    hashes = {}
    for k in range(length):
        hashes[Path(f"chain_{k:02d}.png")] = current
        for bit in range(step_bits):
            current ^= 1 << ((step_bits * k + bit) % 64)
    return hashes


def test_a_chain_of_near_neighbours_does_not_become_one_group() -> None:
    hashes = chain(26)  # a~b~...~z, each 2 bits from the next, a and z 50 bits apart
    assert all(hamming(hashes[a], hashes[b]) <= 8 for a, b in zip(list(hashes), list(hashes)[1:], strict=False))

    groups = near_duplicate_groups(hashes, max_distance=8)

    assert max(len(g.members) for g in groups) <= 5  # 5 consecutive links span 8 bits
    for group in groups:
        assert all(hamming(hashes[a], hashes[b]) <= 8 for a in group.members for b in group.members)
        assert group.diameter == max(hamming(hashes[a], hashes[b]) for a in group.members for b in group.members)
    assert len(groups) >= 26 // 5


def test_copies_of_one_picture_among_a_chain_and_strangers_are_one_group() -> None:
    rng = np.random.default_rng(3)
    original = int(rng.integers(0, 2**63))
    copies = {Path(f"copy_{k}.png"): original ^ (1 << k) ^ (1 << (k + 20)) for k in range(4)}  # 2-4 bits apart
    strangers = {Path(f"stranger_{k}.png"): int(h) for k, h in enumerate(rng.integers(0, 2**63, 40))}
    hashes = {Path("original.png"): original, **copies, **strangers, **chain(20, seed=4)}

    groups = near_duplicate_groups(hashes, max_distance=8)

    assert {Path("original.png"), *copies} in [set(g.members) for g in groups]
    assert not any(p in g.members for g in groups for p in strangers)


def test_grouping_three_thousand_images_takes_seconds() -> None:
    rng = np.random.default_rng(8)
    walk = int(rng.integers(0, 2**63))
    hashes = {}
    for k in range(1000):  # a random walk, one bit a step: one component of 1,000 under union-find
        walk ^= 1 << int(rng.integers(0, 64))
        hashes[Path(f"walk_{k:04d}.png")] = walk
    for k in range(2000):
        hashes[Path(f"other_{k:04d}.png")] = int(rng.integers(0, 2**63))
    started = time.perf_counter()

    groups = near_duplicate_groups(hashes, max_distance=8)

    assert time.perf_counter() - started < 20
    assert max(g.diameter for g in groups) <= 8
    assert max(len(g.members) for g in groups) < 50


def test_hashing_in_worker_processes_gives_what_hashing_one_by_one_gives(
    phantoms: dict[str, PhantomSet], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nearduplicates, "MIN_IMAGES_PER_WORKER", 8)  # the phantoms are a few dozen images
    root = shutil.copytree(phantoms["busi"].root, tmp_path / "busi")
    broken = root / "benign" / "synthetic_broken.png"
    broken.write_bytes(b"not a png")
    paths = [p for p in image_files(root) if "_mask" not in p.name]
    assert broken in paths and len(paths) >= 2 * nearduplicates.MIN_IMAGES_PER_WORKER  # so that two workers run
    seen: list[tuple[int, int]] = []

    parallel = hash_images(paths, workers=2, progress=lambda done, total: seen.append((done, total)))
    serial = hash_images(paths, workers=1)

    assert list(parallel.hashes.items()) == list(serial.hashes.items())
    assert parallel.hashes == {p: perceptual_hash(read_image(p)) for p in paths if p != broken}
    assert list(parallel.unreadable) == [broken]
    assert parallel.unreadable[broken].reason is serial.unreadable[broken].reason
    assert seen == [(k, len(paths)) for k in range(1, len(paths) + 1)]
