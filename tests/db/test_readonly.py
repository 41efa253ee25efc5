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


READ_TWICE = """
import sys
from pathlib import Path
from sqlalchemy import text
from meddaemon.db.readonly import read_only_engine
path, written = sys.argv[1], Path(sys.argv[2])
engine = read_only_engine(f"sqlite:///{path}")
with engine.connect() as conn:
    print(conn.execute(text("SELECT count(*) FROM t")).scalar(), flush=True)
while not written.exists():
    pass
with engine.connect() as conn:
    print(conn.execute(text("SELECT count(*) FROM t")).scalar(), flush=True)
"""


def test_a_wal_database_its_reader_cannot_make_an_index_for_is_read_and_read_again_after_a_write(tmp_path: Path):
    """Reading a WAL database makes its -shm file: in a folder the reader may not write to (a file
    system remounted read-only, a full one) every read failed, and `meddaemon health` called the
    database unreachable. Read as the file holds it, it must not stay as it was then: a console kept
    its connection and showed the database as it opened, whatever a daemon wrote since."""
    import sqlite3
    import subprocess
    import sys

    from permissions import held_to_file_modes

    folder = tmp_path / "state"
    folder.mkdir()
    path = folder / "m.db"
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    writer.commit()
    writer.close()  # the last connection: -wal and -shm go, every commit in the file
    written = tmp_path / "written"
    folder.chmod(0o555)
    try:
        reader = subprocess.Popen(
            held_to_file_modes([sys.executable, "-c", READ_TWICE, str(path), str(written)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert reader.stdout is not None
        first = reader.stdout.readline().strip()
        writer = sqlite3.connect(path)  # this test's process is not held to the folder's mode: a daemon's
        writer.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(7)])
        writer.commit()
        writer.close()
        written.touch()
        out, err = reader.communicate(timeout=60)
    finally:
        folder.chmod(0o755)
    assert reader.returncode == 0, err[-2000:]
    assert [first, out.strip()] == ["1", "8"]
