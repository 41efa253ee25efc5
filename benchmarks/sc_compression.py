"""How a Secondary Capture's picture compresses in the transfer syntaxes at hand, and at what CPU.

The picture is ``dicom.sc.picture``'s, of a SYNTHETIC scan: ultrasound-like speckle (gamma
noise, smoothed) at a model's 224 x 224 input, a Grad-CAM-like map (a 7 x 7 grid read at the
input's size) blended over it in jet colours and kept as the overlay's JPEG, as the daemon keeps
it; ``sc.picture`` enlarges it to ``sc.MIN_SIDE`` and draws the caption band below it. Each
encoder runs on that picture ``--repeat`` times after a warm-up; the figures are the encoded size
and the median CPU time (``process_time``) of one encoding.

    .venv/bin/python benchmarks/sc_compression.py              # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from highdicom.frame import encode_frame
from pydicom.dataset import Dataset
from pydicom.pixels.encoders import JPEGLSLosslessEncoder, RLELosslessEncoder
from scipy.ndimage import gaussian_filter, zoom

from meddaemon.dicom import sc
from meddaemon.dicom.content import ScanFacts
from meddaemon.engine.overlay import jpeg_bytes, overlay
from meddaemon.label_results import LabelResult


def synthetic_picture(folder: Path, side: int = 224, seed: int = 3) -> np.ndarray:
    """uint8 (rows, columns, 3): a SYNTHETIC scan's capture, drawn by ``sc.picture`` from the
    overlay's JPEG (kept in ``folder``, as the daemon keeps it)."""
    rng = np.random.default_rng(seed)
    speckle = gaussian_filter(rng.gamma(1.5, 1.0, (side, side)), 1.2)
    view = np.repeat(np.clip(speckle / speckle.max() * 330, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    cam = zoom(rng.random((7, 7)), side / 7, order=1)
    cam = ((cam - cam.min()) / (cam.max() - cam.min())).astype(np.float32)
    overlay_path = folder / "malignant.jpg"
    overlay_path.write_bytes(jpeg_bytes(overlay(view, cam)))
    result = LabelResult("malignant", 0.91, 0.5, True, overlay_path=overlay_path, map_size=(side, side))
    facts = ScanFacts(1, "0" * 64, "busi", "v1", "SYNTHETIC", (result,), Dataset(), "1.2.826.0.1.3680043.10.")
    return sc.picture(facts, result)


def encoders(pixels: np.ndarray) -> dict[str, Callable[[], bytes]]:
    rows, columns, _ = pixels.shape
    frame = dict(
        rows=rows,
        columns=columns,
        samples_per_pixel=3,
        bits_allocated=8,
        bits_stored=8,
        pixel_representation=0,
        photometric_interpretation="RGB",
        number_of_frames=1,
        planar_configuration=0,
    )
    found: dict[str, Callable[[], bytes]] = {
        "JPEG Baseline, as dicom.sc writes it (highdicom)": lambda: encode_frame(
            pixels,
            transfer_syntax_uid=sc.TRANSFER_SYNTAX,
            bits_allocated=8,
            bits_stored=8,
            photometric_interpretation=sc.PHOTOMETRIC,
            pixel_representation=0,
            planar_configuration=0,
        ),
        "Deflated Explicit VR Little Endian (zlib, level 6)": lambda: zlib.compress(pixels.tobytes(), 6),
    }
    for plugin in RLELosslessEncoder.available_plugins:
        if plugin != "pydicom":  # pure Python: about 15 times slower than the others
            found[f"RLE Lossless ({plugin})"] = lambda plugin=plugin: RLELosslessEncoder.encode(
                pixels, encoding_plugin=plugin, **frame
            )
    if JPEGLSLosslessEncoder.is_available:
        found["JPEG-LS Lossless"] = lambda: JPEGLSLosslessEncoder.encode(pixels, **frame)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meddaemon-sc-") as tmp:
        pixels = synthetic_picture(Path(tmp))
    print(f"SYNTHETIC capture {pixels.shape[1]} x {pixels.shape[0]} RGB: {pixels.nbytes / 1024:.0f} KiB uncompressed")
    for name, encode in encoders(pixels).items():
        encoded = encode()
        spent = []
        for _ in range(args.repeat):
            start = time.process_time()
            encode()
            spent.append(time.process_time() - start)
        share, cpu = len(encoded) / pixels.nbytes, statistics.median(spent) * 1000
        print(f"  {name}: {len(encoded) / 1024:.0f} KiB ({share:.0%}), {cpu:.1f} ms CPU")


if __name__ == "__main__":
    main()
