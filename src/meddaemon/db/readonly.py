"""Read-only connections for the observers of a database: the metrics endpoint and ``meddaemon health``.

They must never write, and on SQLite they must not take the write lock either: the daemon's engine
(``db.engine.create_db_engine``) opens every transaction with ``BEGIN IMMEDIATE``, so a scrape through
it would queue behind, and stall, the batches it is measuring. SQLite is therefore opened with
``mode=ro`` (a missing file is an error instead of a new empty database) and a deferred ``BEGIN``,
which gives each session one consistent snapshot without the write lock; PostgreSQL sessions run as
``READ ONLY`` transactions.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from meddaemon.db.engine import ConnectionLimits

#: the longest one statement of a scrape, or of ``meddaemon health``, runs on PostgreSQL
OBSERVER_STATEMENT_SECONDS = 5.0


def read_only_engine(
    url: str | URL, busy_timeout: float = 5.0, connect_timeout: float = 5.0, statement_timeout: float = 0.0
) -> Engine:
    """An engine on the database at ``url`` that cannot change it.

    ``connect_timeout`` bounds how long a server that does not answer holds up a caller (a health
    check, a scrape) before it is reported down. Once connected, on PostgreSQL, a link that goes
    silent is dropped by TCP keepalives and user timeout in about ten seconds, a lock held against
    a read (a migration, ``VACUUM FULL``) is waited for ``busy_timeout``, and with
    ``statement_timeout`` (health, the metrics) no statement runs longer: a frozen link or a table
    locked held a scrape, and ``meddaemon health``, for as long as it lasted.
    """
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_read_only(url, busy_timeout)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        limits = ConnectionLimits(
            lock_timeout=busy_timeout,
            keepalive=5.0,
            application_name="meddaemon-reader",
            statement_timeout=statement_timeout,
        )
        connect_args.update(limits.connect_args(), connect_timeout=max(1, int(connect_timeout)))
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=1,
        max_overflow=2,
        hide_parameters=True,  # as db.engine: an error's text never quotes header values
        connect_args=connect_args,
        execution_options={"postgresql_readonly": True} if url.get_backend_name() == "postgresql" else {},
    )


def _sqlite_read_only(url: URL, busy_timeout: float) -> Engine:
    database = url.database
    if not database or database == ":memory:":
        raise ValueError("an in-memory SQLite database cannot be observed from another connection")
    path = Path(database).resolve()
    uri = path.as_uri() + "?mode=ro"

    def connect() -> sqlite3.Connection:
        attempts_left = WAL_INDEX_ATTEMPTS
        while True:
            connection = sqlite3.connect(uri, uri=True, timeout=busy_timeout, check_same_thread=False)
            try:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
                return connection
            except sqlite3.OperationalError as exc:
                connection.close()
                if not getattr(exc, "sqlite_errorname", "").startswith(WAL_INDEX_ERRORS):
                    raise
                if _without_wal_index(path):
                    # a read-only or full file system, no writer: the file itself, holding every commit
                    return sqlite3.connect(
                        path.as_uri() + "?immutable=1", uri=True, check_same_thread=False, factory=_ImmutableConnection
                    )
                attempts_left -= 1
                if attempts_left == 0:
                    raise
                time.sleep(0.05)  # a writer making or removing its index files: there in a moment, or gone

    # a plain pool: SQLAlchemy could pick SingletonThreadPool, which closes the connections of
    # other threads once more than five threads have used it (the web console's thread pool does),
    # under their feet. The URL names the file, for messages (``creator`` makes the connections).
    engine = create_engine(
        URL.create("sqlite", database=str(Path(database).resolve())),
        creator=connect,
        poolclass=QueuePool,
        pool_size=4,
        max_overflow=8,
        hide_parameters=True,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        dbapi_connection.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        dbapi_connection.execute("PRAGMA query_only=ON")

    @event.listens_for(engine, "checkin")
    def _once_if_immutable(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        """An immutable connection never reads the file again: kept in the pool, a console or a
        scrape showed the database as it was when it opened, however much a daemon wrote since. It
        serves once; its next checkout makes a connection again (``mode=ro`` once it can)."""
        if isinstance(dbapi_connection, _ImmutableConnection):
            record.invalidate(soft=True)

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN")  # deferred: a snapshot for reading, no write lock

    return engine


class _ImmutableConnection(sqlite3.Connection):
    """A connection opened with ``immutable=1`` (``_without_wal_index``)."""


#: how often a connection is tried while a writer makes or removes the WAL index
WAL_INDEX_ATTEMPTS = 20


#: SQLite's errors when a WAL database's index cannot be made: a read-only mount ("unable to open
#: database file"), a folder the reader may not write to ("attempt to write a readonly database"),
#: a full file system ("disk I/O error")
WAL_INDEX_ERRORS = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_IOERR")


def _without_wal_index(path: Path) -> bool:
    """Whether a WAL database failed to open because its index (``-shm``) cannot be made beside it.

    Reading a WAL database makes that file unless it is there: on a file system remounted read-only
    after an I/O error, or full, every reader failed ("unable to open database file", "disk I/O
    error") and ``meddaemon health`` called an intact database unreachable. With neither ``-shm``
    nor ``-wal`` there, no connection is open and the last one checkpointed every commit into the
    file, which SQLite then reads as immutable."""
    if any(path.with_name(path.name + suffix).exists() for suffix in ("-shm", "-wal")):
        return False
    try:
        with path.open("rb") as database:
            header = database.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18:20] == b"\x02\x02"  # file format 2 for reading and writing: WAL
