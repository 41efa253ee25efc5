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
    if contract.channels == 1 and scan.channels == 3 and not _is_grey(scan.frames):
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
    if tuple(x.shape[2:]) != (contract.height, contract.width):
        x = F.interpolate(
            x, size=(contract.height, contract.width), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(contract.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(contract.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous().numpy()


def _is_grey(frames: np.ndarray) -> bool:
    spread = frames.max(axis=-1) - frames.min(axis=-1)
    return bool(spread.max() <= GREY_TOLERANCE)


def _mismatch(message: str) -> None:
    raise ScanFailure(FailureReason.CONTRACT_MISMATCH, message)
