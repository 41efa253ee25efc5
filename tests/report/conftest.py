"""A state directory with reported scans, made once for the package (see ``model_factory.reported_state``)."""

from __future__ import annotations

import pytest

from meddaemon.daemon.service import Daemon
from model_factory import reported_state


@pytest.fixture(scope="package")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """Read-only for the tests that use it: they write their own reports with ``--out``."""
    return reported_state(tmp_path_factory.mktemp("reported"))
