"""Commands that meet a folder they may not read or write, as a daemon running as a service user does.

Root passes every permission check (capabilities CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), and CI
runs as root. There a command runs through util-linux's ``setpriv`` with those two capabilities
dropped from its bounding set: still root, the owner of the test's files, but held to their modes
like any other user, so a folder set to mode 000 cannot be listed. As another user the command runs
as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DROPPED = "-dac_override,-dac_read_search"


def held_to_file_modes(command: list[str]) -> list[str]:
    """``command``, run so that file modes bind it even under root."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is required in CI to run a command held to file modes as root")
        pytest.skip("setpriv (util-linux) is not installed: root would list every folder")
    return [setpriv, "--bounding-set", DROPPED, *command]


@contextmanager
def unlistable(folder: Path) -> Iterator[Path]:
    """``folder`` set to mode 000 (nobody but a privileged process may list it), put back after."""
    folder.chmod(0o000)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``paths`` refused every write, even root's and even through descriptors already open."""
    chattr = shutil.which("chattr")
    why = "needs root and chattr (e2fsprogs) on a file system with the immutable flag"
    if os.geteuid() != 0 or chattr is None:
        if os.environ.get("CI"):
            pytest.fail(f"this test {why}; CI runs as root")
        pytest.skip(f"this test {why}")
    made = subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True, text=True)
    try:
        if made.returncode != 0:
            pytest.skip(f"chattr +i refused here ({made.stderr.strip()}): this test {why}")
        yield
    finally:
        subprocess.run([chattr, "-i", *map(str, paths)], capture_output=True)
