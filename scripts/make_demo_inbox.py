"""Write a demo inbox of SYNTHETIC scans: what the README's first command feeds the daemon.

Uses the same DICOM factory as the tests (tests/dicom_factory.py), so the demo shows exactly the
files the tests prove the daemon handles.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_factory import write_dicom, write_structured_report
from pydicom.uid import ExplicitVRBigEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from meddaemon.training.phantoms import write_busi


def main(inbox: Path) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:  # ultrasound phantoms the demo's model has not seen (seed 1)
        write_busi(Path(scratch), count=2, size=128, seed=1)
        (inbox / "busi").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(sorted(p for p in Path(scratch).rglob("*.png") if "_mask" not in p.name)):
            shutil.copyfile(image, inbox / "busi" / f"synthetic_busi_{i:02d}_{image.parent.name}.png")
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
    first = sorted((inbox / "busi").glob("synthetic_busi_00_*.png"))[0]
    (inbox / "busi" / "synthetic_copy_of_00.png").write_bytes(first.read_bytes())
    (inbox / "synthetic_empty.png").write_bytes(b"")
    write_structured_report(inbox / "synthetic_report_no_pixels.dcm")
    (inbox / "synthetic_random_bytes.dcm").write_bytes(rng.bytes(2048))
    print(f"wrote {sum(1 for p in inbox.rglob('*') if p.is_file())} synthetic files to {inbox}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/inbox"))
