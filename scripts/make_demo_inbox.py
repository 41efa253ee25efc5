"""Write a demo inbox of SYNTHETIC scans: what the README's first command feeds the daemon.

Uses the same DICOM factory as the tests (tests/dicom_factory.py), so the demo shows exactly the
files the tests prove the daemon handles.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import write_dicom, write_png, write_structured_report
from pydicom.uid import ExplicitVRBigEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless


def main(inbox: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        write_png(inbox / "busi" / f"synthetic_busi_{i:02d}.png", rng.integers(0, 255, (128, 128), dtype=np.uint8))
    for i, syntax in enumerate([None, ExplicitVRBigEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]):
        pixels = rng.integers(0, 4095, (128, 128), dtype=np.uint16)
        kwargs = {"transfer_syntax": syntax} if syntax else {}
        write_dicom(inbox / f"synthetic_chest_{i:02d}.dcm", pixels=pixels, modality="DX", body_part="CHEST", **kwargs)
    write_dicom(
        inbox / "synthetic_breast_us.dcm",
        pixels=rng.integers(0, 255, (96, 96), dtype=np.uint8),
        modality="US",
        body_part="BREAST",
    )
    (inbox / "busi" / "synthetic_copy_of_00.png").write_bytes((inbox / "busi" / "synthetic_busi_00.png").read_bytes())
    (inbox / "synthetic_empty.png").write_bytes(b"")
    write_structured_report(inbox / "synthetic_report_no_pixels.dcm")
    (inbox / "synthetic_random_bytes.dcm").write_bytes(rng.bytes(2048))
    print(f"wrote {sum(1 for p in inbox.rglob('*') if p.is_file())} synthetic files to {inbox}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/inbox"))
