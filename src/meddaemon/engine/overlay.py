"""Heatmap overlays: the scan as the model saw it, with the map blended on top in a jet colour scale."""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from meddaemon.engine.tasks import InputContract


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue, cyan, yellow, red) for values in [0, 1]: uint8 (..., 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def model_view(model_input: np.ndarray, contract: InputContract) -> np.ndarray:
    """Undo the normalisation of one (C, H, W) input: uint8 (H, W, 3), the image the model saw."""
    mean = np.asarray(contract.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(contract.std, dtype=np.float32)[:, None, None]
    image = np.clip(model_input * std + mean, 0.0, 1.0)
    image = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    return (image.transpose(1, 2, 0) * 255).astype(np.uint8)


#: levels of the map the overlay distinguishes: finer than a JPEG of it can show
LEVELS = 1024
#: the blend in fixed point: weights are multiples of 1 / BLEND_ONE
BLEND_ONE = 256
BLEND_SHIFT = 8


@functools.cache
def _overlay_tables(alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per map level, in fixed point (uint16): the view's weight ``1 - w`` as (LEVELS, 1), and the
    jet colour times its weight ``w = alpha * sqrt(level)`` as (LEVELS, 3)."""
    levels = np.linspace(0.0, 1.0, LEVELS, dtype=np.float32)
    weights = np.rint(alpha * np.sqrt(levels) * BLEND_ONE).astype(np.uint16)[:, None]
    return BLEND_ONE - weights, jet(levels).astype(np.uint16) * weights


def overlay(view: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The map blended on ``view`` (uint8 (H, W, 3)) in jet colours, more opaque where it is hotter
    (weight ``alpha * sqrt(map)``). Table lookups (``np.take``) in fixed point: a 224x224 overlay in
    about half a millisecond instead of three; the daemon writes one for every heatmap it stores."""
    keep, colour = _overlay_tables(alpha)
    index = np.clip(heatmap, 0.0, 1.0, dtype=np.float32)
    index *= LEVELS - 1
    index += 0.5
    levels = index.astype(np.intp)
    blended = view.astype(np.uint16)
    blended *= keep.take(levels, axis=0)
    blended += colour.take(levels, axis=0)
    blended >>= BLEND_SHIFT
    return blended.astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
