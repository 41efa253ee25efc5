"""SQLite as the embedded default: WAL, busy timeout, foreign keys, writers that lock at BEGIN; never
on a network file system."""

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from meddaemon.config import ConfigError
from meddaemon.db import engine as engine_module
from meddaemon.db.engine import create_db_engine, filesystem_type, is_lock_error, with_lock_retry
from meddaemon.db.migrate import upgrade
from permissions import immutable


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


def _connect_at_the_signal(url: str, go, outcomes) -> None:  # type: ignore[no-untyped-def]
    engine = create_db_engine(url)
    go.wait()
    try:
        with engine.connect() as conn:
            outcomes.put(conn.execute(text("PRAGMA journal_mode")).scalar())
    except Exception as error:  # the outcome is what the test reads
        outcomes.put(f"{type(error).__name__}: {error}")


def test_processes_opening_a_new_database_at_the_same_moment_all_connect(tmp_path):
    """They race to switch the new file to WAL, and SQLite answers the losers "database is locked"
    at once, without its busy handler: of three daemons started together on a new database, one in
    ten failed to start."""
    context = multiprocessing.get_context("fork")
    outcomes = context.Queue()
    for round_ in range(30):
        url = f"sqlite:///{tmp_path / f'round-{round_}.db'}"
        go = context.Barrier(3)
        processes = [context.Process(target=_connect_at_the_signal, args=(url, go, outcomes)) for _ in range(3)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert [outcomes.get(timeout=5) for _ in processes] == ["wal"] * 3, f"round {round_}"


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


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 253:1 / / rw,relatime - ext4 /dev/vda1 rw
31 27 0:44 / /mnt/state rw,relatime - nfs4 filer:/export/state rw,vers=4.2
32 31 253:2 / /mnt/state/local rw,relatime - xfs /dev/vdb1 rw
33 27 0:45 / /mnt/my\\040share rw - cifs //nas/share rw
34 27 0:46 / /home/u/remote rw - fuse.sshfs u@host:/data rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/var/lib/meddaemon", "ext4"),
        ("/mnt/state", "nfs4"),
        ("/mnt/state/meddaemon", "nfs4"),
        ("/mnt/state/local/meddaemon", "xfs"),  # a local disk mounted inside the share
        ("/mnt/statement", "ext4"),  # a name that merely begins like a mount point
        ("/mnt/my share/db", "cifs"),
        ("/home/u/remote/state", "fuse.sshfs"),
    ],
)
def test_the_file_system_of_a_path_is_that_of_the_longest_mount_point_above_it(path, kind):
    assert filesystem_type(Path(path), MOUNTINFO) == kind


def test_this_machine_s_own_mounts_are_read(tmp_path):
    assert filesystem_type(tmp_path) not in (None, "nfs4")


def test_a_sqlite_database_on_a_network_file_system_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    """SQLite's locks fail on NFS or SMB (two daemons sharing the file corrupt it) and its WAL does
    not work there. No network file system can be mounted here: the mount table is given."""
    local = tmp_path / "state"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO + f"40 27 0:50 / {local} rw - nfs4 filer:/export rw\n")
    monkeypatch.setattr(engine_module, "MOUNTINFO", mountinfo)
    with pytest.raises(ConfigError, match=r"would be on a network file system \(nfs4\).*PostgreSQL"):
        create_db_engine(f"sqlite:///{local / 'meddaemon.db'}")
    assert not (local / "meddaemon.db").exists()
    create_db_engine(f"sqlite:///{tmp_path / 'elsewhere' / 'meddaemon.db'}").dispose()  # a local disk


def test_a_connection_opened_while_the_file_took_no_writes_is_not_kept_once_it_does(tmp_path: Path):
    """SQLite opens a file it cannot write read-only, and such a connection stays read-only: kept in
    the pool, every write that met it after a brief read-only spell failed again ("attempt to write
    a readonly database"), and the daemon went down and back every second for as long as it ran."""
    database = tmp_path / "meddaemon.db"
    engine = create_db_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()  # the next connection is opened during the spell
    spell = [p for p in (database, database.with_name("meddaemon.db-wal")) if p.exists()]
    with immutable(*spell), pytest.raises(OperationalError, match="readonly"), engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
    with engine.begin() as connection:  # the file takes writes again
        connection.execute(text("INSERT INTO t VALUES (2)"))
    with engine.connect() as connection:
        assert connection.execute(text("SELECT x FROM t")).scalars().all() == [2]
    engine.dispose()
