"""PNG, JPEG and TIFF decoding: pixels as float32 in [0, 1], and how bad raster input is named."""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pytest
from dicom_factory import gradient, png16_bytes, write_blank_png, write_png
from PIL import Image

from meddaemon.engine.decode import DecodeOptions, decode_bytes
from meddaemon.failures import FailureReason, ScanFailure

RNG = np.random.default_rng(7)
NOISE = RNG.integers(0, 256, (48, 64), dtype=np.uint8)
NOISE_RGB = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)


def saved(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def failure(data: bytes, **options: object) -> ScanFailure:
    with pytest.raises(ScanFailure) as caught:
        decode_bytes(data, DecodeOptions(**options))
    return caught.value


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-6) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def test_8bit_grey_png_is_divided_by_255_and_stays_single_channel(tmp_path):
    decoded = decode_bytes(write_png(tmp_path / "g.png", NOISE).read_bytes())

    assert decoded.channels == 1
    assert_close(decoded.frames, NOISE[np.newaxis] / 255.0)


def test_16bit_grey_png_is_divided_by_65535(tmp_path):
    pixels = gradient(top=65535)

    decoded = decode_bytes(write_png(tmp_path / "g16.png", pixels).read_bytes())

    assert decoded.metadata.bits_stored == 16
    assert_close(decoded.frames, pixels[np.newaxis] / 65535.0)


def test_rgb_png_is_rgb_divided_by_255(tmp_path):
    decoded = decode_bytes(write_png(tmp_path / "c.png", NOISE_RGB).read_bytes())

    assert decoded.channels == 3
    assert_close(decoded.frames, NOISE_RGB[np.newaxis] / 255.0)


def test_rgba_png_drops_its_alpha_without_compositing(tmp_path):
    alpha = np.zeros(NOISE.shape, dtype=np.uint8)  # fully transparent: compositing would give black
    rgba = np.dstack([NOISE_RGB, alpha])

    decoded = decode_bytes(write_png(tmp_path / "a.png", rgba).read_bytes())

    assert_close(decoded.frames, NOISE_RGB[np.newaxis] / 255.0)
    assert any("alpha" in note for note in decoded.notes)


def test_grey_with_alpha_keeps_the_grey(tmp_path):
    la = Image.fromarray(np.dstack([NOISE, NOISE[::-1]]), "LA")

    decoded = decode_bytes(saved(la, "PNG"))

    assert_close(decoded.frames, NOISE[np.newaxis] / 255.0)


@pytest.mark.parametrize("channels", [2, 3, 4], ids=["grey+alpha", "RGB", "RGBA"])
def test_a_16_bit_png_with_colour_or_alpha_says_it_was_read_at_8_bits(channels: int):
    """Pillow reads such PNGs at the top 8 bits of each sample: a 12-bit ramp kept 16 of its 256
    levels, without a word, and grey with alpha came back as RGB."""
    ramp = (np.arange(4 * 256) % 256 * 16).astype(np.uint16).reshape(4, 256)  # SYNTHETIC, 12-bit
    opaque = np.full_like(ramp, 65535)
    samples = np.dstack({2: [ramp, opaque], 3: [ramp] * 3, 4: [ramp] * 3 + [opaque]}[channels])

    decoded = decode_bytes(png16_bytes(samples))

    top_8_bits = (ramp >> 8) / 255.0
    assert decoded.channels == (1 if channels == 2 else 3)
    expected = top_8_bits if channels == 2 else np.dstack([top_8_bits] * 3)
    assert_close(decoded.frames, expected[np.newaxis])
    assert decoded.metadata.bits_stored == 8
    assert any("16-bit samples read at their top 8 bits" in note for note in decoded.notes), decoded.notes


def test_colour_palette_png_is_expanded_to_rgb():
    palette_image = Image.fromarray(NOISE_RGB).quantize(colors=16)
    expected = np.asarray(palette_image.convert("RGB")) / 255.0

    decoded = decode_bytes(saved(palette_image, "PNG"))

    assert decoded.channels == 3
    assert_close(decoded.frames, expected[np.newaxis])


def test_grey_palette_png_becomes_grey():
    palette_image = Image.fromarray(NOISE).convert("P")  # Pillow's web palette holds greys
    grey = np.asarray(palette_image.convert("L"))
    assert np.all(np.asarray(palette_image.convert("RGB")) == grey[..., np.newaxis])

    decoded = decode_bytes(saved(palette_image, "PNG"))

    assert decoded.channels == 1
    assert_close(decoded.frames, grey[np.newaxis] / 255.0)


def test_one_bit_png_is_zero_or_one():
    bits = NOISE > 127

    decoded = decode_bytes(saved(Image.fromarray(bits), "PNG"))

    assert_close(decoded.frames, bits[np.newaxis].astype(np.float64))


