"""PNG, JPEG and TIFF decoding with Pillow.

Output follows :class:`DecodedScan`: float32 in [0, 1], grey (1, H, W) or RGB (1, H, W, 3). Integer
samples are divided by their full scale (255, 65535), so a 16-bit PNG keeps its absolute levels.
Alpha is dropped, not composited: an alpha channel in a medical export is almost always opaque,
and compositing on black would darken what a reader sees if it were not. Only the first frame of
a multi-page TIFF or animated PNG is decoded. EXIF orientation is applied.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from meddaemon.engine.decode.scaling import min_max
from meddaemon.engine.decode.types import DecodedScan, DecodeOptions, ImageFormat, ScanMetadata
from meddaemon.failures import FailureReason, ScanFailure

SIGNATURES: dict[ImageFormat, tuple[bytes, ...]] = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}
_PILLOW_FORMAT: dict[ImageFormat, str] = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "I": 32, "F": 32}


def sniff_raster(head: bytes) -> ImageFormat | None:
    for fmt, signatures in SIGNATURES.items():
        if head.startswith(signatures):
            return fmt
    return None


def decode_raster(data: bytes, fmt: ImageFormat, options: DecodeOptions = DecodeOptions()) -> DecodedScan:
    """Decode a PNG/JPEG/TIFF held in ``data``; raise :class:`ScanFailure` with a named reason."""
    image = _open(data, fmt, options.max_pixels)
    with image:
        _check_pixel_count(image, options)
        read_as = _raw_mode(image)
        notes = _load(image)
        image = _exif_transposed(image, notes)
        frame, bits = _to_unit(image, notes, read_as)
    metadata = ScanMetadata(
        format=fmt,
        rows=frame.shape[0],
        columns=frame.shape[1],
        samples_per_pixel=1 if frame.ndim == 2 else 3,
        bits_stored=bits,
    )
    return DecodedScan(frames=frame[np.newaxis], metadata=metadata, notes=notes)


def _open(data: bytes, fmt: ImageFormat, max_pixels: int) -> Image.Image:
    """Open the header only; the pixels are not read yet. The limit is ``max_pixels``: Pillow's own
    (``Image.MAX_IMAGE_PIXELS``, refusing at twice its 89 M) is raised to it, never lowered, or a
    site's larger setting was overruled at 179 M pixels by a limit it cannot configure."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        return Image.open(io.BytesIO(data), formats=[_PILLOW_FORMAT[fmt]])
    except Image.DecompressionBombError as exc:
        raise ScanFailure(
            FailureReason.TOO_MANY_PIXELS, f"Pillow refused the {fmt} header as a decompression bomb: {exc}"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE,
            f"the file starts like a {fmt} but its header cannot be read ({type(exc).__name__})",
        ) from exc


def _check_pixel_count(image: Image.Image, options: DecodeOptions) -> None:
    """Refuse from the header's size, before any pixel is decoded (only one frame ever is)."""
    width, height = image.size
    if width * height > options.max_pixels:
        raise ScanFailure(
            FailureReason.TOO_MANY_PIXELS,
            f"{height}x{width} = {width * height} pixels exceeds the limit of {options.max_pixels}",
        )


def _load(image: Image.Image) -> list[str]:
    """Decode every pixel now, so a truncated or broken stream fails here and not later."""
    notes = []
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1:
        notes.append(f"first of {frames} frames decoded")
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ScanFailure(FailureReason.TOO_MANY_PIXELS, f"Pillow refused a decompression bomb: {exc}") from exc
    except (OSError, EOFError) as exc:
        if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
            raise ScanFailure(FailureReason.TRUNCATED_IMAGE, "the image data ends before its last pixel") from exc
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE, f"the image data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    except (SyntaxError, ValueError) as exc:
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE, f"the image data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    return notes


def _exif_transposed(image: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (None, 1):
            return image
        transposed = ImageOps.exif_transpose(image)
    except Exception as exc:
        notes.append(f"EXIF orientation unreadable ({type(exc).__name__}): left as stored")
        return image
    notes.append(f"EXIF orientation {orientation} applied")
    return transposed if transposed is not None else image


def _palette_is_grey(image: Image.Image) -> bool:
    """Whether every palette entry the image uses has R == G == B."""
    palette = image.getpalette(rawmode="RGB")
    if not palette:
        return False
    entries = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    used = np.unique(np.asarray(image))
    used = used[used < len(entries)]
    chosen = entries[used]
    return bool(np.all(chosen[:, 0] == chosen[:, 1]) and np.all(chosen[:, 1] == chosen[:, 2]))


def _raw_mode(image: Image.Image) -> str:
    """How Pillow's decoder reads the file's samples (``LA;16B``: 16-bit grey and alpha), known
    only before the pixels are loaded; empty when Pillow does not say."""
    if not image.tile:
        return ""
    args = image.tile[0].args
    return args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else ""


def _to_unit(image: Image.Image, notes: list[str], read_as: str = "") -> tuple[np.ndarray, int]:
    """One frame as float32 in [0, 1], (H, W) or (H, W, 3), and its bits per sample. Pillow has no
    16-bit colour or grey-with-alpha mode: it reads such files (``read_as`` ``RGB;16B``) at the top
    8 bits of each sample, which is said, and grey with alpha comes back as RGBA, kept grey here."""
    mode = image.mode
    if ";16" in read_as and mode not in _SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        notes.append("16-bit samples read at their top 8 bits (Pillow reads no 16-bit colour or alpha)")
        if read_as.startswith("LA") and mode == "RGBA":
            notes.append("alpha channel dropped")
            return _full_scale(np.asarray(image.getchannel("R")), 255), 8
    if mode in _SIXTEEN_BIT_MODES:
        return _full_scale(np.asarray(image), 65535), 16
    if mode == "I":
        return _int32_to_unit(np.asarray(image), notes)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        notes.append("floating-point samples: min-max scaled")
        return min_max(values), 32
    if mode in ("1", "L"):
        return _full_scale(np.asarray(image.convert("L")), 255), _BITS[mode]
    if mode == "LA":
        notes.append("alpha channel dropped")
        return _full_scale(np.asarray(image.getchannel("L")), 255), 8
    if mode in ("P", "PA"):
        if _palette_is_grey(image):
            notes.append("grey palette expanded to grey")
            return _full_scale(np.asarray(image.convert("L")), 255), 8
        notes.append("palette expanded to RGB")
        return _full_scale(np.asarray(image.convert("RGB")), 255), 8
    if mode in ("RGBA", "RGBa", "RGBX"):
        notes.append("alpha channel dropped")
    elif mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ScanFailure(
            FailureReason.UNSUPPORTED_PHOTOMETRIC, f"Pillow mode {mode} cannot be shown as grey or RGB"
        ) from exc
    return _full_scale(np.asarray(rgb), 255), 8


def _int32_to_unit(values: np.ndarray, notes: list[str]) -> tuple[np.ndarray, int]:
    """Pillow's 32-bit mode holds 16-bit data from some writers: keep its scale when it fits."""
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        return _full_scale(values, 65535), 16
    notes.append("32-bit samples beyond 16 bits: min-max scaled")
    return min_max(values.astype(np.float64)), 32


def _full_scale(values: np.ndarray, top: int) -> np.ndarray:
    return values.astype(np.float32) / np.float32(top)
