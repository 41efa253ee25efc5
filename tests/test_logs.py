"""What the daemon's processes keep out of their stderr: library warnings outside the log's format."""

from __future__ import annotations

import warnings

from PIL import Image

from meddaemon.logs import quiet_libraries


def test_pillow_s_decompression_bomb_warning_is_not_printed_beside_the_log() -> None:
    """An image over Pillow's 89 M pixels and under ``max_pixels`` printed two raw lines on the
    decoding worker's stderr, outside the log's one line a record."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        bomb = "Image size (90250000 pixels) exceeds limit of 89478485 pixels"
        warnings.warn(bomb, Image.DecompressionBombWarning, stacklevel=1)
        warnings.warn("a warning of another kind still shows", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of another kind still shows"]
