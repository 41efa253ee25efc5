"""A state directory whose DICOM scans were reported with their DICOM outputs (a folder destination),
made once for the package by the real daemon (``model_factory.reported_state``); a DICOM receiver
started in the test's process (``receive``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon_harness import daemons, layout  # noqa: F401 (fixtures)
from meddaemon.config import load_settings
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.migrate import upgrade
from meddaemon.dicom.receiver import Receiver
from model_factory import reported_state
from orthanc import orthanc  # noqa: F401 (fixture)


@pytest.fixture(scope="package")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """Read-only for the tests that use it: SYNTHETIC scans, every DICOM output to a folder."""
    root = tmp_path_factory.mktemp("dicomout")
    (root / "share").mkdir()
    return reported_state(root, destination=[{"name": "share", "kind": "folder", "path": str(root / "share")}])


@pytest.fixture
def receive(tmp_path: Path) -> Iterator[Callable[..., Receiver]]:
    """Start a receiver on a free port, its inbox and SQLite database under tmp_path."""
    started: list[tuple[Receiver, object]] = []

    def start(**flags: object) -> Receiver:
        settings = load_settings(
            env={},
            flags={
                "watch": tmp_path / "inbox",
                "state_dir": tmp_path / "state",
                "dicom_min_free_bytes": 0,
                **flags,
            },
        )
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.watch.mkdir(parents=True, exist_ok=True)
        engine = create_db_engine(settings.db_url)
        upgrade(engine)
        receiver = Receiver(settings, session_factory(engine), "test-node")
        receiver.start()
        started.append((receiver, engine))
        return receiver

    yield start
    for receiver, engine in started:
        receiver.stop(grace=1.0)
        engine.dispose()  # type: ignore[attr-defined]
