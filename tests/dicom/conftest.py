"""A state directory whose DICOM scans were reported with their DICOM outputs (a folder destination),
made once for the package by the real daemon (``model_factory.reported_state``)."""

from __future__ import annotations

import pytest

from daemon_harness import daemons, layout  # noqa: F401 (fixtures)
from meddaemon.daemon.service import Daemon
from model_factory import reported_state
from orthanc import orthanc  # noqa: F401 (fixture)


@pytest.fixture(scope="package")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """Read-only for the tests that use it: SYNTHETIC scans, every DICOM output to a folder."""
    root = tmp_path_factory.mktemp("dicomout")
    return reported_state(root, destination=[{"name": "share", "kind": "folder", "path": str(root / "share")}])


@pytest.fixture
def sessions(migrated_engine):  # type: ignore[no-untyped-def]
    """A migrated database (SQLite and PostgreSQL) with the task presets."""
    from meddaemon.daemon import bookkeeper
    from meddaemon.db.engine import session_factory, transaction
    from meddaemon.engine.tasks import all_tasks

    factory = session_factory(migrated_engine)
    with transaction(factory) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    return factory
