"""DICOM decoding: what a scan looks like after decode_bytes, and how bad DICOM input is named.

Expected pixels are computed here independently, from pydicom's own ``pixel_array`` and LUT
functions plus numpy, or from the very array written for lossless syntaxes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import (
    gradient,
    synthetic_frames,
    truncate_pixel_data,
    write_codestream_bomb,
    write_deflate_bomb,
    write_dicom,
    write_dicomdir,
    write_structured_report,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_encoder,
)
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from meddaemon.engine.decode import DecodeOptions, decodable_transfer_syntaxes, decode_bytes
from meddaemon.failures import FailureReason, ScanFailure

LOSSLESS_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
]
BUNDLED_DIR = Path(pydicom.data.__file__).parent / "test_files"


def bundled(name: str) -> Path:
    """A test file shipped inside pydicom, by name; never one that would be downloaded."""
    if not any(BUNDLED_DIR.rglob(name)):
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(get_testdata_file(name))


def decode(path: Path, **options: object):
    return decode_bytes(path.read_bytes(), DecodeOptions(**options))


def failure(path: Path, **options: object) -> ScanFailure:
    with pytest.raises(ScanFailure) as caught:
        decode(path, **options)
    return caught.value


def require_encoder(transfer_syntax: str) -> None:
    try:
        available = get_encoder(transfer_syntax).is_available
    except NotImplementedError:
        available = True  # native and deflated syntaxes need no pixel encoder
    if not available:
        pytest.skip(f"no encoder installed for {transfer_syntax}")


def min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-6) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


# --- pydicom's bundled files -------------------------------------------------------------------


def test_bundled_ct_without_window_is_min_max_of_its_hounsfield_units():
    path = bundled("CT_small.dcm")
    ds = dcmread(path)
    assert "WindowCenter" not in ds
    hounsfield = apply_modality_lut(ds.pixel_array, ds)

    assert_close(decode(path).frames, min_max(hounsfield)[np.newaxis])


def test_bundled_mr_is_shown_through_its_first_window():
    path = bundled("MR_small.dcm")
    ds = dcmread(path)
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0)
    top = 2**ds.BitsStored - 1 if ds.PixelRepresentation == 0 else None
    low, high = (0, top) if top else (-(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1)

    assert_close(decode(path).frames, ((windowed - low) / (high - low))[np.newaxis])


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_bundled_mr_in_every_lossless_syntax_decodes_like_the_uncompressed_one(name):
    reference = decode(bundled("MR_small.dcm")).frames

    assert_close(decode(bundled(name)).frames, reference)


def test_bundled_rgb_file_is_scaled_to_unit_rgb():
    path = bundled("SC_rgb_rle.dcm")
    expected = dcmread(path).pixel_array / 255.0

    decoded = decode(path)

    assert decoded.channels == 3
    assert_close(decoded.frames, expected[np.newaxis])


@pytest.mark.parametrize(
    "name",
    [
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
    ],
)
def test_bundled_ybr_files_come_out_as_the_same_rgb_picture_converted_once(name):
    """The same colour bars stored as RGB: YBR left unconverted or converted twice differs by ~0.36."""
    reference = decode(bundled("SC_rgb_rle.dcm")).frames

    decoded = decode(bundled(name)).frames

    assert float(np.abs(decoded - reference).mean()) < 0.02


def test_bundled_palette_colour_file_is_expanded_through_its_lookup_tables():
    path = bundled("examples_palette.dcm")
    ds = dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds)

    assert_close(decode(path).frames, (rgb / np.iinfo(rgb.dtype).max)[np.newaxis])


def test_bundled_jpeg2000_colour_with_reversible_transform_comes_out_as_rgb():
    path = bundled("examples_jpeg2k.dcm")
    assert dcmread(path).PhotometricInterpretation == "YBR_RCT"

    decoded = decode(path)

    assert decoded.frames.shape == (1, 480, 640, 3)
    assert_close(decoded.frames, dcmread(path).pixel_array[np.newaxis] / 255.0)


def test_bundled_multiframe_key_policy_decodes_the_middle_frame():
    path = bundled("rtdose.dcm")
    ds = dcmread(path)
    frames = apply_modality_lut(ds.pixel_array, ds)
    middle = ds.NumberOfFrames // 2

    assert_close(decode(path).frames, min_max(frames[middle])[np.newaxis])


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_bundled_objects_without_pixels_are_named_no_pixel_data(name):
    assert failure(bundled(name)).reason is FailureReason.NO_PIXEL_DATA


def test_bundled_dicomdir_is_named_dicomdir():
    assert failure(bundled("DICOMDIR")).reason is FailureReason.DICOMDIR


def test_bundled_truncated_mr_is_named_truncated_pixel_data():
    assert failure(bundled("MR_truncated.dcm")).reason is FailureReason.TRUNCATED_PIXEL_DATA


def test_bundled_broken_jpeg_stream_is_named_pixel_decode_error():
    """pydicom's JPEG-lossy.dcm has a misplaced marker that no installed JPEG plugin accepts."""
    assert failure(bundled("JPEG-lossy.dcm")).reason is FailureReason.PIXEL_DECODE_ERROR


# --- files written here ------------------------------------------------------------------------


@pytest.mark.parametrize("transfer_syntax", LOSSLESS_SYNTAXES, ids=lambda uid: uid.name)
def test_grey_in_each_lossless_syntax_decodes_to_the_written_pixels(tmp_path, transfer_syntax):
    require_encoder(transfer_syntax)
    pixels = gradient()
    path = write_dicom(tmp_path / "scan.dcm", pixels=pixels, transfer_syntax=transfer_syntax)

    decoded = decode(path)

    assert decoded.metadata.transfer_syntax_uid == transfer_syntax
    assert_close(decoded.frames, min_max(pixels)[np.newaxis])


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRBigEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless],
    ids=lambda u: u.name,
)
def test_rgb_in_each_lossless_syntax_decodes_to_the_written_pixels(tmp_path, transfer_syntax):
    require_encoder(transfer_syntax)
    rgb = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", pixels=rgb, photometric="RGB", transfer_syntax=transfer_syntax)

    assert_close(decode(path).frames, rgb[np.newaxis] / 255.0)


def test_monochrome1_is_inverted_so_that_one_is_brightest(tmp_path):
    pixels = gradient()
    path = write_dicom(tmp_path / "m1.dcm", pixels=pixels, photometric="MONOCHROME1")

    assert_close(decode(path).frames, 1.0 - min_max(pixels)[np.newaxis])


def test_monochrome1_is_inverted_after_its_window(tmp_path):
    pixels = gradient(top=4095)
    path = write_dicom(tmp_path / "m1w.dcm", pixels=pixels, photometric="MONOCHROME1", window=(2048, 1024))
    ds = dcmread(path)
    windowed = apply_voi_lut(pixels, ds)

    assert_close(decode(path).frames, 1.0 - (windowed / 65535.0)[np.newaxis])


def test_window_maps_its_output_range_to_unit_interval(tmp_path):
    pixels = gradient(top=4095)
    path = write_dicom(tmp_path / "w.dcm", pixels=pixels, window=(1000, 400), bits_stored=12)
    ds = dcmread(path)
    center, width = 1000 - 0.5, 400 - 1  # PS3.3 C.11.2.1.2.1, LINEAR
    expected = np.clip((pixels - center) / width + 0.5, 0, 1)

    assert_close(decode(path).frames, expected[np.newaxis], atol=1e-5)
    assert_close(decode(path).frames, (apply_voi_lut(pixels, ds) / 4095.0)[np.newaxis], atol=1e-5)


