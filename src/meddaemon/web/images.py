"""The pictures of the console: the scan as stored, its heatmaps as transparent colour layers, thumbnails.

The scan page stacks the heatmap layer (a jet-coloured PNG whose alpha grows with the map, as in
the overlay JPEGs of ``meddaemon.overlays``) over the part of the scan the model saw (the whole of
it, or its centre crop with ``resize_then_crop``: ``InputContract.shown_window``) resized to the
map's size, the model input's; the opacity slider changes the layer's CSS opacity. The decoders
are imported when a picture is first asked for.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from meddaemon.engine.heatmap_grid import read_map
from meddaemon.engine.overlay import jet

if TYPE_CHECKING:
    from meddaemon.config import Settings
    from meddaemon.engine.decode.types import DecodeOptions
    from meddaemon.engine.tasks import InputContract
    from meddaemon.web.queries import HeatmapFiles

#: longest side of a picture on the scan page, and of a thumbnail
VIEW_SIDE = 512
THUMB_SIDE = 96


class NoPicture(LookupError):
    """The file behind a picture is gone or cannot be decoded."""


def scan_png(
    path: Path,
    options: DecodeOptions,
    size: tuple[int, int] | None = None,
    side: int = VIEW_SIDE,
    sha256: str | None = None,
    contract: InputContract | None = None,
) -> bytes:
    """The stored scan (its key frame) as an 8-bit PNG: resized to ``size`` (width, height) when given,
    the part of it ``contract``'s model input shows, then fitted within ``side`` pixels. ``sha256``: a
    file read where it lies must still hold these bytes."""
    return _scan_png(_stored_bytes(path, options, sha256), path, options, size, side, contract)


def _stored_bytes(path: Path, options: DecodeOptions, sha256: str | None = None) -> bytes:
    """A stored scan's bytes, read under the daemon's limit (``max_file_bytes``): a file kept in
    failed/ as too large is no picture, rather than the console's memory. A dataset's file read in
    place (``sha256`` given) is left as it was (its access time too, where the system allows) and
    is no picture once its bytes are no longer those scored."""
    from meddaemon.failures import ScanFailure
    from meddaemon.files import read_whole

    try:
        in_place = sha256 is not None
        data, _ = read_whole(path, follow_symlinks=True, keep_atime=in_place, max_bytes=options.max_file_bytes)
    except ScanFailure as failure:
        raise NoPicture(f"cannot show {path.name}: {failure.reason.value}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise NoPicture(f"cannot show {path.name}: the file changed since it was scored")
    return data


def _scan_png(
    data: bytes,
    path: Path,
    options: DecodeOptions,
    size: tuple[int, int] | None,
    side: int,
    contract: InputContract | None = None,
) -> bytes:
    from meddaemon.engine.decode import decode_bytes  # the decoders, on first use

    try:
        decoded = decode_bytes(data, options)  # a decompression bomb refused as the daemon refuses it
    except Exception as exc:  # a file the daemon failed: the page shows none
        raise NoPicture(f"cannot show {path.name}: {getattr(exc, 'reason', type(exc).__name__)}") from None
    frames = np.asarray(decoded.frames)  # (N, H, W) or (N, H, W, 3)
    pixels = frames[len(frames) // 2]
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8))
    if size is not None:  # the map's aspect (the model's input), at the page's size: not the map's coarse grid
        top, left, rows, columns = (
            contract.shown_window(image.height, image.width) if contract else (0, 0, image.height, image.width)
        )
        box = (left, top, left + columns, top + rows)
        image = image.resize(_fitted(size, side), Image.Resampling.BILINEAR, box=box)
        return _png(image)
    return _png(_fit(image, side))


def stored_map(settings: Settings, files: HeatmapFiles) -> bytes | Path | None:
    """What the heatmap's map is read from: its row's grid, or an older row's ``.npy`` file."""
    if files.grid is not None:
        return files.grid
    return settings.stored_file(files.array_path) if files.array_path is not None else None


def heatmap_png(settings: Settings, files: HeatmapFiles, side: int = VIEW_SIDE) -> bytes:
    """The map, read at the model input's size, as an RGBA layer: jet colours, alpha rising with
    the map (low values see-through)."""
    stored = stored_map(settings, files)
    if stored is None or files.map_size is None:
        raise NoPicture("the heatmap has no stored map")
    try:
        heatmap = read_map(stored, files.map_size)
    except (OSError, ValueError) as exc:
        raise NoPicture(f"cannot read the heatmap: {type(exc).__name__}") from None
    values = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)
    size = _fitted((values.shape[1], values.shape[0]), side)
    values = np.clip(np.asarray(Image.fromarray(values, "F").resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    rgba = np.dstack([jet(values), (np.sqrt(values) * 255).astype(np.uint8)])
    return _png(Image.fromarray(rgba, "RGBA"))


def heatmap_overlay(settings: Settings, files: HeatmapFiles) -> bytes:
    """The overlay JPEG of a stored heatmap, drawn from its map on first use (``meddaemon.overlays``)."""
    from meddaemon.daemon.filing import view_path
    from meddaemon.engine.tasks import InputContract
    from meddaemon.overlays import ViewSource, overlay_jpeg

    source = ViewSource(
        view_path(settings.heatmaps_dir, files.sha256, files.model_version_id) if files.sha256 else None,
        settings.stored_file(files.stored_path) if files.stored_path else None,
        InputContract.from_dict(files.contract) if files.contract else None,
        settings.decode_options,
    )
    overlay_path = settings.stored_file(files.overlay_path)
    drawn = overlay_jpeg(stored_map(settings, files), overlay_path, source, files.map_size)
    if drawn is None:
        raise NoPicture(f"cannot draw the overlay {overlay_path.name}")
    return drawn


def thumbnail_jpeg(path: Path, options: DecodeOptions, side: int = THUMB_SIDE, sha256: str | None = None) -> bytes:
    """A small JPEG of a stored scan. A JPEG is scaled by PIL directly (its decoder reads it at a
    fraction of its size), under the daemon's pixel limit as any scan is decoded."""
    data = _stored_bytes(path, options, sha256)
    if data[:2] == b"\xff\xd8":
        return thumbnail_of(data, side, max_pixels=options.max_pixels)
    return thumbnail_of(_scan_png(data, path, options, None, side), side)


def thumbnail_of(data: bytes, side: int = THUMB_SIDE, max_pixels: int | None = None) -> bytes:
    """A small JPEG of a picture's bytes (JPEG or PNG). Bytes PIL cannot read, or a picture over
    ``max_pixels``, are no picture."""
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise NoPicture(f"a picture of {image.width}x{image.height} pixels is over max_pixels ({max_pixels})")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise NoPicture(f"cannot show the picture: {type(exc).__name__}") from None
    return buffer.getvalue()


def _fitted(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` (width, height) scaled so that its longer side is ``side``."""
    scale = side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _fit(image: Image.Image, side: int) -> Image.Image:
    """Small scans are scaled up (nearest) so the page shows them at a useful size; large ones down."""
    scale = side / max(image.size)
    if abs(scale - 1) < 1e-6:
        return image
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
