"""Heatmap overlays: the scan as the model saw it, with the map blended on top in a jet colour scale."""

from __future__ import annotations

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


def overlay(view: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    colours = jet(heatmap).astype(np.float32)
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., None] ** 0.5
    return (view.astype(np.float32) * (1 - weight) + colours * weight).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
