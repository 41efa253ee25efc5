"""Pixel values to [0, 1], the last step of every decoder, and the lookup tables DICOM maps them with."""

from __future__ import annotations

import numpy as np

_FLOAT32_SAFE = float(np.finfo(np.float32).max) / 4


def unit_range(values: np.ndarray, low: float, high: float, in_place: bool = False) -> np.ndarray:
    """Map [low, high] linearly to [0, 1] (clipped), float32; NaN takes the low end; a flat or
    infinite range gives zeros. ``in_place``: ``values`` (float32) is the result, no copy is made."""
    if not np.isfinite(low) or not np.isfinite(high) or high == low:
        if in_place:
            values[...] = 0.0
            return values
        return np.zeros(values.shape, dtype=np.float32)
    if in_place:
        unit = values
        unit -= np.float32(low)
        unit /= np.float32(high - low)
    elif max(abs(low), abs(high), high - low) > _FLOAT32_SAFE:
        # beyond float32 the range became infinite and every pixel 0
        unit = ((values.astype(np.float64) - low) / (high - low)).astype(np.float32)
    else:
        unit = (values.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    np.nan_to_num(unit, copy=False, nan=0.0)
    return np.clip(unit, 0.0, 1.0, out=unit)


def finite_range(values: np.ndarray) -> tuple[float, float]:
    """The smallest and largest finite values (0, 0 when there is none). A plain min-max of float
    pixel data holding one NaN or infinity is not finite, and the whole image came out black."""
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    return float(values.min()), float(values.max())


def min_max(values: np.ndarray) -> np.ndarray:
    """[0, 1] from the finite values' own range."""
    return unit_range(values, *finite_range(values))


def look_up(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """``table[value - first]`` (PS3.3 C.11.1.1.1, C.11.2.1.1, C.7.6.3.1.5): values below ``first``
    take the first entry, values past the last entry the last one. The index is int64 whatever the
    entries' width: pydicom 3.0 indexes with the entries' own type, so a VOI LUT of 4096 8-bit entries
    wrapped every value modulo 256, and it cannot index 10- to 15-bit entries at all (``uint12``)."""
    if values.dtype.kind == "f":
        values = np.rint(values)
    rows = np.clip(values.astype(np.int64) - first, 0, len(table) - 1)
    return table[rows]