def test_first_of_several_windows_is_used(tmp_path):
    pixels = gradient(top=4095)
    path = write_dicom(
        tmp_path / "w2.dcm",
        pixels=pixels,
        bits_stored=12,
        extra={"WindowCenter": [1000, 3000], "WindowWidth": [400, 200]},
    )
    expected = np.clip((pixels - 999.5) / 399 + 0.5, 0, 1)

    assert_close(decode(path).frames, expected[np.newaxis], atol=1e-5)


def test_signed_pixels_go_through_rescale_then_window(tmp_path):
    stored = (gradient(top=4000).astype(np.int32) - 2000).astype(np.int16)
    path = write_dicom(tmp_path / "ct.dcm", pixels=stored, modality="CT", rescale=(2.0, -1024.0), window=(40, 400))
    ds = dcmread(path)
    hounsfield = stored * 2.0 - 1024.0
    low, high = -32768 * 2.0 - 1024.0, 32767 * 2.0 - 1024.0
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    assert np.array_equal(apply_modality_lut(ds.pixel_array, ds), hounsfield)

    assert_close(decode(path).frames, ((windowed - low) / (high - low))[np.newaxis], atol=1e-5)


def test_signed_big_endian_pixels_without_window_are_min_max_of_rescaled_values(tmp_path):
    stored = (gradient(top=4000).astype(np.int32) - 2000).astype(np.int16)
    path = write_dicom(tmp_path / "be.dcm", pixels=stored, rescale=(1.0, -1024.0), transfer_syntax=ExplicitVRBigEndian)

    assert_close(decode(path).frames, min_max(stored.astype(np.float64) - 1024.0)[np.newaxis])


def test_a_voi_lut_mapping_from_a_negative_value_in_an_implicit_vr_file_is_read_as_signed(tmp_path):
    """Implicit VR leaves the descriptor's VR to guess: its first value, -1024, was read as 64512,
    every pixel fell below the table, and the image came out black (noted "VOI LUT applied")."""
    stored = gradient(top=4095)
    table = np.arange(4096, dtype=np.uint16)  # identity over -1024..3071, 16-bit output
    item = Dataset()
    item.LUTDescriptor = [4096, 2**16 - 1024, 16]  # the bytes of -1024, as any writer leaves them
    item.LUTData = table.astype("<u2").tobytes()
    extra = {"VOILUTSequence": Sequence([item])}
    path = write_dicom(
        tmp_path / "lut.dcm", pixels=stored, rescale=(1.0, -1024.0), transfer_syntax=ImplicitVRLittleEndian, extra=extra
    )
    assert dcmread(path).VOILUTSequence[0].LUTDescriptor[1] == 64512  # as pydicom reads it

    assert_close(decode(path).frames, ((stored.astype(np.float64)) / 4095.0)[np.newaxis])


def test_a_voi_lut_lying_wholly_below_zero_in_an_implicit_vr_file_is_read_as_signed(tmp_path):
    """-1000 HU read as 64536 with 400 entries did not run past 65535, so it stayed unsigned: every
    pixel fell below the table and the image came out black, noted "VOI LUT applied"."""
    stored = gradient(top=423)  # -1024 .. -601 HU
    table = np.linspace(0, 65535, 400).astype(np.uint16)  # a lung window from -1000 HU
    extra = {"VOILUTSequence": Sequence([lut_item(2**16 - 1000, table)])}
    path = write_dicom(
        tmp_path / "lut.dcm", pixels=stored, rescale=(1.0, -1024.0), transfer_syntax=ImplicitVRLittleEndian, extra=extra
    )
    assert dcmread(path).VOILUTSequence[0].LUTDescriptor[1] == 64536  # as pydicom reads it

    expected = through_luts(stored.astype(np.int64) - 1024, {"VOILUTSequence": (-1000, table)})
    assert_close(decode(path).frames, expected, atol=1e-5)


def test_a_voi_lut_from_above_32767_over_unsigned_values_that_reach_it_stays_unsigned(tmp_path):
    """A 16-bit mammogram's table from 40000: its values reach it, so it is no signed one."""
    stored = (gradient(top=30000).astype(np.int64) + 30000).astype(np.uint16)  # 30000 .. 60000
    table = np.linspace(0, 65535, 20000).astype(np.uint16)
    extra = {"VOILUTSequence": Sequence([lut_item(40000, table)])}
    path = write_dicom(tmp_path / "lut.dcm", pixels=stored, transfer_syntax=ImplicitVRLittleEndian, extra=extra)

    expected = through_luts(stored, {"VOILUTSequence": (40000, table)})
    assert_close(decode(path).frames, expected, atol=1e-5)


def test_voi_lut_sequence_is_applied_and_spans_its_table(tmp_path):
    pixels = gradient(top=255).astype(np.uint16)
    table = (255 - np.arange(256)).astype(np.uint16)  # an inverting 256-entry LUT, 8-bit output
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = table.astype("<u2").tobytes()
    path = write_dicom(tmp_path / "lut.dcm", pixels=pixels, bits_stored=8, extra={"VOILUTSequence": Sequence([item])})

    assert_close(decode(path).frames, (table[pixels] / 255.0)[np.newaxis])


def test_a_16_bit_voi_lut_shorter_than_its_descriptor_is_not_read_as_packed_bytes(tmp_path):
    """40,000 entries said, 30,000 words given: the words were read as 60,000 8-bit entries, and the
    image came out as the noise of their bytes (0 and 1), inferred."""
    pixels = gradient(top=4095).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [40000, 0, 16]
    item.LUTData = np.ones(30000, "<u2").tobytes()
    path = write_dicom(tmp_path / "lut.dcm", pixels=pixels, bits_stored=12, extra={"VOILUTSequence": Sequence([item])})

    decoded = decode(path)

    assert "VOI transform unusable (ValueError): min-max used instead" in decoded.notes
    assert_close(decoded.frames, ((pixels - pixels.min()) / float(pixels.max() - pixels.min()))[np.newaxis])


def test_a_voi_lut_of_one_value_is_passed_over_for_min_max_as_a_window_of_width_0_is(tmp_path):
    """Every entry equal: every pixel came out 0, and the scan was inferred on a black image."""
    pixels = gradient(top=4095).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.full(4096, 1234, "<u2").tobytes()
    path = write_dicom(tmp_path / "lut.dcm", pixels=pixels, bits_stored=12, extra={"VOILUTSequence": Sequence([item])})

    decoded = decode(path)

    assert "VOI LUT unusable (every entry 1234): min-max used instead" in decoded.notes
    assert_close(decoded.frames, ((pixels - pixels.min()) / float(pixels.max() - pixels.min()))[np.newaxis])


def lut_item(first: int, table: np.ndarray) -> Dataset:
    """A Modality or VOI LUT Sequence item of 16-bit entries, its LUT Data as little-endian OW
    bytes (the factory swaps them for a big-endian file)."""
    item = Dataset()
    item.LUTDescriptor = [len(table), first, 16]
    item.LUTData = table.astype("<u2").tobytes()
    return item


def through_luts(pixels: np.ndarray, luts: dict[str, tuple[int, np.ndarray]]) -> np.ndarray:
    """What the decoder should show, by numpy alone: Modality LUT, then VOI LUT scaled over its
    whole table (or min-max without one); inputs outside a table take its end entries."""
    values = pixels.astype(np.int64)
    for keyword in ("ModalityLUTSequence", "VOILUTSequence"):
        if keyword in luts:
            first, table = luts[keyword]
            values = table[np.clip(values - first, 0, len(table) - 1)].astype(np.int64)
    if "VOILUTSequence" in luts:
        low, high = float(luts["VOILUTSequence"][1].min()), float(luts["VOILUTSequence"][1].max())
    else:
        low, high = float(values.min()), float(values.max())
    return ((values - low) / (high - low))[np.newaxis]


