"""Fixtures of the web console tests: a state directory a real daemon filled from SYNTHETIC scans,
and consoles over it for each role."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from meddaemon.web.app import create_app
from model_factory import ReportedStates
from web_factory import drop_unroutable, signed_in, web_settings


@pytest.fixture(scope="module")
def filled_root(tmp_path_factory: pytest.TempPathFactory, reported_states: ReportedStates) -> Path:
    """A state directory after one daemon run over SYNTHETIC scans: reported busi and chestxray14 scans
    with heatmaps and PDFs, a DICOM study with patient fields, an empty file and an unroutable DICOM
    (both failed). Shared by the tests of a module: tests that change it use ``fresh_root``. (The run
    is made once per session and copied: ``model_factory.ReportedStates``.)"""
    root = tmp_path_factory.mktemp("web")
    reported_states.copy(root, inbox=drop_unroutable)
    return root


@pytest.fixture
def fresh_root(tmp_path: Path, reported_states: ReportedStates) -> Path:
    """A state like ``filled_root``'s (a copy of the same run), for one test that acts on it."""
    reported_states.copy(tmp_path, inbox=drop_unroutable)
    return tmp_path


@pytest.fixture
def console(filled_root: Path) -> Iterator[Callable[[str], TestClient]]:
    """``console(role)``: a client signed in with that role on the filled state."""
    apps = []

    def make(role: str) -> TestClient:
        app = create_app(web_settings(filled_root))
        apps.append(app)
        return signed_in(app, role)

    yield make
    for app in apps:
        app.state.console.dispose()
