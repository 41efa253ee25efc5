"""Near-duplicate images by perceptual hash (imagehash's DCT pHash, 64 bits), grouped within a
Hamming distance. BUSI holds the same lesion in several files (re-exports, crops, one filed under
two classes); a split that puts such a pair on both sides scores a model on what it was trained on.

Every pair is compared (vectorised in blocks, ``numpy.bitwise_count`` over the XOR of packed
hashes): exact and simple; ChestX-ray14's 112,120 images make 6 * 10^9 comparisons.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from meddaemon.training.images import read_image
from meddaemon.training.unionfind import DisjointSets

#: Hamming distance (of 64 bits) at or under which two images count as the same picture.
DEFAULT_MAX_DISTANCE = 8
#: Distances computed at once (8 bytes each for the XOR): about 128 MiB.
_CELLS_PER_BLOCK = 1 << 24


def perceptual_hash(pixels: np.ndarray) -> int:
    """The 64-bit pHash of a decoded image (float32 in [0, 1], grey or RGB), as an integer."""
    grey = pixels if pixels.ndim == 2 else pixels.mean(axis=-1)
    image = Image.fromarray(np.rint(np.clip(grey, 0, 1) * 255).astype(np.uint8))
    bits = imagehash.phash(image).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_files(paths: Iterable[Path]) -> dict[Path, int]:
    """pHash of every file, decoded the way the daemon decodes it (DICOM and raster alike)."""
    return {path: perceptual_hash(read_image(path)) for path in paths}


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class NearDuplicateGroup:
    """Two or more images within ``max_distance`` of each other, directly or through a chain."""

    members: tuple[Path, ...]
    max_distance: int


def near_duplicate_groups(
    hashes: dict[Path, int], max_distance: int = DEFAULT_MAX_DISTANCE
) -> list[NearDuplicateGroup]:
    """Connected components of the "within ``max_distance``" graph, largest first; singletons left out."""
    paths = list(hashes)
    packed = np.array([hashes[p] for p in paths], dtype=np.uint64)
    sets = DisjointSets(len(paths))
    for pair in _close_pairs(packed, max_distance):
        sets.union(pair)
    groups = [
        NearDuplicateGroup(tuple(sorted(paths[i] for i in members)), max_distance)
        for members in sets.groups()
        if len(members) > 1
    ]
    return sorted(groups, key=lambda g: (-len(g.members), g.members))


def _close_pairs(packed: np.ndarray, max_distance: int) -> Sequence[tuple[int, int]]:
    """Index pairs (i < j) within ``max_distance``, comparing a block of rows with the rows from
    that block on, so that no more than ``_CELLS_PER_BLOCK`` distances are held at once."""
    pairs: list[tuple[int, int]] = []
    rows_per_block = max(1, _CELLS_PER_BLOCK // max(len(packed), 1))
    for start in range(0, len(packed), rows_per_block):
        block = packed[start : start + rows_per_block]
        distances = np.bitwise_count(block[:, None] ^ packed[None, start:])
        rows, cols = np.nonzero(distances <= max_distance)
        pairs.extend((start + int(r), start + int(c)) for r, c in zip(rows, cols, strict=True) if r < c)
    return pairs
