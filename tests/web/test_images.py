"""The console's pictures: the scan under a heatmap layer is the part of it the model saw, at the
map's size, so the layer lies over the pixels it was computed from."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddaemon.engine.decode import DecodeOptions, decode_bytes
from meddaemon.engine.overlay import model_pixels
from meddaemon.engine.preprocess import to_model_input
from meddaemon.engine.tasks import InputContract
from meddaemon.web import images


def bright_columns(pixels: np.ndarray) -> tuple[int, int]:
    columns = np.flatnonzero(pixels.max(axis=0) > 0.5 * pixels.max())
    return int(columns.min()), int(columns.max())


@pytest.mark.parametrize("resize", ["stretch", "resize_then_crop"])
def test_the_scan_under_a_heatmap_is_the_part_the_model_saw(tmp_path: Path, resize: str):
    """With a centre crop, the whole wide scan was squeezed under a map of its middle: a square
    left of centre was drawn a third as wide, 16 map pixels from where the map found it."""
    wide = np.zeros((64, 192), np.uint8)
    wide[24:40, 72:88] = 255  # SYNTHETIC: a bright square inside the centre crop, left of its middle
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    contract = InputContract(1, 64, 64, (0.5,), (0.25,), resize=resize)
    options = DecodeOptions()
    seen = model_pixels(to_model_input(decode_bytes(path.read_bytes(), options), contract)[0], contract)

    shown = Image.open(io.BytesIO(images.scan_png(path, options, size=(64, 64), contract=contract)))
    under_the_map = np.asarray(shown.convert("L").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    assert bright_columns(under_the_map) == pytest.approx(bright_columns(np.asarray(seen, dtype=np.float32)), abs=1)
