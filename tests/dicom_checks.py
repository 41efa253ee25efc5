"""dciodvfy (dicom3tools) as a test check: the objects meddaemon writes must be valid IODs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) prints for the file: [] when the IOD is valid."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian dicom3tools, scripts/system-packages.sh) is required in CI")
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
