"""From decoded pixels to the model input, or contract_mismatch with the reason in words."""

import numpy as np
import pytest
from dicom_factory import gradient, write_dicom
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from meddaemon.engine.decode import decode_bytes
from meddaemon.engine.decode.types import DecodedScan, ScanMetadata
from meddaemon.engine.preprocess import to_model_input
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import FailureReason, ScanFailure

GREY = InputContract(1, 32, 32, (0.5,), (0.25,), modalities=("US",))
RGB = InputContract(3, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def scan(frames: np.ndarray, fmt: str = "png", modality: str | None = None) -> DecodedScan:
    h, w = frames.shape[1:3]
    return DecodedScan(frames.astype(np.float32), ScanMetadata(fmt, h, w, modality=modality))


def test_grey_is_resized_and_normalised():
    x = to_model_input(scan(np.full((1, 64, 48), 0.75)), GREY)
    assert x.shape == (1, 1, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0, atol=1e-5)  # (0.75 - 0.5) / 0.25


def test_grey_goes_to_three_channels_and_grey_looking_rgb_to_one():
    assert to_model_input(scan(np.zeros((1, 32, 32))), RGB).shape == (1, 3, 32, 32)
    rgb_grey = np.repeat(np.random.default_rng(0).random((1, 32, 32, 1)), 3, axis=-1)
    assert to_model_input(scan(rgb_grey), GREY).shape == (1, 1, 32, 32)


def test_every_frame_is_kept():
    assert to_model_input(scan(np.zeros((5, 40, 40))), GREY).shape == (5, 1, 32, 32)


@pytest.mark.parametrize(
    ("decoded", "words"),
    [
        (scan(np.zeros((1, 20, 20))), "smaller than"),
        (scan(np.zeros((1, 40, 400))), "aspect ratio"),
        (scan(np.random.default_rng(1).random((1, 40, 40, 3))), "colour image"),
        (scan(np.zeros((1, 40, 40)), fmt="dicom", modality="CT"), "modality CT"),
    ],
    ids=["too small", "too long", "colour for grey", "wrong modality"],
)
def test_scans_outside_the_contract_are_refused(decoded, words):
    with pytest.raises(ScanFailure) as info:
        to_model_input(decoded, GREY)
    assert info.value.reason is FailureReason.CONTRACT_MISMATCH and words in info.value.message


def test_png_has_no_modality_and_passes_the_modality_check():
    assert to_model_input(scan(np.zeros((1, 40, 40)), fmt="png"), GREY).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian], ids=["LE", "BE"])