@pytest.mark.parametrize(
    "sequences",
    [("VOILUTSequence",), ("ModalityLUTSequence",), ("ModalityLUTSequence", "VOILUTSequence")],
    ids=["VOI LUT", "Modality LUT", "both"],
)
def test_big_endian_lut_sequences_decode_like_their_little_endian_twin(tmp_path, sequences):
    """16-bit LUT entries stored as OW in Explicit VR Big Endian: most words have distinct high
    and low bytes, so reading them in the wrong byte order changes the picture."""
    pixels = np.random.default_rng(7).integers(0, 4096, (40, 48), dtype=np.uint16)
    all_luts = {
        "ModalityLUTSequence": (100, np.rint(np.linspace(300, 3900, 3900)).astype(np.uint16)),
        "VOILUTSequence": (0, np.rint(np.linspace(61000, 257, 4096)).astype(np.uint16)),
    }
    luts = {keyword: all_luts[keyword] for keyword in sequences}
    extra = {keyword: Sequence([lut_item(first, table)]) for keyword, (first, table) in luts.items()}
    written = {
        syntax: write_dicom(
            tmp_path / f"{syntax.name}.dcm", pixels=pixels, bits_stored=12, transfer_syntax=syntax, extra=extra
        )
        for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian)
    }
    big_endian_file = written[ExplicitVRBigEndian].read_bytes()
    for keyword, (_, table) in luts.items():
        assert dcmread(written[ExplicitVRBigEndian])[keyword][0]["LUTData"].VR == "OW"
        assert table.astype(">u2").tobytes() in big_endian_file
        assert table.astype("<u2").tobytes() not in big_endian_file

    little, big = (decode(written[syntax]) for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian))

    assert dcmread(written[ExplicitVRBigEndian]).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    assert_close(little.frames, through_luts(pixels, luts))
    assert_close(big.frames, little.frames, atol=0)


def test_a_voi_lut_of_8_bit_entries_and_4096_of_them_maps_every_stored_value(tmp_path):
    """The number of entries does not depend on their bits (PS3.3 C.11.2.1.1): a 12-bit CR's VOI LUT
    of 4096 8-bit entries. pydicom 3.0 indexed it with uint8, so 256 read as 0 and 300 as 44."""
    pixels = np.array([[0, 255, 256, 300], [2048, 3000, 4000, 4095]], dtype=np.uint16)
    table = np.arange(4096) // 16
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = table.astype("<u2").tobytes()
    path = write_dicom(tmp_path / "lut.dcm", pixels=pixels, bits_stored=12, extra={"VOILUTSequence": Sequence([item])})

    assert_close(decode(path).frames, through_luts(pixels, {"VOILUTSequence": (0, table)}))


@pytest.mark.parametrize("entry_bits", [10, 12, 16])
def test_a_modality_lut_of_any_entry_width_the_standard_allows_is_applied(tmp_path, entry_bits):
    """8 to 16 bits per entry (PS3.3 C.11.1.1.1); 10 and 12 failed as internal_error (pydicom 3.0
    asked numpy for a 'uint12')."""
    pixels = np.array([[0, 100], [200, 255]], dtype=np.uint16)
    table = np.arange(256) * 4 + 3
    item = lut_item(0, table)
    item.LUTDescriptor = [256, 0, entry_bits]
    path = write_dicom(
        tmp_path / "mlut.dcm", pixels=pixels, bits_stored=8, extra={"ModalityLUTSequence": Sequence([item])}
    )

    assert_close(decode(path).frames, through_luts(pixels, {"ModalityLUTSequence": (0, table)}))


def test_a_modality_lut_shorter_than_its_descriptor_fails_as_a_decode_error_by_name(tmp_path):
    item = lut_item(0, np.arange(100))
    item.LUTDescriptor = [256, 0, 16]
    pixels = np.array([[0, 150], [200, 255]], dtype=np.uint16)
    extra = {"ModalityLUTSequence": Sequence([item])}
    path = write_dicom(tmp_path / "short.dcm", pixels=pixels, bits_stored=8, extra=extra)
    error = failure(path)
    assert error.reason is FailureReason.PIXEL_DECODE_ERROR and "Modality LUT" in error.message


