"""Fixtures of the CLI tests: Click's runner, and the inbox and state directory flags of a tmp folder."""

from pathlib import Path

import pytest
from click.testing import CliRunner


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    """``--watch`` and ``--state-dir`` under ``tmp_path`` (``inbox/`` and ``state/``)."""
    return ["--watch", str(tmp_path / "inbox"), "--state-dir", str(tmp_path / "state")]
