"""A Grad-CAM map as it is kept: on the grid the model computed it on, and at the input's size on read.

Grad-CAM's map is a weighted sum of the target layer's activation, ``h x w`` cells (7 x 7 for a
224 x 224 input to mobilenet_v2 or DenseNet-121); pytorch-grad-cam then resizes it to the input's
``H x W`` and normalises it again. Everything past the grid is a fixed function of the grid, so the
engine returns the grid (ReLU'd and min-max normalised: 196 bytes as float32), the daemon keeps it
in the heatmap's database row as ``.npy`` bytes (``grid_bytes``), and readers make the map at the
input's size from it with ``read_map``. A map of 224 x 224 was a 200 KB ``.npy`` file a scan,
and a file and a folder per scan to create cost the daemon about 1 ms of a scan's CPU
(benchmarks/README.md, issue 16); drawing the map from its grid costs a reader about 0.1 ms.

Only numpy: the web console and the report processes read maps without importing torch.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


def expand(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps (N, H, W) float32 in [0, 1] from grids (N, h, w): pytorch-grad-cam's resize and second
    normalisation, bilinear (``cv2.resize`` INTER_LINEAR, ``F.interpolate(mode="bilinear",
    align_corners=False)``), then ReLU and per-map min-max. A grid already of ``size`` is returned
    as it is (maps stored at the input's size before grids were kept)."""
    grids = np.asarray(grids, dtype=np.float32)
    if grids.shape[1:] == tuple(size):
        return grids
    rows = _bilinear_weights(grids.shape[1], size[0])
    columns = _bilinear_weights(grids.shape[2], size[1])
    maps = (rows @ grids.astype(np.float64) @ columns.T).astype(np.float32)
    np.maximum(maps, 0, out=maps)
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True) + np.float32(EPS)
    return maps


def expand_one(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One map (H, W) from one grid (h, w); see ``expand``."""
    return expand(np.asarray(grid)[None], size)[0]


@functools.lru_cache(maxsize=32)
def _bilinear_weights(source: int, target: int) -> np.ndarray:
    """(target, source): row ``i`` interpolates output pixel ``i`` from its two nearest source cells,
    PyTorch's ``area_pixel_compute_source_index`` with ``align_corners=False``."""
    weights = np.zeros((target, source), np.float64)
    scale = source / target
    for i in range(target):
        position = max(scale * (i + 0.5) - 0.5, 0.0)
        low = min(int(position), source - 1)
        high = min(low + 1, source - 1)
        fraction = position - low
        weights[i, low] += 1.0 - fraction
        weights[i, high] += fraction
    weights.setflags(write=False)
    return weights


def grid_bytes(grid: np.ndarray) -> bytes:
    """``grid`` as the bytes of a float32 ``.npy`` file, what ``np.save`` writes of it."""
    grid = np.ascontiguousarray(grid, dtype=np.float32)
    return _npy_header(grid.shape) + grid.tobytes()


@functools.lru_cache(maxsize=16)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(np.empty(shape, np.float32)))
    return buffer.getvalue()


def map_is_flat(stored: bytes | Path) -> bool:
    """Whether a stored map marks no part of the image over another once read (``expand``'s ReLU
    and min-max): zero everywhere, as Grad-CAM gives a class no part of the image raised, or one
    value. Its overlay is the bare scan, which read as a map without a word. A map that cannot be
    read is not called flat (its overlay is said to be missing)."""
    try:
        grid = np.load(io.BytesIO(stored) if isinstance(stored, bytes) else stored, allow_pickle=False)
        kept = np.clip(np.asarray(grid, dtype=np.float64), 0.0, None)
    except Exception:  # an empty row (EOFError), an array of text (a type error): damage, said elsewhere
        return False
    return bool(kept.size) and bool(np.all(np.isfinite(kept))) and float(kept.max()) <= float(kept.min())


def read_map(stored: bytes | Path, size: tuple[int, int]) -> np.ndarray:
    """A stored map at ``size`` (H, W), float32: ``stored`` is the heatmap row's grid (``.npy``
    bytes), or the ``.npy`` file of a row an earlier version wrote (its grid, or the whole map).
    ``OSError`` when the file cannot be read, ``ValueError`` when it is not a 2-D ``.npy`` of finite
    numbers (never unpickled)."""
    grid = np.load(io.BytesIO(stored) if isinstance(stored, bytes) else stored, allow_pickle=False)
    if grid.ndim != 2:
        raise ValueError(f"the stored map is a {grid.ndim}-D array, not a map")
    if not np.isfinite(grid).all():
        raise ValueError("the stored map holds values that are not finite numbers")
    return expand_one(grid, size)
