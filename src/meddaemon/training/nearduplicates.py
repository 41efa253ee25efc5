"""Near-duplicate images by perceptual hash (imagehash's DCT pHash, 64 bits), grouped within a
Hamming distance. BUSI holds the same lesion in several files (re-exports, crops, one filed under
two classes); a split that puts such a pair on both sides scores a model on what it was trained on.

Every pair is compared (vectorised in blocks, ``numpy.bitwise_count`` over the XOR of packed
hashes): exact and simple; ChestX-ray14's 112,120 images make 6 * 10^9 comparisons. Groups are
complete-linkage clusters (every two members within the distance), not chains.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform

from meddaemon.engine.tasks import InputContract
from meddaemon.failures import ScanFailure, kept
from meddaemon.processes import leave_stopping_to_the_parent
from meddaemon.training.images import decode_file, key_frame, read_image

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


#: Below this many images a worker process costs more to start than it saves: a forkserver pool of
#: two took 0.75 s to start on a quiet 2-core machine, where one process hashed a 500x600 PNG in
#: 5 ms (64 of them: 0.32 s alone, 0.85 s in two workers). At 16, retraining on a few dozen images
#: started a pool for each hashing pass (2 s a run under load).
MIN_IMAGES_PER_WORKER = 128

#: Called after each image is hashed with (images hashed, images in all).
HashProgress = Callable[[int, int], None]


@dataclass
class HashedImages:
    """The pHash of every image that decodes, and why each of the others does not."""

    hashes: dict[Path, int]
    unreadable: dict[Path, ScanFailure]


def hash_images(
    paths: Sequence[Path],
    *,
    contract: InputContract | None = None,
    workers: int = 1,
    progress: HashProgress | None = None,
) -> HashedImages:
    """pHash every image, decoded the way the daemon decodes it, in up to ``workers`` processes.
    With ``contract``, an image the model could not take (``contract_mismatch``: a colour image
    for a grey model, a side under its minimum) is one of the failures, as the daemon fails it:
    found only when its batch came, it stopped the training mid-epoch.

    Each image is decoded once, in its own worker (pydicom's configuration is process-global), and
    the results come back in the order of ``paths``: the same as hashing them one after another.
    """
    outcomes: Iterable[tuple[int | None, ScanFailure | None]]
    pool_size = min(workers, len(paths) // MIN_IMAGES_PER_WORKER)
    hashed = HashedImages({}, {})
    hash_one = functools.partial(_hash_or_failure, contract=contract)
    if pool_size <= 1:
        outcomes = map(hash_one, paths)
        _collect(paths, outcomes, hashed, progress)
        return hashed
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(pool_size, mp_context=context, initializer=_init_worker) as pool:
        chunk = max(1, min(64, len(paths) // (pool_size * 8)))
        _collect(paths, pool.map(hash_one, paths, chunksize=chunk), hashed, progress)
    return hashed


def _collect(
    paths: Sequence[Path],
    outcomes: Iterable[tuple[int | None, ScanFailure | None]],
    hashed: HashedImages,
    progress: HashProgress | None,
) -> None:
    for done, (path, (value, failure)) in enumerate(zip(paths, outcomes, strict=True), start=1):
        if failure is not None:
            hashed.unreadable[path] = failure
        elif value is not None:
            hashed.hashes[path] = value
        if progress is not None:
            progress(done, len(paths))


def _hash_or_failure(path: Path, contract: InputContract | None = None) -> tuple[int | None, ScanFailure | None]:
    try:
        scan = decode_file(path)
        if contract is not None:
            from meddaemon.engine.preprocess import check_contract  # torch with it: only where it is asked

            check_contract(scan, contract)
        return perceptual_hash(key_frame(scan)), None
    except ScanFailure as failure:
        return None, kept(failure)


def _init_worker() -> None:
    """Ctrl-C goes to the parent, which stops the pool."""
    leave_stopping_to_the_parent()


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class NearDuplicateGroup:
    """Two or more images every two of which are within ``max_distance`` of each other."""

    members: tuple[Path, ...]
    max_distance: int
    #: the largest distance between two members (the group's diameter), at most ``max_distance``
    diameter: int = 0


def near_duplicate_groups(
    hashes: Mapping[Path, int], max_distance: int = DEFAULT_MAX_DISTANCE
) -> list[NearDuplicateGroup]:
    """Complete-linkage clusters cut at ``max_distance``, largest first; singletons left out.

    Grouping by "within ``max_distance`` of some member" (union-find) chains: a~b, b~c, ... y~z
    puts a and z together however far apart they are, and on 3,000 look-alike chest X-rays one
    group swallowed 182 images. Complete linkage keeps every two members of a group within
    ``max_distance``, so a group is one picture's copies, never a chain. It runs on each connected
    component of the "within ``max_distance``" graph (most are a few images); a component larger than
    ``MAX_LINKAGE_IMAGES`` is first cut into the components of a tighter distance.
    """
    paths = sorted(hashes)
    packed = np.array([hashes[p] for p in paths], dtype=np.uint64)
    clusters = _complete_linkage(packed, np.arange(len(paths)), max_distance)
    groups = [
        NearDuplicateGroup(tuple(paths[i] for i in members), max_distance, _diameter(packed[members]))
        for members in clusters
        if len(members) > 1
    ]
    return sorted(groups, key=lambda g: (-len(g.members), g.members))


#: Largest component clustered at once (its distance matrix: 8 bytes per pair, 64 MiB at 4,000).
MAX_LINKAGE_IMAGES = 4000


def _complete_linkage(packed: np.ndarray, items: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """Clusters of ``items`` (indices into ``packed``) whose members are all within ``max_distance``."""
    clusters: list[np.ndarray] = []
    for component in _components(packed[items], max_distance):
        members = items[component]
        if len(members) == 1 or max_distance <= 0:
            clusters.append(members)
        elif len(members) > MAX_LINKAGE_IMAGES:
            clusters.extend(_complete_linkage(packed, members, max_distance - 1))
        else:
            distances = np.bitwise_count(packed[members, None] ^ packed[None, members]).astype(np.float64)
            tree = linkage(squareform(distances, checks=False), method="complete")
            labels = fcluster(tree, t=max_distance, criterion="distance")
            clusters.extend(members[labels == label] for label in np.unique(labels))
    return clusters


def _components(packed: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """Index arrays of the connected components of the "within ``max_distance``" graph."""
    rows, cols = _close_pairs(packed, max_distance)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(packed), len(packed)))
    count, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=count))[:-1])


def _diameter(packed: np.ndarray) -> int:
    return int(np.bitwise_count(packed[:, None] ^ packed[None, :]).max())


def _close_pairs(packed: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) within ``max_distance``, comparing a block of rows with the rows from
    that block on, so that no more than ``_CELLS_PER_BLOCK`` distances are held at once."""
    all_rows: list[np.ndarray] = []
    all_cols: list[np.ndarray] = []
    rows_per_block = max(1, _CELLS_PER_BLOCK // max(len(packed), 1))
    for start in range(0, len(packed), rows_per_block):
        block = packed[start : start + rows_per_block]
        distances = np.bitwise_count(block[:, None] ^ packed[None, start:])
        rows, cols = np.nonzero(distances <= max_distance)
        upper = rows < cols
        all_rows.append(start + rows[upper])
        all_cols.append(start + cols[upper])
    if not all_rows:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)
    return np.concatenate(all_rows), np.concatenate(all_cols)
