"""Connections: SQLite tuned for one writer and many readers, or any other SQLAlchemy URL.

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys, and
``BEGIN IMMEDIATE`` so a write transaction takes the write lock at its start instead of failing
half-way when a second writer appears.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_db_engine(url: str, busy_timeout: float = 5.0) -> Engine:
    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_lock_error(exc: BaseException) -> bool:
    """Another transaction stood in the way: SQLite's "database is locked"/"busy" (another process
    holds the write lock), PostgreSQL's "deadlock detected" (it rolled this transaction back)."""
    text = str(getattr(exc, "orig", exc)).lower()
    return isinstance(exc, OperationalError) and ("locked" in text or "busy" in text or "deadlock" in text)


def with_lock_retry(
    work: Callable[[], T],
    on_wait: Callable[[int, BaseException], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    backoff_max: float = 2.0,
) -> T:
    """Run ``work`` (one whole transaction) until it gets past a lock held elsewhere.

    Nothing is moved on disk before a commit, so retrying a transaction is always safe.
    """
    attempt = 0
    while True:
        try:
            return work()
        except OperationalError as exc:
            if not is_lock_error(exc) or should_stop():
                raise
            attempt += 1
            if on_wait:
                on_wait(attempt, exc)
            time.sleep(min(backoff_max, 0.05 * 2**attempt))


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session
