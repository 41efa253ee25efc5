"""SQLite as the embedded default: WAL, busy timeout, foreign keys, writers that lock at BEGIN."""

import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from meddaemon.db.engine import create_db_engine, is_lock_error, with_lock_retry
from meddaemon.db.migrate import upgrade


@pytest.fixture
def sqlite_engine(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db' / 'meddaemon.db'}", busy_timeout=0.2)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_the_database_folder_is_created_and_the_journal_is_wal(sqlite_engine):
    with sqlite_engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 200


def test_foreign_keys_are_enforced(sqlite_engine):
    with pytest.raises(IntegrityError), sqlite_engine.begin() as conn:
        conn.execute(text("INSERT INTO scan_events (scan_id, state, at) VALUES (999, 'registered', '2026-01-01')"))


def test_a_transaction_takes_the_write_lock_at_begin(sqlite_engine):
    """BEGIN IMMEDIATE: a second writer is refused at its start, not half-way through its work."""
    holder = sqlite_engine.connect()
    holder.begin()
    try:
        start = time.monotonic()
        with pytest.raises(OperationalError) as info, sqlite_engine.begin() as conn:
            conn.execute(text("SELECT 1"))
        assert is_lock_error(info.value)
        assert time.monotonic() - start >= 0.15  # it waited the busy timeout first
    finally:
        holder.rollback()
        holder.close()


def test_lock_retry_waits_for_the_other_writer_to_finish(sqlite_engine):
    holder = sqlite_engine.connect()
    holder.begin()
    holder.execute(text("INSERT INTO tasks (name, description, created_at) VALUES ('held', '', '2026-01-01')"))
    threading.Timer(0.8, lambda: (holder.commit(), holder.close())).start()
    waits: list[int] = []

    def write() -> int:
        with sqlite_engine.begin() as conn:
            conn.execute(text("INSERT INTO tasks (name, description, created_at) VALUES ('mine', '', '2026-01-01')"))
            return conn.execute(text("SELECT count(*) FROM tasks")).scalar_one()

    assert with_lock_retry(write, on_wait=lambda attempt, exc: waits.append(attempt)) == 2
    assert waits, "the first attempt should have met the lock"
