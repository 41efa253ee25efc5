"""From decoded pixels to the model input, or contract_mismatch with the reason in words."""

import numpy as np
import pytest

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
