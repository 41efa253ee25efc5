"""The pictures a report embeds, as JPEG bytes (a PNG made a page about 5x slower to build).

The overlays are the heatmap stage's own JPEGs, embedded as they are; the scan as the model saw it
is decoded again from ``work/`` and put through the model's own input contract.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.overlay import jet, jpeg_bytes, model_view
from meddaemon.engine.tasks import InputContract

#: Longest side of an embedded image: enough for a 75 mm wide picture at about 170 dpi.
MAX_SIDE = 512


def model_view_jpeg(stored_path: Path | None, contract: InputContract | None, options: DecodeOptions) -> bytes | None:
    """The stored scan, preprocessed as for the model and de-normalised; None if it cannot be read."""
    if stored_path is None or contract is None:
        return None
    from meddaemon.daemon.intake import prepare_stored  # the decoders: only where a report is built

    inputs = prepare_stored(stored_path, contract, options)
    if not isinstance(inputs, np.ndarray):
        return None
    view = model_view(inputs[len(inputs) // 2], contract)
    return jpeg_bytes(_fit(view))


def overlay_jpeg(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data[:2] == b"\xff\xd8" else None


@functools.lru_cache(maxsize=1)
def colour_scale_jpeg() -> bytes:
    """The jet scale of the overlays, low (left) to high (right)."""
    ramp = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (8, 1))
    return jpeg_bytes(jet(ramp), quality=95)


def _fit(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = MAX_SIDE / max(height, width)
    if scale >= 1:
        return rgb
    image = Image.fromarray(rgb).resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    return np.asarray(image)
