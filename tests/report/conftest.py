"""A state directory with reported scans for the package (a copy of ``model_factory.reported_state``'s, see
``model_factory.ReportedStates``)."""

from __future__ import annotations

import pytest

from meddaemon.daemon.service import Daemon
from model_factory import ReportedStates


@pytest.fixture(scope="package")
def reported(tmp_path_factory: pytest.TempPathFactory, reported_states: ReportedStates) -> Daemon:
    """Read-only for the tests that use it: they write their own reports with ``--out``."""
    return reported_states.copy(tmp_path_factory.mktemp("reported"))
