"""Image files of a dataset: which files are images, and reading one the way the daemon does
(``engine.decode``), so that a DICOM dataset trains on the pixels the daemon will later serve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from meddaemon.engine.decode import SNIFF_BYTES, decode_bytes, sniff_format
from meddaemon.failures import FailureReason, ScanFailure

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"})
#: Files that sit beside the images in published datasets and are never images.
NOT_IMAGE_SUFFIXES = frozenset({".csv", ".txt", ".json", ".md", ".xlsx", ".xls", ".pdf", ".zip", ".html"})


def is_image_file(path: Path) -> bool:
    """By suffix; a file with another suffix (DICOM is often ``IM0001`` or a UID) when it sniffs as DICOM."""
    if path.name.startswith(".") or not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix in NOT_IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            return sniff_format(handle.read(SNIFF_BYTES)) == "dicom"
    except OSError:
        return False


def image_files(folder: Path) -> Iterator[Path]:
    """Every image under ``folder``, recursively, in a stable order."""
    for path in sorted(folder.rglob("*")):
        if is_image_file(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def read_image(path: Path) -> np.ndarray:
    """The first (key) frame, float32 in [0, 1]: (H, W) grey or (H, W, 3) RGB. Raises ScanFailure."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ScanFailure(FailureReason.VANISHED, "the file does not exist") from None
    except OSError as exc:
        raise ScanFailure(FailureReason.UNREADABLE, f"cannot read the file: {exc.strerror}") from None
    return np.asarray(decode_bytes(data).frames[0], dtype=np.float32)