def test_palette_colour_dicom_is_refused_by_a_grey_model_even_when_its_pixels_look_grey(tmp_path, transfer_syntax):
    grey_ramp = np.rint(np.linspace(0, 65535, 256)).astype("<u2").tobytes()  # R = G = B: a grey palette
    extra = {"Modality": "US"}
    for colour in ("Red", "Green", "Blue"):
        extra[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        extra[f"{colour}PaletteColorLookupTableData"] = grey_ramp
    path = write_dicom(
        tmp_path / "palette.dcm",
        pixels=gradient(top=255, dtype=np.uint8),
        modality="US",
        photometric="PALETTE COLOR",
        transfer_syntax=transfer_syntax,
        extra=extra,
    )
    decoded = decode_bytes(path.read_bytes())
    assert decoded.channels == 3

    with pytest.raises(ScanFailure) as info:
        to_model_input(decoded, GREY)

    assert info.value.reason is FailureReason.CONTRACT_MISMATCH
    assert "PALETTE COLOR" in info.value.message
    assert to_model_input(decoded, RGB).shape == (1, 3, 32, 32)


def test_rgb_dicom_with_equal_channels_is_refused_by_a_grey_model(tmp_path):
    grey = gradient(top=255, dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", pixels=np.stack([grey] * 3, axis=-1), modality="US", photometric="RGB")

    with pytest.raises(ScanFailure) as info:
        to_model_input(decode_bytes(path.read_bytes()), GREY)

    assert info.value.reason is FailureReason.CONTRACT_MISMATCH and "(RGB)" in info.value.message


def test_resize_then_crop_is_torchvisions_resize_then_center_crop():
    """Seed 002's order: the shorter side to the target, then the centre (a non-square scan shows it)."""
    import dataclasses

    import torch
    from torchvision import transforms

    contract = dataclasses.replace(RGB, height=24, width=24, resize="resize_then_crop")
    pixels = np.random.default_rng(0).random((1, 40, 64, 3)).astype(np.float32)
    ours = to_model_input(scan(pixels), contract)
    chw = torch.from_numpy(pixels[0]).permute(2, 0, 1)
    reference = transforms.Compose(
        [transforms.Resize(24, antialias=True), transforms.CenterCrop(24), transforms.Normalize(RGB.mean, RGB.std)]
    )(chw)
    assert ours.shape == (1, 3, 24, 24)
    np.testing.assert_allclose(ours[0], reference.numpy(), atol=1e-5)
    stretched = to_model_input(scan(pixels), dataclasses.replace(contract, resize="stretch"))
    assert float(np.abs(stretched - ours).max()) > 0.05


@pytest.mark.parametrize(("height", "width", "image"), [(24, 36, (40, 64)), (24, 36, (64, 40)), (36, 24, (48, 48))])
def test_resize_then_crop_into_a_non_square_input_covers_it_then_takes_its_centre(height, width, image):
    """The smallest resize that covers the input, then its centre (square inputs: torchvision's
    Resize then CenterCrop, above). The shorter side went to the input's shorter side: the crop's
    offsets went negative and a 64 x 96 input came out 64 x 6, stopping the daemon at every start."""
    import dataclasses

    import torch
    from torchvision.transforms import functional as tf

    contract = dataclasses.replace(RGB, height=height, width=width, resize="resize_then_crop")
    pixels = np.random.default_rng(2).random((1, *image, 3)).astype(np.float32)
    ours = to_model_input(scan(pixels), contract)
    scale = max(height / image[0], width / image[1])
    covering = [max(height, int(image[0] * scale)), max(width, int(image[1] * scale))]
    chw = torch.from_numpy(pixels[0]).permute(2, 0, 1)
    reference = tf.normalize(
        tf.center_crop(tf.resize(chw, covering, antialias=True), [height, width]), list(RGB.mean), list(RGB.std)
    )
    assert ours.shape == (1, 3, height, width)
    np.testing.assert_allclose(ours[0], reference.numpy(), atol=1e-5)


def test_per_image_normalisation_is_keras_samplewise_center_and_std():
    """Seed 003's course: x - mean(x), then / (std(x) + 1e-6), over the whole image (all channels)."""
    import dataclasses

    contract = dataclasses.replace(RGB, normalisation="per_image")
    pixels = np.random.default_rng(1).random((1, 32, 32)).astype(np.float32) * 0.5 + 0.2
    ours = to_model_input(scan(pixels), contract)
    x = np.repeat(pixels[0][None], 3, axis=0)
    expected = (x - x.mean()) / (x.std() + 1e-6)
    np.testing.assert_allclose(ours[0], expected, atol=1e-5)


def test_unknown_resize_or_normalisation_is_refused():
    import dataclasses

    with pytest.raises(ValueError, match="resize must be one of"):
        dataclasses.replace(GREY, resize="letterbox")
    with pytest.raises(ValueError, match="normalisation must be one of"):
        dataclasses.replace(GREY, normalisation="zscore")


def test_fixed_normalisation_is_bit_for_bit_torchs_float32_arithmetic():
    """Models trained and self-tested before preprocessing left torch see the same inputs: (x - mean) / std
    per channel, in float32, whatever the layout of the resized view (a centre crop is not contiguous)."""
    import torch

    from meddaemon.engine.preprocess import normalise

    x = torch.from_numpy(np.random.default_rng(2).random((2, 3, 40, 64), dtype=np.float32))[:, :, 4:36, 8:40]
    ours = normalise(x.numpy(), RGB)
    mean = torch.tensor(RGB.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(RGB.std, dtype=torch.float32).view(1, -1, 1, 1)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.array_equal(ours, ((x - mean) / std).numpy())
