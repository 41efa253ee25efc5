"""What decoding produces: the pixels as a model will see them and the scan's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

ImageFormat = Literal["dicom", "png", "jpeg", "tiff"]
FramePolicy = Literal["key", "all"]

#: Metadata fields that identify the patient. They are stored in the DB but never logged.
PHI_FIELDS = frozenset({"patient_id", "patient_name", "patient_birth_date", "accession_number"})


@dataclass(frozen=True)
class DecodeOptions:
    frame_policy: FramePolicy = "key"
    #: Rows x columns x frames above which a file is refused as a decompression bomb.
    max_pixels: int = 100_000_000
    #: Bytes above which a file is refused unread (it would be held whole in memory).
    max_file_bytes: int = 4 * 1024**3

    @property
    def max_inflated_bytes(self) -> int:
        """The most a Deflated DICOM dataset may inflate to: ``max_pixels`` of the widest samples
        (8 bytes: RGB at 16 bits is 6, Double Float Pixel Data 8), and 64 MiB of header."""
        return self.max_pixels * 8 + (64 << 20)


@dataclass
class ScanMetadata:
    """Per-scan facts kept in the DB (docs/design.md section 4). DICOM fills most; PNG only size and format."""

    format: ImageFormat
    rows: int
    columns: int
    frames: int = 1
    samples_per_pixel: int = 1
    photometric_interpretation: str | None = None
    bits_stored: int | None = None
    transfer_syntax_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    accession_number: str | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    modality: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    view_position: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def without_phi(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k not in PHI_FIELDS}


@dataclass
class DecodedScan:
    """Pixels after every display transform, ready for preprocessing.

    ``frames`` is float32 in [0, 1], shape (N, H, W) for grey or (N, H, W, 3) for RGB; N is 1 under
    the ``key`` frame policy. Grey images are already windowed and MONOCHROME1-inverted, so that
    1.0 is always the brightest (most attenuating) pixel as a reader would see it.
    """

    frames: np.ndarray
    metadata: ScanMetadata
    notes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return 1 if self.frames.ndim == 3 else int(self.frames.shape[-1])
