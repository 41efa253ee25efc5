"""The pictures a report embeds, as JPEG bytes (a PNG made a page about 5x slower to build).

The overlays are drawn from the stored maps when first asked for (``meddaemon.overlays``) and
embedded as they are; the scan as the model saw it, when the inference stage kept none, is decoded
again from ``work/`` and put through the model's own input contract.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.overlay import jet, jpeg_bytes
from meddaemon.engine.tasks import InputContract
from meddaemon.overlays import stored_model_view

#: Longest side of an embedded image: enough for a 75 mm wide picture at about 170 dpi.
MAX_SIDE = 512


def model_view_jpeg(stored_path: Path | None, contract: InputContract | None, options: DecodeOptions) -> bytes | None:
    """The stored scan, preprocessed as for the model and de-normalised; None if it cannot be read."""
    view = stored_model_view(stored_path, contract, options)
    return None if view is None else jpeg_bytes(_fit(view))


@functools.lru_cache(maxsize=1)
def colour_scale_jpeg() -> bytes:
    """The jet scale of the overlays, low (left) to high (right)."""
    ramp = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (8, 1))
    return jpeg_bytes(jet(ramp), quality=95)


def _fit(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = MAX_SIDE / max(height, width)
    if scale >= 1:
        return pixels
    image = Image.fromarray(pixels).resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    return np.asarray(image)