def test_grey_jpeg_decodes_close_to_what_was_written():
    smooth = gradient(48, 64, dtype=np.uint8, top=255)

    decoded = decode_bytes(saved(Image.fromarray(smooth), "JPEG", quality=95))

    assert decoded.metadata.format == "jpeg"
    assert decoded.frames.shape == (1, 48, 64)
    assert float(np.abs(decoded.frames[0] - smooth / 255.0).max()) < 0.03


def test_16bit_grey_tiff_is_divided_by_65535():
    pixels = gradient(top=65535)
    image = Image.frombytes("I;16", (pixels.shape[1], pixels.shape[0]), pixels.astype("<u2").tobytes())

    decoded = decode_bytes(saved(image, "TIFF"))

    assert decoded.metadata.format == "tiff"
    assert_close(decoded.frames, pixels[np.newaxis] / 65535.0)


def test_rgb_tiff_is_rgb_divided_by_255():
    decoded = decode_bytes(saved(Image.fromarray(NOISE_RGB), "TIFF", compression="tiff_lzw"))

    assert_close(decoded.frames, NOISE_RGB[np.newaxis] / 255.0)


@pytest.mark.parametrize(("orientation", "turn"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, turn):
    """Orientation 6 means "rotate 90 degrees clockwise to display", 8 counter-clockwise, 3 by 180."""
    exif = Image.Exif()
    exif[0x0112] = orientation

    decoded = decode_bytes(saved(Image.fromarray(NOISE), "PNG", exif=exif))

    expected = np.rot90(NOISE, k=turn)
    assert (decoded.metadata.rows, decoded.metadata.columns) == expected.shape
    assert_close(decoded.frames, expected[np.newaxis] / 255.0)


def test_metadata_holds_format_and_size_only(tmp_path):
    metadata = decode_bytes(write_png(tmp_path / "g.png", NOISE).read_bytes()).metadata

    assert (metadata.format, metadata.rows, metadata.columns, metadata.frames) == ("png", 48, 64, 1)
    assert metadata.patient_id is None and metadata.modality is None


def test_truncated_png_is_named_truncated_image():
    whole = saved(Image.fromarray(NOISE), "PNG")

    assert failure(whole[: len(whole) * 2 // 3]).reason is FailureReason.TRUNCATED_IMAGE


def test_truncated_jpeg_is_named_truncated_image():
    whole = saved(Image.fromarray(NOISE_RGB), "JPEG")

    assert failure(whole[: len(whole) // 2]).reason is FailureReason.TRUNCATED_IMAGE


def test_garbage_after_a_png_signature_is_named_corrupt_image():
    data = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(3).bytes(2048)

    assert failure(data).reason is FailureReason.CORRUPT_IMAGE


def test_garbage_after_a_jpeg_signature_is_named_corrupt_image():
    data = b"\xff\xd8\xff" + np.random.default_rng(4).bytes(2048)

    assert failure(data).reason is FailureReason.CORRUPT_IMAGE


def test_damaged_png_data_stream_is_named_corrupt_image():
    damaged = bytearray(saved(Image.fromarray(NOISE), "PNG"))
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = b"\x00" * 64

    assert failure(bytes(damaged)).reason is FailureReason.CORRUPT_IMAGE


def test_png_claiming_30000_squared_pixels_is_refused_fast_without_allocating(tmp_path):
    """A real, valid 900-megapixel PNG (1-bit, so the test writes it in a fraction of a second)."""
    data = write_blank_png(tmp_path / "bomb.png", 30000, 30000, bit_depth=1).read_bytes()
    tracemalloc.start()
    started = time.perf_counter()

    caught = failure(data)

    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert caught.reason is FailureReason.TOO_MANY_PIXELS
    assert elapsed < 1.0
    assert peak < 50 * 2**20


def test_a_max_pixels_above_pillows_own_limit_is_the_limit(tmp_path):
    """Pillow refused a header over twice its MAX_IMAGE_PIXELS (179 M pixels) before ``max_pixels``
    was asked: a site's 10**9 could not take a 196 M-pixel slide. The header of one (its pixels cut
    off, so nothing is allocated) passes the limit now and fails for what it is, cut short."""
    whole = write_blank_png(tmp_path / "slide.png", 14000, 14000, bit_depth=1).read_bytes()
    header_only = whole[: 8 + 25] + whole[-12:]  # the signature, IHDR and IEND: no IDAT

    assert failure(header_only, max_pixels=10**9).reason is not FailureReason.TOO_MANY_PIXELS
    too_many = failure(header_only, max_pixels=150_000_000)
    assert too_many.reason is FailureReason.TOO_MANY_PIXELS and "exceeds the limit of 150000000" in too_many.message


def test_pixel_limit_is_our_own_and_not_pillows(tmp_path):
    data = write_png(tmp_path / "g.png", NOISE).read_bytes()  # 48 x 64 = 3072 pixels

    assert failure(data, max_pixels=3071).reason is FailureReason.TOO_MANY_PIXELS
    assert decode_bytes(data, DecodeOptions(max_pixels=3072)).frames.shape == (1, 48, 64)
