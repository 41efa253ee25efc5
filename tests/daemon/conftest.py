"""Fixtures of the daemon tests: the subprocess daemons (``layout``, ``daemons``) and a migrated
database with the task presets (``sessions``)."""

import pytest

from daemon_harness import daemons, layout  # noqa: F401 (fixtures)
from meddaemon.daemon import bookkeeper
from meddaemon.db.engine import session_factory, transaction
from meddaemon.engine.tasks import all_tasks


@pytest.fixture
def sessions(migrated_engine):  # type: ignore[no-untyped-def]
    factory = session_factory(migrated_engine)
    with transaction(factory) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    return factory