def float_pixels(path: Path, values: np.ndarray) -> Path:
    """A SYNTHETIC Parametric-Map-like object holding ``values`` as Float Pixel Data (7FE0,0008)."""
    write_dicom(path, pixels=np.zeros(values.shape, np.uint16))
    ds = dcmread(path)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.astype("<f4").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("odd", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_float_pixels_holding_one_value_that_is_not_finite_keep_the_range_of_the_others(tmp_path, odd):
    """A plain min-max over them was NaN or infinite, and the whole image came out black."""
    values = np.linspace(0, 100, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0] = odd
    frames = decode(float_pixels(tmp_path / "float.dcm", values)).frames
    low, high = values[0, 1], values[7, 7]  # the finite ones' range
    expected = (values - low) / (high - low)
    expected[0, 0] = 1.0 if odd == np.inf else 0.0  # NaN takes the low end
    assert_close(frames, expected[np.newaxis])


@pytest.mark.parametrize("odd", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_float_pixels_of_which_none_is_finite_are_no_image(tmp_path, odd):
    """Every value NaN or infinite came out a black image, inferred and reported."""
    with pytest.raises(ScanFailure, match="the float pixel data holds no finite number") as failed:
        decode(float_pixels(tmp_path / "float.dcm", np.full((8, 8), odd, np.float32)))
    assert failed.value.reason == FailureReason.CORRUPT_IMAGE


def test_a_window_on_float_pixels_is_applied(tmp_path):
    """The Floating Point Image Pixel module has no Bits Stored, which pydicom's windowing reads:
    the window was dropped for min-max ("VOI transform unusable (AttributeError)")."""
    values = np.linspace(-8, 8, 64, dtype=np.float32).reshape(8, 8)
    path = float_pixels(tmp_path / "float.dcm", values)
    ds = dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 0.0, 4.0
    ds.save_as(path, enforce_file_format=True)

    decoded = decode(path)

    assert "first window applied" in decoded.notes
    assert_close(decoded.frames, np.clip((values - (0.0 - 0.5)) / (4.0 - 1.0) + 0.5, 0, 1)[np.newaxis], atol=1e-5)


def test_palette_colour_is_expanded_to_rgb(tmp_path):
    indices = gradient(top=255, dtype=np.uint8)
    path = write_dicom(tmp_path / "pal.dcm", pixels=indices, photometric="PALETTE COLOR")
    ds = dcmread(path)
    expected = apply_color_lut(indices, ds) / 65535.0

    decoded = decode(path)

    assert decoded.channels == 3
    assert_close(decoded.frames, expected[np.newaxis])


def palette(entry_bits: int, layout: str) -> tuple[dict[str, object], np.ndarray, float]:
    """A 256-entry SYNTHETIC palette: the ``extra`` keywords that write it (little-endian words,
    which the factory swaps for a big-endian file), its (256, 3) table, and its full scale.

    ``layout`` is "word" (one entry per 16-bit word) or "packed" (8-bit entries two to a word)."""
    full_scale = float(2**entry_bits - 1)
    ramp = np.rint(np.linspace(0, full_scale, 256)).astype(np.uint16)
    table = np.stack([ramp, ramp[::-1], np.full(256, int(full_scale) // 2 + 1, np.uint16)], axis=-1)
    extra: dict[str, object] = {}
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        data = table[:, channel].astype("<u2" if layout == "word" else "u1").tobytes()
        extra[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, entry_bits]
        extra[f"{colour}PaletteColorLookupTableData"] = data
    return extra, table, full_scale


@pytest.mark.parametrize(
    ("entry_bits", "layout"),
    [(16, "word"), (8, "word"), (8, "packed")],
    ids=["16-bit entries", "8-bit entries in 16-bit words", "8-bit entries packed"],
)
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["LE", "BE"])
def test_palette_colour_goes_through_its_tables_in_either_byte_order(tmp_path, transfer_syntax, entry_bits, layout):
    indices = gradient(top=255, dtype=np.uint8)
    extra, table, full_scale = palette(entry_bits, layout)
    path = write_dicom(
        tmp_path / "pal.dcm", pixels=indices, photometric="PALETTE COLOR", transfer_syntax=transfer_syntax, extra=extra
    )

    decoded = decode(path)

    assert dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax
    assert_close(decoded.frames, (table[indices] / full_scale)[np.newaxis])
    assert float(decoded.frames.mean()) > 0.3


def test_big_endian_palette_colour_decodes_like_its_little_endian_twin(tmp_path):
    indices = np.random.default_rng(12).integers(0, 256, (48, 40), dtype=np.uint8)
    dark = np.rint(np.linspace(0, 6553, 256)).astype("<u2")  # a dim palette: mean about 0.05
    extra: dict[str, object] = {}
    for colour, lut in (("Red", dark), ("Green", dark[::-1]), ("Blue", dark)):
        extra[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        extra[f"{colour}PaletteColorLookupTableData"] = lut.tobytes()
    twins = {
        syntax: decode(
            write_dicom(
                tmp_path / f"{syntax.name}.dcm",
                pixels=indices,
                photometric="PALETTE COLOR",
                transfer_syntax=syntax,
                extra=extra,
            )
        ).frames
        for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian)
    }

    little, big = twins[ExplicitVRLittleEndian], twins[ExplicitVRBigEndian]
    assert 0.03 < float(little.mean()) < 0.07
    assert_close(big, little, atol=0)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["LE", "BE"])
def test_segmented_palette_colour_is_expanded_in_either_byte_order(tmp_path, transfer_syntax):
    indices = gradient(top=255, dtype=np.uint8)
    rising = np.array([0, 1, 0, 1, 255, 65535], "<u2").tobytes()  # discrete 0, then linear to 65535
    falling = np.array([0, 1, 65535, 1, 255, 0], "<u2").tobytes()
    extra: dict[str, object] = {}
    for colour, segments in (("Red", rising), ("Green", falling), ("Blue", rising)):
        extra[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        extra[f"Segmented{colour}PaletteColorLookupTableData"] = segments
    path = write_dicom(
        tmp_path / "seg.dcm", pixels=indices, photometric="PALETTE COLOR", transfer_syntax=transfer_syntax, extra=extra
    )
    ramp = np.linspace(0, 1, 256)

    decoded = decode(path)

    expected = np.stack([ramp, ramp[::-1], ramp], axis=-1)[indices]
    assert_close(decoded.frames, expected[np.newaxis], atol=1 / 65535)


def test_ybr_full_is_converted_to_rgb(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = write_dicom(tmp_path / "ybr.dcm", pixels=ybr, photometric="YBR_FULL")
    expected = convert_color_space(ybr, "YBR_FULL", "RGB") / 255.0

    decoded = decode(path)

    assert_close(decoded.frames, expected[np.newaxis])
    assert float(np.abs(decoded.frames[0] - rgb / 255.0).max()) <= 2 / 255


def test_multiframe_key_policy_decodes_only_the_middle_frame(tmp_path):
    frames = synthetic_frames(5)
    path = write_dicom(tmp_path / "cine.dcm", pixels=frames, modality="US", frames=5)

    decoded = decode(path, frame_policy="key")

    assert decoded.metadata.frames == 5
    assert_close(decoded.frames, min_max(frames[2])[np.newaxis])


def test_multiframe_key_policy_honours_representative_frame_number(tmp_path):
    frames = synthetic_frames(5)
    path = write_dicom(tmp_path / "cine.dcm", pixels=frames, extra={"RepresentativeFrameNumber": 4})

    assert_close(decode(path).frames, min_max(frames[3])[np.newaxis])


def test_multiframe_all_policy_decodes_every_frame_with_one_scale(tmp_path):
    frames = synthetic_frames(4)
    path = write_dicom(tmp_path / "cine.dcm", pixels=frames, transfer_syntax=RLELossless)

    assert_close(decode(path, frame_policy="all").frames, min_max(frames))


def functional_groups(rescale: tuple[float, float] | None, window: tuple[float, float] | None) -> Dataset:
    """A functional groups item holding a Pixel Value Transformation and a Frame VOI LUT (PS3.3 C.7.6.16)."""
    group = Dataset()
    if rescale is not None:
        transformation = Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = *rescale, "HU"
        group.PixelValueTransformationSequence = Sequence([transformation])
    if window is not None:
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = window
        group.FrameVOILUTSequence = Sequence([voi])
    return group


def enhanced_and_classic(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A SYNTHETIC Enhanced CT of 3 frames whose middle one has a window of its own in its Per-Frame
    item (the others take the Shared one's), and two classic objects of the same frames with each window."""
    frames = synthetic_frames(3)
    per_frame = [functional_groups(None, None), functional_groups(None, (900.0, 1200.0)), functional_groups(None, None)]
    enhanced = write_dicom(
        tmp_path / "enhanced.dcm", pixels=frames, modality="CT",
        extra={"SharedFunctionalGroupsSequence": Sequence([functional_groups((1.0, -1024.0), (40.0, 400.0))]),
               "PerFrameFunctionalGroupsSequence": Sequence(per_frame)},
    )  # fmt: skip
    own = write_dicom(
        tmp_path / "own.dcm", pixels=frames, modality="CT", rescale=(1.0, -1024.0), window=(900.0, 1200.0)
    )
    shared = write_dicom(
        tmp_path / "shared.dcm", pixels=frames, modality="CT", rescale=(1.0, -1024.0), window=(40.0, 400.0)
    )
    return enhanced, own, shared


def test_an_enhanced_multiframe_object_is_shown_through_the_rescale_and_window_of_its_functional_groups(tmp_path):
    """Enhanced CT/MR/XA and breast tomosynthesis keep them only there: min-max was used. The key
    frame's Per-Frame item wins over the Shared one (frame 2 of 3 here, the middle)."""
    enhanced, own, _ = enhanced_and_classic(tmp_path)

    shown = decode(enhanced, frame_policy="key")

    assert_close(shown.frames, decode(own, frame_policy="key").frames)
    assert "rescale and window read from the frame's functional groups" in shown.notes


def test_every_frame_of_an_enhanced_object_is_shown_through_its_own_functional_groups(tmp_path):
    """All frames were shown through the key frame's rescale and window."""
    enhanced, own, shared = enhanced_and_classic(tmp_path)

    shown = decode(enhanced, frame_policy="all")

    by_own, by_shared = decode(own, frame_policy="all").frames, decode(shared, frame_policy="all").frames
    assert_close(shown.frames, np.stack([by_shared[0], by_own[1], by_shared[2]]))
    assert shown.notes.count("rescale and window read from the frame's functional groups") == 1


def enhanced_and_classic_ct(tmp_path: Path, frames: np.ndarray) -> tuple[Path, Path]:
    """The same frames as an Enhanced CT (its rescale in the shared functional groups, no window)
    and as a classic multi-frame CT (its rescale at the top level)."""
    enhanced = write_dicom(
        tmp_path / "enhanced.dcm", pixels=frames, modality="CT",
        extra={"SharedFunctionalGroupsSequence": Sequence([functional_groups((1.0, -1024.0), None)]),
               "PerFrameFunctionalGroupsSequence": Sequence([functional_groups(None, None) for _ in frames])},
    )  # fmt: skip
    classic = write_dicom(tmp_path / "classic.dcm", pixels=frames, modality="CT", rescale=(1.0, -1024.0))
    return enhanced, classic


def test_frames_of_an_enhanced_object_without_a_window_share_one_min_max_as_a_classic_object_s_do(tmp_path):
    """Each frame was stretched to its own min-max: how bright a frame is beside the others was lost."""
    enhanced, classic = enhanced_and_classic_ct(tmp_path, synthetic_frames(3))

    assert_close(decode(enhanced, frame_policy="all").frames, decode(classic, frame_policy="all").frames)


def test_an_empty_rescale_at_the_top_level_leaves_the_functional_groups_rescale_in_force(tmp_path):
    """A present but empty Rescale Slope and Intercept at the top level hid the shared groups' own:
    the image went unrescaled, noted "rescale ... read from the frame's functional groups"."""
    enhanced, classic = enhanced_and_classic_ct(tmp_path, synthetic_frames(3))
    ds = dcmread(enhanced)
    ds.RescaleSlope, ds.RescaleIntercept = "", ""
    ds.save_as(enhanced)

    assert_close(decode(enhanced, frame_policy="all").frames, decode(classic, frame_policy="all").frames)


def test_a_rescale_intercept_of_0_at_the_top_level_wins_over_the_functional_groups(tmp_path):
    """0 is a value: taken for none (a number 0 is falsy), the groups' -1024 was applied instead."""
    frames = synthetic_frames(3)
    enhanced, _ = enhanced_and_classic_ct(tmp_path, frames)
    ds = dcmread(enhanced)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 1000, 2000  # a window: an offset is not lost to a min-max
    ds.save_as(enhanced)
    classic = write_dicom(
        tmp_path / "classic_0.dcm", pixels=frames, modality="CT", rescale=(1.0, 0.0), window=(1000, 2000)
    )

    assert_close(decode(enhanced, frame_policy="all").frames, decode(classic, frame_policy="all").frames)


def test_decoding_every_frame_of_an_enhanced_object_holds_one_frame_in_float64_at_a_time(tmp_path):
    """Each frame's rescaled float64 copy was kept, then stacked again: 2.4x the memory of the
    classic path (182 MB against 76 for 100 frames of 256 x 256), up to gigabytes at max_pixels."""
    import tracemalloc

    stored = np.random.default_rng(0).integers(0, 4000, (100, 256, 256), dtype=np.uint16)
    per_frame = Sequence([functional_groups((1.0, float(i)), None) for i in range(100)])
    enhanced = write_dicom(
        tmp_path / "enhanced.dcm", pixels=stored, modality="MR",
        extra={"SharedFunctionalGroupsSequence": Sequence([functional_groups(None, None)]),
               "PerFrameFunctionalGroupsSequence": per_frame},
    )  # fmt: skip
    data = enhanced.read_bytes()
    tracemalloc.start()
    try:
        decode_bytes(data, DecodeOptions(frame_policy="all"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * stored.size * 4  # four float32 stacks' worth: the result, its finite values, a frame or two


def test_every_frame_of_an_enhanced_object_takes_its_own_rescale(tmp_path):
    """Enhanced MR and PET vary the rescale frame by frame: intercepts 0, 1000 and 3000 under one
    window came out as three copies of the middle frame."""
    stored = np.stack([gradient()] * 3)
    intercepts = (0.0, 1000.0, 3000.0)
    enhanced = write_dicom(
        tmp_path / "enhanced.dcm", pixels=stored, modality="MR",
        extra={"SharedFunctionalGroupsSequence": Sequence([functional_groups(None, (2000.0, 4000.0))]),
               "PerFrameFunctionalGroupsSequence": Sequence([functional_groups((1.0, b), None) for b in intercepts])},
    )  # fmt: skip
    expected = [
        decode(write_dicom(tmp_path / f"classic{b}.dcm", pixels=gradient(), modality="MR", rescale=(1.0, b),
                           window=(2000.0, 4000.0))).frames[0]
        for b in intercepts
    ]  # fmt: skip

    assert_close(decode(enhanced, frame_policy="all").frames, np.stack(expected))


def test_file_meta_without_preamble_still_decodes(tmp_path):
    pixels = gradient()
    path = write_dicom(tmp_path / "nopre.dcm", pixels=pixels, preamble=False)
    assert path.read_bytes()[:2] == b"\x02\x00"

    assert_close(decode(path).frames, min_max(pixels)[np.newaxis])


def test_bare_dataset_without_preamble_or_file_meta_still_decodes(tmp_path):
    pixels = gradient()
    path = write_dicom(
        tmp_path / "bare.dcm",
        pixels=pixels,
        preamble=False,
        with_file_meta=False,
        transfer_syntax=ImplicitVRLittleEndian,
    )
    assert path.read_bytes()[:2] == b"\x08\x00"

    decoded = decode(path)

    assert_close(decoded.frames, min_max(pixels)[np.newaxis])
    assert decoded.metadata.modality == "CR"


def test_metadata_is_read_from_the_dataset(tmp_path):
    path = write_dicom(
        tmp_path / "meta.dcm",
        modality="DX",
        body_part="HAND",
        patient_name="SYNTHETIC^META",
        patient_id="SYNTH-42",
        extra={"ViewPosition": "PA"},
    )
    ds = dcmread(path)

    metadata = decode(path).metadata

    assert metadata.format == "dicom"
    assert (metadata.study_instance_uid, metadata.series_instance_uid, metadata.sop_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert metadata.sop_class_uid == ds.SOPClassUID
    assert (metadata.patient_name, metadata.patient_id) == ("SYNTHETIC^META", "SYNTH-42")
    assert (metadata.patient_birth_date, metadata.patient_sex, metadata.patient_age) == (
        "19700101",
        "O",
        "054Y",
    )
    assert metadata.accession_number == "SYNTHACC01"
    assert (metadata.modality, metadata.body_part, metadata.view_position) == ("DX", "HAND", "PA")
    assert metadata.manufacturer == "SYNTHETIC"
    assert (metadata.rows, metadata.columns, metadata.frames, metadata.samples_per_pixel) == (64, 64, 1, 1)
    assert (metadata.photometric_interpretation, metadata.bits_stored) == ("MONOCHROME2", 16)
    assert metadata.transfer_syntax_uid == ExplicitVRLittleEndian
    assert "patient_name" not in metadata.without_phi()


# --- bad DICOM ---------------------------------------------------------------------------------


def test_structured_report_is_named_no_pixel_data(tmp_path):
    assert failure(write_structured_report(tmp_path / "sr.dcm")).reason is FailureReason.NO_PIXEL_DATA


def test_an_object_meddaemon_wrote_is_named_own_output_whatever_it_holds(tmp_path):
    """Its results come back when a PACS forwards whole studies: inferred again, a capture of a
    heatmap would give captures of itself without end (the objects themselves: tests/dicom)."""
    image = write_dicom(tmp_path / "capture.dcm", extra={"Manufacturer": "meddaemon"})
    assert failure(image).reason is FailureReason.OWN_OUTPUT
    assert "Image Storage" in failure(image).message
    report = pydicom.dcmread(write_structured_report(tmp_path / "sr.dcm"))
    report.Manufacturer = "meddaemon"
    report.save_as(tmp_path / "sr.dcm")
    assert failure(tmp_path / "sr.dcm").reason is FailureReason.OWN_OUTPUT
    vendor = write_dicom(tmp_path / "vendor.dcm", extra={"Manufacturer": "meddaemon-compatible scanners inc."})
    assert decode_bytes(vendor.read_bytes()).metadata.manufacturer == "meddaemon-compatible scanners inc."


def test_written_dicomdir_is_named_dicomdir(tmp_path):
    assert failure(write_dicomdir(tmp_path / "DICOMDIR")).reason is FailureReason.DICOMDIR


def test_native_pixel_data_cut_short_is_named_truncated_pixel_data(tmp_path):
    whole = write_dicom(tmp_path / "whole.dcm")

    caught = failure(truncate_pixel_data(whole, tmp_path / "cut.dcm", keep_fraction=0.5))

    assert caught.reason is FailureReason.TRUNCATED_PIXEL_DATA


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_compressed_pixel_data_cut_short_is_named_truncated_pixel_data(tmp_path, transfer_syntax):
    require_encoder(transfer_syntax)
    whole = write_dicom(tmp_path / "whole.dcm", transfer_syntax=transfer_syntax)

    caught = failure(truncate_pixel_data(whole, tmp_path / "cut.dcm", keep_fraction=0.5))

    assert caught.reason is FailureReason.TRUNCATED_PIXEL_DATA


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_08.dcm"],
)
def test_a_jpeg_codestream_cut_short_inside_a_whole_fragment_is_a_pixel_decode_error(tmp_path, name: str):
    """The plugins that refuse such a stream were followed by libjpeg, which decoded it without a
    word: the rest of the image garbage, scored by the model. (The file itself is whole: only the
    stream in its fragment ends early, as a broken encoder or a gateway re-wrapping streams leaves it.)"""
    ds = dcmread(get_testdata_file(name))
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: int(len(frame) * 0.9)]])
    path = tmp_path / name
    ds.save_as(path)

    caught = failure(path)

    assert caught.reason is FailureReason.PIXEL_DECODE_ERROR and "end-of-image marker" in caught.message
    assert decode_bytes(Path(get_testdata_file(name)).read_bytes()).frames.size  # the whole stream decodes


def test_corrupt_compressed_stream_is_named_pixel_decode_error(tmp_path):
    require_encoder(JPEG2000Lossless)
    path = write_dicom(tmp_path / "j2k.dcm", transfer_syntax=JPEG2000Lossless)
    raw = bytearray(path.read_bytes())
    codestream = raw.find(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ markers
    raw[codestream + 4 : codestream + 40] = b"\xff" * 36
    path.write_bytes(bytes(raw))

    assert failure(path).reason is FailureReason.PIXEL_DECODE_ERROR


def peak_python_memory(work) -> int:  # type: ignore[no-untyped-def]
    """The most memory Python (numpy's arrays, bytes) held at once while ``work()`` ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        work()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_deflated_dataset_that_inflates_past_what_max_pixels_allows_is_refused_before_it_is_inflated(tmp_path):
    """pydicom inflates a Deflated dataset whole before reading an element: 1 MB of file declaring
    1 GiB of zeros took 2 GB of a worker's memory, then decoded as a 64 x 64 image. Counted in
    chunks first, it is refused; the header of the failed scan is not inflated whole either."""
    from meddaemon.engine.decode import failed_scan_metadata

    data = write_deflate_bomb(tmp_path / "bomb.dcm", declared_bytes=256 << 20).read_bytes()
    options = DecodeOptions(max_pixels=1_000_000)  # at most 72 MiB inflated
    assert len(data) < 1 << 20

    def decode_and_keep_its_header() -> None:
        with pytest.raises(ScanFailure) as refused:
            decode_bytes(data, options)
        assert refused.value.reason is FailureReason.TOO_MANY_PIXELS
        assert failed_scan_metadata(data, options) is None

    assert peak_python_memory(decode_and_keep_its_header) < 16 << 20
    without_preamble = data[132:]  # read too, as a file that begins with its File Meta
    with pytest.raises(ScanFailure) as refused:
        decode_bytes(without_preamble, options)
    assert refused.value.reason is FailureReason.TOO_MANY_PIXELS
    small = write_deflate_bomb(tmp_path / "small.dcm", declared_bytes=64 * 64 * 2)  # a dataset that is what it says
    assert decode_bytes(small.read_bytes(), options).frames.shape == (1, 64, 64)


def test_a_deflated_dataset_over_the_counting_chunk_with_bytes_after_its_stream_decodes(tmp_path):
    """The count looped for ever where a stream over 1 MiB inflated was followed by any byte (the NUL
    pydicom pads an odd stream with): the worker spun until its read timed out, the receiver's
    association for good. Decoded in a child, so that a loop cannot hold the test run."""
    pixels = np.zeros((1024, 1024), np.uint16)
    pixels[256:768, 256:768] = gradient(512, 512)  # SYNTHETIC: a square of tissue in air
    path = write_dicom(tmp_path / "deflated.dcm", pixels=pixels, transfer_syntax=DeflatedExplicitVRLittleEndian)
    for trailer in (b"\0", b"\0\0"):  # an odd and an even count of bytes after the stream
        padded = tmp_path / f"padded_{len(trailer)}.dcm"
        padded.write_bytes(path.read_bytes() + trailer)

        child = subprocess.run(
            [sys.executable, "-c", DECODE_IN_A_CHILD, str(padded)], capture_output=True, text=True, timeout=120
        )

        assert (child.returncode, child.stdout.strip()) == (0, ""), child.stderr[-2000:]


def test_a_jpeg_whose_height_a_dnl_segment_gives_is_decoded(tmp_path):
    """A JPEG may give its height after the first scan (a DNL segment, the frame header saying 0):
    the size check refused it as a codestream of no rows."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    picture = io.BytesIO()
    Image.fromarray(gradient(96, 128, dtype=np.uint8, top=255)).save(picture, "JPEG", quality=95)
    stream = bytearray(picture.getvalue())
    sof = stream.find(b"\xff\xc0")
    stream[sof + 5 : sof + 7] = (0).to_bytes(2, "big")  # the height left to the DNL segment
    stream[-2:-2] = b"\xff\xdc\x00\x04" + (96).to_bytes(2, "big")  # DNL, before EOI
    path = write_dicom(tmp_path / "dnl.dcm", pixels=np.zeros((96, 128), np.uint8), modality="SC")
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)

    assert decode(path).frames.shape == (1, 96, 128)


@pytest.mark.parametrize("transfer_syntax", [JPEGBaseline8Bit, JPEG2000], ids=["jpeg", "jpeg2000"])
def test_a_codestream_larger_than_its_header_says_is_refused_before_it_is_decoded(tmp_path, transfer_syntax):
    """A codec decodes the size its codestream declares, not the header's Rows and Columns that
    max_pixels was checked against: a 6.7 MB JPEG of 24000 x 24000 under a header of 64 x 64 took
    2.2 GB before pydicom found the sizes apart."""
    path = write_codestream_bomb(tmp_path / "bomb.dcm", side=3000, transfer_syntax=transfer_syntax)

    def decode() -> None:
        with pytest.raises(ScanFailure) as refused:
            decode_bytes(path.read_bytes(), DecodeOptions(max_pixels=1_000_000))
        assert refused.value.reason is FailureReason.PIXEL_DECODE_ERROR
        assert "codestream is 3000x3000 pixels, where the header says 64x64" in refused.value.message

    assert peak_python_memory(decode) < 4 << 20  # 9 MB decoded


#: bytes of pydicom's bundled JPEG2000.dcm changed (offset after the Pixel Data tag: new value), from a
#: fuzzing run: gdcm, pydicom's first plugin for JPEG 2000, throws a C++ exception on this codestream
#: that nothing catches, and the process aborts
GDCM_ABORTING_CHANGES = {56: 117, 70: 116, 112: 9, 117: 234, 164: 194, 243: 27}
DECODE_IN_A_CHILD = """
import sys
from meddaemon.engine.decode import decode_bytes
from meddaemon.failures import ScanFailure
try:
    decode_bytes(open(sys.argv[1], "rb").read())
except ScanFailure as failure:
    print(failure.reason.value)
"""


def test_a_jpeg2000_stream_that_aborts_gdcm_is_a_decode_error_and_the_process_lives_on(tmp_path):
    """With ``workers = 0`` the daemon decodes in its own process, and the console does so always:
    this file took the daemon down (SIGABRT) and, left in the inbox, took it down at every start."""
    raw = bytearray(Path(get_testdata_file("JPEG2000.dcm")).read_bytes())  # type: ignore[arg-type]
    pixel_data = raw.find(b"\xe0\x7f\x10\x00")
    for offset, value in GDCM_ABORTING_CHANGES.items():
        raw[pixel_data + offset] = value
    path = tmp_path / "damaged_j2k.dcm"
    path.write_bytes(bytes(raw))

    child = subprocess.run([sys.executable, "-c", DECODE_IN_A_CHILD, str(path)], capture_output=True, text=True)

    assert (child.returncode, child.stdout.strip()) == (0, "pixel_decode_error"), child.stderr[-2000:]


def test_a_jpeg_baseline_stream_that_aborts_gdcm_is_a_decode_error_and_the_process_lives_on(tmp_path):
    """One byte of pydicom's bundled JPEG baseline changed (the JFIF header's length): gdcm, tried
    first for every syntax but JPEG 2000, aborted the daemon with ``workers = 0`` and ``medcli
    dataset inspect`` (SIGABRT, exit 134)."""
    raw = bytearray(Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).read_bytes())  # type: ignore[arg-type]
    start_of_image = raw.index(b"\xff\xd8\xff\xe0")
    raw[start_of_image + 5] = 0x66  # the APP0 segment's length, 0x10
    path = tmp_path / "damaged_jpeg.dcm"
    path.write_bytes(bytes(raw))

    child = subprocess.run([sys.executable, "-c", DECODE_IN_A_CHILD, str(path)], capture_output=True, text=True)

    assert (child.returncode, child.stdout.strip()) == (0, "pixel_decode_error"), child.stderr[-2000:]


def test_transfer_syntax_without_decoder_is_named_and_named_in_the_message(tmp_path):
    path = write_dicom(tmp_path / "mpeg.dcm")
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    ds["PixelData"].is_undefined_length = True
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.save_as(path, enforce_file_format=True)

    caught = failure(path)

    assert caught.reason is FailureReason.UNSUPPORTED_TRANSFER_SYNTAX
    assert "1.2.840.10008.1.2.4.100" in caught.message and "MPEG2" in caught.message


def test_a_transfer_syntax_uid_of_two_values_is_named_not_a_bug(tmp_path):
    """A backslash in (0002,0010) (one flipped byte) made pydicom read two values: UID() raised a
    TypeError, recorded as internal_error, the reason kept for meddaemon's own bugs."""
    path = write_dicom(tmp_path / "two_syntaxes.dcm")
    data = path.read_bytes()
    assert data.count(b"1.2.840.10008.1.2.1\x00") == 1
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\\.1"))

    caught = failure(path)

    assert caught.reason is FailureReason.UNSUPPORTED_TRANSFER_SYNTAX
    assert caught.message == "the Transfer Syntax UID holds 2 values, not one UID"


def test_twelve_bit_colour_jpeg_is_converted_to_rgb_beyond_pydicom_s_eight_bits(tmp_path):
    """dcmtk's JPEG Extended (12-bit) of a 12-bit RGB image is YBR_FULL_422: pydicom converts YBR to
    RGB in 8 bits only, and the scan failed as pixel_decode_error ("Invalid ndarray.dtype 'uint16'
    for color space conversion"). SYNTHETIC smooth colour ramps, so the lossy codec stays close."""
    from dicom_senders import dcmtk

    ramp = np.linspace(0, 4095, 48)
    rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 4095 - ramp[:, None]), axis=-1)
    rgb = rgb.round().astype(np.uint16)
    source = write_dicom(tmp_path / "rgb12.dcm", pixels=rgb, photometric="RGB", bits_stored=12)
    path = tmp_path / "rgb12_jpeg_extended.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), "+ee", str(source), str(path)], check=True, capture_output=True, timeout=60)
    written = dcmread(path)
    assert (written.file_meta.TransferSyntaxUID, written.PhotometricInterpretation) == (
        "1.2.840.10008.1.2.4.51", "YBR_FULL_422"
    )  # fmt: skip

    decoded = decode(path)

    assert decoded.frames.shape == (1, 48, 48, 3)
    error = np.abs(decoded.frames[0] - rgb / 4095.0)
    assert float(error.mean()) < 0.005 and float(error.max()) < 0.05, (error.mean(), error.max())


def test_ybr_of_8_bits_stored_in_16_is_converted_to_rgb(tmp_path):
    """pydicom converts YBR in uint8 only: 8 bits stored in 16 allocated failed as pixel_decode_error."""
    rgb = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    wide = ybr.astype(np.uint16)
    path = write_dicom(tmp_path / "ybr_8_in_16.dcm", pixels=wide, photometric="YBR_FULL", bits_stored=8)

    decoded = decode(path)

    assert_close(decoded.frames, (convert_color_space(ybr, "YBR_FULL", "RGB") / 255.0)[np.newaxis], atol=1 / 255)


@pytest.mark.parametrize("bits_stored", ["", [12, 12]], ids=["empty", "two values"])
def test_a_ybr_file_with_an_empty_or_double_bits_stored_fails_by_name(tmp_path, bits_stored):
    path = write_dicom(tmp_path / "ybr.dcm", pixels=np.zeros((8, 8, 3), np.uint8), photometric="YBR_FULL")
    ds = dcmread(path)
    ds.BitsStored = bits_stored
    ds.save_as(path)

    assert failure(path).reason is not FailureReason.INTERNAL_ERROR


def test_unsupported_photometric_is_named(tmp_path):
    path = write_dicom(tmp_path / "hsv.dcm", extra={"PhotometricInterpretation": "HSV"})

    assert failure(path).reason is FailureReason.UNSUPPORTED_PHOTOMETRIC


def test_too_many_pixels_is_refused_from_the_header_before_decoding(tmp_path):
    """The header claims 40000x40000x100 pixels over 8 KiB of data: a truncation check or a decode
    would come first and fail differently, or allocate gigabytes."""
    path = write_dicom(tmp_path / "bomb.dcm", extra={"Rows": 40000, "Columns": 40000, "NumberOfFrames": 100})

    caught = failure(path)

    assert caught.reason is FailureReason.TOO_MANY_PIXELS


def test_pixel_limit_counts_every_frame(tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", frames=5)  # 5 x 32 x 32 = 5120 pixels

    assert failure(path, max_pixels=5000).reason is FailureReason.TOO_MANY_PIXELS
    assert decode(path, max_pixels=5120).frames.shape == (1, 32, 32)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dicom_signature_over_garbage_is_named_corrupt_image(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\x01" * 20)

    assert failure(path).reason is FailureReason.CORRUPT_IMAGE


def test_image_cut_before_its_pixel_data_is_named_truncated_pixel_data(tmp_path):
    whole = write_dicom(tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: whole.rfind(b"\xe0\x7f\x10\x00")])

    assert failure(cut).reason is FailureReason.TRUNCATED_PIXEL_DATA


# --- what this installation can decode ----------------------------------------------------------


def test_decodable_transfer_syntaxes_include_the_common_ones():
    decodable = {support.uid for support in decodable_transfer_syntaxes() if support.decodable}

    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless} <= decodable


def test_decodable_transfer_syntaxes_name_their_plugins_and_the_gaps():
    support = {entry.uid: entry for entry in decodable_transfer_syntaxes()}

    assert support[JPEG2000Lossless].plugins
    assert support[JPEG2000Lossless].name == "JPEG 2000 Image Compression (Lossless Only)"
    assert support["1.2.840.10008.1.2.4.100"].decodable is False


def test_a_multi_valued_header_element_is_kept_as_dicom_writes_it(tmp_path):
    """Body Part Examined holding two values was stored as Python's text of a list,
    "['BREAST', 'CHEST']", which no DICOM tool, audit column or search would read back."""
    path = write_dicom(tmp_path / "two.dcm", modality="US", extra={"BodyPartExamined": ["BREAST", "CHEST"]})
    metadata = decode(path).metadata
    assert (metadata.body_part, metadata.modality) == ("BREAST\\CHEST", "US")


def test_a_high_bit_that_is_not_bits_stored_minus_1_is_refused_not_read_as_other_bits(tmp_path):
    """12 bits kept in the top of 16 (High Bit 15): pydicom reads the low 12, and the scan was inferred
    on what was left of them (0.94 from the image at worst) without a word."""
    values = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    path = write_dicom(tmp_path / "high.dcm", pixels=values << 4)
    ds = dcmread(path)
    ds.BitsStored, ds.HighBit = 12, 15
    ds.save_as(path)
    refused = failure(path)
    assert refused.reason is FailureReason.CORRUPT_IMAGE and "High Bit 15" in refused.message


@pytest.mark.parametrize(
    ("written", "said", "pixels"),
    [
        ("RGB", "MONOCHROME2", np.full((16, 16, 3), (200, 50, 10), np.uint8)),  # three samples said grey
        ("MONOCHROME2", "RGB", np.full((16, 16), 200, np.uint8)),  # one sample said colour
    ],
)
def test_samples_per_pixel_that_contradict_the_photometric_interpretation_are_refused(
    tmp_path, written: str, said: str, pixels: np.ndarray
):
    """Three samples said MONOCHROME2 went through the grey pipeline over the three together, (200, 50,
    10) as (1.0, 0.21, 0.0): neither grey nor colour, and a colour model took it."""
    path = write_dicom(tmp_path / "odd.dcm", pixels=pixels, photometric=written)
    ds = dcmread(path)
    ds.PhotometricInterpretation = said
    ds.save_as(path)
    refused = failure(path)
    assert refused.reason is FailureReason.CORRUPT_IMAGE, refused
    assert f"contradicts {said}" in refused.message


def test_pixel_padding_is_left_out_of_the_min_max_and_takes_its_end(tmp_path):
    """-2000 HU of padding around a CT's body (no window) stretched the min-max: the body was squeezed
    into [0.36, 1] (PS3.3 C.7.5.1.1.2: padding is outside the image)."""
    yy, xx = np.mgrid[:64, :64]
    inside = (yy - 32) ** 2 + (xx - 32) ** 2 < 28**2
    body = np.linspace(-1000, 1500, 64 * 64).reshape(64, 64)
    stored = np.where(inside, body + 1024, -976).astype(np.int16)  # SYNTHETIC, padding at -2000 HU
    path = write_dicom(tmp_path / "padded.dcm", pixels=stored, rescale=(1.0, -1024.0))
    ds = dcmread(path)
    ds.add_new("PixelPaddingValue", "SS", -976)
    ds.save_as(path)
    image = decode(path).frames[0]
    hu = stored - 1024.0
    expected = np.where(inside, (hu - hu[inside].min()) / np.ptp(hu[inside]), 0.0)
    np.testing.assert_allclose(image, expected, atol=1e-5)


@pytest.mark.parametrize("a_frame_all_padding", [False, True])
def test_every_frame_of_an_enhanced_object_leaves_its_pixel_padding_out_of_the_shared_min_max(
    tmp_path, a_frame_all_padding: bool
):
    """Its own min-max over the stack did not look at Pixel Padding Value: the bodies were squeezed
    into [0.36, 1] where a classic object's were not (then still so when one frame was all padding)."""
    yy, xx = np.mgrid[:32, :32]
    inside = (yy - 16) ** 2 + (xx - 16) ** 2 < 14**2
    frames = np.stack([np.where(inside, 500 * i + 1024 + xx * 10, -976) for i in range(3)]).astype(np.int16)
    if a_frame_all_padding:
        frames[0] = -976
    enhanced, classic = enhanced_and_classic_ct(tmp_path, frames)
    for path in (enhanced, classic):
        ds = dcmread(path)
        ds.add_new("PixelPaddingValue", "SS", -976)  # -2000 HU around the SYNTHETIC bodies
        ds.save_as(path)

    shown = decode(enhanced, frame_policy="all").frames
    assert_close(shown, decode(classic, frame_policy="all").frames)
    bodies = shown[int(a_frame_all_padding) :, inside]
    assert bodies.min() == 0.0 and bodies.max() == 1.0


@pytest.mark.parametrize("slope", ["0", "NaN", "1e400"])
def test_a_rescale_slope_that_leaves_no_image_is_refused(tmp_path, slope: str):
    """A slope of 0 (or one that is not a finite number) made every pixel one value, and the scan was
    inferred on a black image, noted only "min-max used"."""
    path = write_dicom(tmp_path / "slope.dcm", pixels=gradient(top=4095), rescale=(1.0, 0.0))
    ds = dcmread(path)
    ds["RescaleSlope"].value = slope
    ds.save_as(path)
    refused = failure(path)
    assert refused.reason is FailureReason.CORRUPT_IMAGE
    assert f"Rescale Slope {slope} leaves no image" in refused.message


def test_a_rescale_past_float32_s_range_keeps_its_contrast(tmp_path):
    """Values rescaled beyond 3.4e38 went through float32, became infinite, and every pixel 0."""
    stored = gradient(top=4095)
    path = write_dicom(tmp_path / "wide.dcm", pixels=stored, rescale=(1e36, 0.0))
    assert_close(decode(path).frames, min_max(stored)[np.newaxis], atol=1e-6)


@pytest.mark.parametrize(("slope", "intercept"), [("", "0"), (" ", "-1024"), ("0", None)])
def test_a_rescale_with_an_empty_value_or_without_its_intercept_is_not_applied(
    tmp_path, slope: str, intercept: str | None
):
    """pydicom applies a slope and an intercept together or not at all: a present but empty one was
    multiplied by (internal_error), and a slope of 0 without an intercept is no rescale."""
    stored = gradient(top=4095)
    path = write_dicom(tmp_path / "rescale.dcm", pixels=stored, rescale=(1.0, 0.0))
    ds = dcmread(path)
    ds["RescaleSlope"].value = slope
    if intercept is None:
        del ds.RescaleIntercept
    else:
        ds["RescaleIntercept"].value = intercept
    ds.save_as(path)
    assert_close(decode(path).frames, min_max(stored)[np.newaxis])
