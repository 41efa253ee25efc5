"""From decoded pixels to the model's input tensor, or ``contract_mismatch`` when the scan is not
what the model was trained on (size, channels, modality)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from meddaemon.engine.decode.types import DecodedScan
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import FailureReason, ScanFailure

#: Largest per-pixel channel difference (on [0, 1]) for a colour image to count as grey.
GREY_TOLERANCE = 2 / 255


def check_contract(scan: DecodedScan, contract: InputContract) -> None:
    meta = scan.metadata
    if contract.modalities and meta.format == "dicom":
        modality = (meta.modality or "").strip().upper()
        if modality not in {m.upper() for m in contract.modalities}:
            _mismatch(f"modality {modality or 'missing'} is not one of {', '.join(contract.modalities)}")
    height, width = scan.frames.shape[1:3]
    if min(height, width) < contract.min_size:
        _mismatch(f"{width}x{height} pixels is smaller than the {contract.min_size}-pixel minimum")
    if max(height, width) / min(height, width) > contract.max_aspect:
        _mismatch(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {contract.max_aspect}")
    if contract.channels == 1 and scan.channels == 3:
        colour = _declared_colour(scan)
        if colour is not None:
            _mismatch(f"a colour image ({colour}) for a model of grey images")
        if not _is_grey(scan.frames):
            _mismatch("a colour image for a model of grey images")


def to_model_input(scan: DecodedScan, contract: InputContract) -> np.ndarray:
    """float32 (N, C, H, W): channels matched, resized (bilinear, antialiased), normalised."""
    check_contract(scan, contract)
    frames = torch.from_numpy(np.ascontiguousarray(scan.frames, dtype=np.float32))
    x = frames.unsqueeze(1) if frames.ndim == 3 else frames.permute(0, 3, 1, 2)
    if x.shape[1] == 3 and contract.channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] == 1 and contract.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return normalise(resize(x, contract).numpy(), contract)


def resize(x: torch.Tensor, contract: InputContract) -> torch.Tensor:
    """(N, C, h, w) to the contract's H x W: stretched, or resized to the smallest size that covers
    H x W and its centre cropped (``InputContract.resized_and_cropped``; for a square input,
    torchvision's ``Resize`` then ``CenterCrop``); bilinear, antialiased."""
    size = (contract.height, contract.width)
    if contract.resize == "resize_then_crop":
        scaled, top, left = contract.resized_and_cropped(x.shape[2], x.shape[3])
        x = _interpolate(x, scaled)
        return x[:, :, top : top + size[0], left : left + size[1]]
    return _interpolate(x, size)


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


#: Keras's samplewise_std_normalization adds this to the std
PER_IMAGE_EPSILON = 1e-6


def normalise(x: np.ndarray, contract: InputContract) -> np.ndarray:
    """(N, C, H, W) on [0, 1] into the model's input space, float32 and C-contiguous: the contract's
    mean and std per channel, or each image's own mean and std over all its pixels and channels
    (Keras samplewise).

    numpy, not torch: the arithmetic of one image gains nothing from torch's threads, and where
    the caller's torch has several (the daemon without decoding workers) and the other core is
    busy with the forward pass, torch's two-thread kernels cost 4 times the CPU of numpy's single
    pass (96 against 18 us for a 224 x 224 image; the same float32 results)."""
    if contract.normalisation == "per_image":
        mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
        std = x.std(axis=(1, 2, 3), keepdims=True, dtype=np.float32)
        return np.ascontiguousarray((x - mean) / (std + np.float32(PER_IMAGE_EPSILON)), dtype=np.float32)
    mean = np.asarray(contract.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(contract.std, dtype=np.float32).reshape(1, -1, 1, 1)
    out = np.subtract(x, mean, dtype=np.float32, order="C")
    return np.divide(out, std, out=out)


def _declared_colour(scan: DecodedScan) -> str | None:
    """A DICOM file's colour photometric interpretation (RGB, YBR_*, PALETTE COLOR), else None.

    A file that says it is colour is refused by a grey model whatever its pixels look like (a
    misread palette is dark and grey-looking); only formats that declare nothing (PNG, JPEG) are
    judged by their pixels."""
    if scan.metadata.format != "dicom":
        return None
    photometric = (scan.metadata.photometric_interpretation or "").strip().upper()
    return None if photometric in ("", "MONOCHROME1", "MONOCHROME2") else photometric


def _is_grey(frames: np.ndarray) -> bool:
    spread = frames.max(axis=-1) - frames.min(axis=-1)
    return bool(spread.max() <= GREY_TOLERANCE)


def _mismatch(message: str) -> None:
    raise ScanFailure(FailureReason.CONTRACT_MISMATCH, message)
