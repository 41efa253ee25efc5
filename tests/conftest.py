"""Shared fixtures: real databases (SQLite file, PostgreSQL server), settings for a tmp inbox, and
child processes (a running one, an unreaped one).

A migrated database is a copy of one migrated by Alembic once per session (``migrated_template``):
the migrations themselves are specified by ``tests/db/test_migrations.py``; running them again for
every test that only needs the schema cost a second or so each."""

from __future__ import annotations

import os

#: One OpenMP thread per process, for pytest and every daemon and CLI it starts (they inherit the
#: environment), set before PyTorch is imported: here, as the first conftest is read, since pytest
#: reads the conftests of the paths it is given (``tests/web``'s imports torch) before
#: ``pytest_configure``. The tests run several processes at once on a small machine (pytest, a
#: daemon, its report and decoding processes): with a team of one thread per core in each, the teams
#: wait at every operator for threads that are not running (the seeds' importer tests took 283 s
#: with two threads on a loaded machine, 68 s with one). No result depends on it: the tests'
#: tolerances hold for any thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings, load_settings
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get("MEDDAEMON_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_available() -> bool:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI and not reachable at {POSTGRES_ADMIN_URL}")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin: Engine, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards: empty, or, for a test that uses
    ``migrated_engine`` or ``migrated_postgres_url``, created as a copy of the session's migrated
    template (one CREATE DATABASE)."""
    name = f"meddaemon_test_{uuid.uuid4().hex[:12]}"
    if {"migrated_engine", "migrated_postgres_url"} & set(request.fixturenames):
        template = request.getfixturevalue("migrated_template").postgres_template(postgres_admin)
        create = f'CREATE DATABASE "{name}" TEMPLATE "{template}"'
    else:
        create = f'CREATE DATABASE "{name}"'
    with postgres_admin.connect() as conn:
        conn.execute(text(create))
    url = postgres_admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with postgres_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meddaemon.db'}"
    return request.getfixturevalue("postgres_url")


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


class MigratedTemplate:
    """A database Alembic upgraded to head once per session, per backend, for copies: a SQLite file
    (copied with SQLite's backup API), a PostgreSQL database (``CREATE DATABASE ... TEMPLATE``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sqlite_file: Path | None = None
        self.postgres_name: str | None = None

    def copy_to_sqlite(self, path: Path) -> None:
        """The SQLite database ``path``, not yet written, becomes a copy of the template."""
        assert not path.exists() or path.stat().st_size == 0, f"{path} is not a new database"
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self._sqlite())) as source, closing(sqlite3.connect(path)) as target:
            source.backup(target)

    def _sqlite(self) -> Path:
        if self.sqlite_file is None:
            path = self.folder / "meddaemon.db"
            engine = create_db_engine(f"sqlite:///{path}")
            upgrade(engine)
            engine.dispose()
            self.sqlite_file = path
        return self.sqlite_file

    def postgres_template(self, admin: Engine) -> str:
        """The name of the migrated template database on ``admin``'s server (made on first use)."""
        if self.postgres_name is None:
            name = f"meddaemon_template_{uuid.uuid4().hex[:12]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            self.postgres_name = name
            engine = create_db_engine(admin.url.set(database=name).render_as_string(hide_password=False))
            upgrade(engine)
            engine.dispose()  # a template cannot be copied while anyone is connected to it
        return self.postgres_name

    def drop(self) -> None:
        if self.postgres_name is None:
            return
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.postgres_name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MigratedTemplate]:
    template = MigratedTemplate(tmp_path_factory.mktemp("template"))
    yield template
    template.drop()


@pytest.fixture
def migrated_postgres_url(postgres_url: str) -> str:
    """A fresh PostgreSQL database with the schema at head, for tests of PostgreSQL alone (copied
    from the session's template by ``postgres_url``, which sees this fixture asked for)."""
    return postgres_url


@pytest.fixture
def migrated_engine(db_url: str, migrated_template: MigratedTemplate) -> Iterator[Engine]:
    """The database of ``db_url`` with the schema at head: a copy of the session's migrated template
    (``postgres_url`` creates a PostgreSQL one as that copy)."""
    path = _sqlite_file(db_url)
    if path is not None:
        migrated_template.copy_to_sqlite(path)
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(migrated_engine: Engine) -> sessionmaker[Session]:
    """A migrated database (SQLite and PostgreSQL) with the task presets."""
    from meddaemon.daemon import bookkeeper
    from meddaemon.engine.tasks import all_tasks

    factory = session_factory(migrated_engine)
    with transaction(factory) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    return factory


@pytest.fixture(scope="session")
def reported_states(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``reported_states.copy(root, ...)``: a copy of a state ``model_factory.reported_state`` made once
    this session (see ``model_factory.ReportedStates``)."""
    from model_factory import ReportedStates

    return ReportedStates(tmp_path_factory.mktemp("reported_states"))


@pytest.fixture
def running_child() -> Iterator[int]:
    """The pid of a child process that runs until the test ends."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child.pid
    child.kill()
    child.wait()


@pytest.fixture
def zombie() -> Iterator[int]:
    """The pid of a child that has exited and that nobody has reaped yet, as a killed daemon's
    report process stays under an init that reaps orphans late (a container's); reaped afterwards."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    yield child.pid
    child.wait()


@pytest.fixture
def make_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings for an inbox and state dir under tmp_path; keyword arguments override flags."""

    def make(**flags: Any) -> Settings:
        base: dict[str, Any] = {
            "watch": tmp_path / "inbox",
            "state_dir": tmp_path / "state",
            "create_watch": True,
            "stable_seconds": 0.0,
            "workers": 0,
            "rescan_seconds": 30.0,
        }
        base.update(flags)
        return load_settings(env={}, flags=base)

    return make
