"""A stored heatmap's overlay JPEG (the map in jet colours over the scan as the model saw it), drawn
when something first shows it: a report, the web console's worklist, a DICOM secondary capture.

With reports off the inference stage keeps only what cannot be drawn again, the map's grid (in
its heatmap row, ``engine.heatmap_grid``): an overlay per map drawn and encoded there cost about
1.7 ms of CPU per scan that nothing might ever read (``benchmarks/README.md``, issue 16). With
reports on it writes the overlays too (each is read by its report) and the model's view
(``v<version>.view.jpg``, ``filing.view_path``).
The first reader of a missing overlay draws it with ``overlay_jpeg`` and keeps it at the heatmap
row's ``overlay_path`` (written atomically); later readers read that file.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.heatmap_grid import read_map
from meddaemon.engine.overlay import jpeg_bytes, model_pixels, overlay
from meddaemon.engine.tasks import InputContract
from meddaemon.files import write_atomically

#: one writer at a time in a process: threads share the process's temporary name (``files.temporary_path``)
_KEEPING = threading.Lock()


@dataclass(frozen=True)
class ViewSource:
    """Where the scan as the model saw it comes from: the view the inference stage kept (reports on),
    else the stored scan prepared again through the model's input contract (the same input the model
    ran on, so the overlay is the one the inference stage would have drawn)."""

    kept: Path | None = None
    stored: Path | None = None
    contract: InputContract | None = None
    options: DecodeOptions = field(default_factory=DecodeOptions)

    def view(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """uint8 (H, W) grey or (H, W, 3) of the map's ``shape`` (H, W); None when neither source
        gives one."""
        if self.kept is not None:
            try:
                with Image.open(self.kept) as image:
                    kept = np.asarray(image if image.mode == "L" else image.convert("RGB"))
            except (OSError, ValueError):
                kept = None
            if kept is not None and kept.shape[:2] == shape:
                return kept
        view = stored_model_view(self.stored, self.contract, self.options)
        return view if view is not None and view.shape[:2] == shape else None


def stored_model_view(
    stored_path: Path | None, contract: InputContract | None, options: DecodeOptions
) -> np.ndarray | None:
    """The stored scan prepared again through the model's input contract and de-normalised, uint8
    (H, W) for a grey model, else (H, W, 3) (the middle frame of a multi-frame input); None when it
    cannot be read."""
    if stored_path is None or contract is None:
        return None
    from meddaemon.daemon.intake import prepare_stored  # the decoders: only where a picture is drawn

    inputs = prepare_stored(stored_path, contract, options)
    if not isinstance(inputs, np.ndarray):
        return None
    return model_pixels(inputs[len(inputs) // 2], contract)


def overlay_jpeg(
    stored_map: bytes | Path | None, overlay_path: Path, source: ViewSource, size: tuple[int, int] | None
) -> bytes | None:
    """The overlay of one stored map as JPEG bytes: the file at ``overlay_path`` when it was drawn
    before, else drawn from the map (its row's grid, or an older row's ``.npy`` file), read at
    ``size`` (the model input's height and width), over ``source``'s view and kept there. None when
    the map or the view cannot be read (the report says the overlay is missing). Keeping it is best
    effort: a read-only heatmaps folder, or two readers drawing the same overlay at once, still give
    the bytes (they are the same either way)."""
    kept = read_jpeg(overlay_path)
    if kept is not None or stored_map is None or size is None:
        return kept
    try:
        heatmap = read_map(stored_map, size)
    except (OSError, ValueError):
        return None
    view = source.view(heatmap.shape)
    if view is None:
        return None
    data = jpeg_bytes(overlay(view, heatmap))
    with _KEEPING, contextlib.suppress(OSError):
        write_atomically(overlay_path, data)
    return data


def read_jpeg(path: Path) -> bytes | None:
    """A JPEG file's bytes; None when it is missing or not a JPEG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data[:2] == b"\xff\xd8" else None
