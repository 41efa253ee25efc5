"""The observers' engine (metrics, health) reads the database and cannot change it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from meddaemon.db.models import Task
from meddaemon.db.readonly import read_only_engine


def test_it_reads_what_the_daemon_wrote_and_refuses_to_write(migrated_engine, db_url):
    with Session(migrated_engine) as s, s.begin():
        s.add(Task(name="busi", description=""))
    reader = read_only_engine(db_url)
    try:
        with Session(reader) as s, s.begin():
            assert s.scalar(select(func.count()).select_from(Task)) == 1
        with pytest.raises(DBAPIError, match=r"(?i)read-?only"), Session(reader) as s, s.begin():
            s.execute(text("INSERT INTO tasks (name, description, created_at) VALUES ('covid', '', '2026-01-01')"))
    finally:
        reader.dispose()
    with Session(migrated_engine) as s:
        assert s.scalar(select(func.count()).select_from(Task)) == 1


def test_a_missing_sqlite_file_is_an_error_not_a_new_database(tmp_path: Path):
    path = tmp_path / "state" / "meddaemon.db"
    reader = read_only_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(DBAPIError), reader.connect():
            pass
    finally:
        reader.dispose()
    assert not path.exists() and not path.parent.exists()


def test_an_in_memory_sqlite_database_cannot_be_observed():
    with pytest.raises(ValueError):
        read_only_engine("sqlite://")


STRESS = """
import sqlite3, sys, threading
from sqlalchemy import text
from meddaemon.db.readonly import read_only_engine
path = sys.argv[1]
sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
engine = read_only_engine(f"sqlite:///{path}")
errors = []
def work():
    try:
        for _ in range(200):
            with engine.connect() as conn:
                conn.execute(text("SELECT count(*) FROM t")).scalar()
    except Exception as exc:
        errors.append(exc)
threads = [threading.Thread(target=work) for _ in range(12)]
for t in threads: t.start()
for t in threads: t.join()
print(type(engine.pool).__name__, len(errors))
sys.exit(1 if errors else 0)
"""


def test_many_threads_share_a_sqlite_read_only_engine_safely(tmp_path: Path):
    """More than five threads (the web console's pool, the metrics server's) once made SQLAlchemy's
    SingletonThreadPool close other threads' connections under them: errors, then a segfault."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", STRESS, str(tmp_path / "stress.db")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["QueuePool", "0"]
