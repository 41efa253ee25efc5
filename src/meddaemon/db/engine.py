"""Connections: SQLite tuned for one writer and many readers, or any other SQLAlchemy URL.

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys, and
``BEGIN IMMEDIATE`` so a write transaction takes the write lock at its start instead of failing
half-way when a second writer appears.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


def shown_url(url: str | URL) -> str:
    """A database URL for messages and ``config show``: no password, neither the one before the host
    nor libpq's ``?password=`` (operators paste these into tickets)."""
    parsed = make_url(url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on every wait of a daemon's PostgreSQL connections (0 turns one off), so a peer frozen
    inside a transaction or cut off by the network holds nobody up for long:

    - ``lock_timeout``: a statement waiting for a row lock longer than this fails (and is retried:
      ``is_lock_error``) instead of waiting for as long as the holder is frozen;
    - ``idle_in_transaction``: the server ends the session of a client that sits inside an open
      transaction longer than this (a SIGSTOPped or frozen daemon), which frees its locks;
    - ``keepalive``: TCP keepalives on both ends (idle this long, then three probes a third of it
      apart) and a TCP user timeout of twice it, so a host that vanished without a reset is dropped
      in about twice this, not after the kernel's two hours;
    - ``connect_timeout``: a connection not made in this long fails (libpq's default: none; psycopg's
      130 s);
    - ``answer_timeout``: a round trip the server does not answer in this long fails, and its
      connection is closed (``AnsweringConnection``): a server frozen with its host still up (a
      paused VM, a hung pooler) acknowledges every packet, so neither keepalives, the user timeout
      nor its own timeouts ever end the wait, and the daemon hung, deaf to SIGTERM and its watchdog.
    """

    lock_timeout: float = 5.0
    idle_in_transaction: float = 30.0
    keepalive: float = 10.0
    application_name: str = "meddaemon"
    #: any statement running longer than this fails (0: no limit); the observers' (``db.readonly``)
    statement_timeout: float = 0.0
    connect_timeout: float = 0.0
    answer_timeout: float = 0.0

    def connect_args(self) -> dict[str, object]:
        """libpq parameters (psycopg passes them through) and server settings (``options``)."""
        server = {"lock_timeout": self.lock_timeout, "idle_in_transaction_session_timeout": self.idle_in_transaction}
        if self.statement_timeout > 0:
            server["statement_timeout"] = self.statement_timeout
        options = [f"-c {name}={int(seconds * 1000)}" for name, seconds in server.items()]
        args: dict[str, object] = {"application_name": f"{self.application_name}[{os.getpid()}]"}
        if self.connect_timeout > 0:
            args["connect_timeout"] = max(2, round(self.connect_timeout))  # libpq takes whole seconds, 2 at least
        if self.keepalive > 0:
            idle, interval = max(1, round(self.keepalive)), max(1, round(self.keepalive / 3))
            user_timeout_ms = int(2 * self.keepalive * 1000)
            args.update(
                keepalives=1,
                keepalives_idle=idle,
                keepalives_interval=interval,
                keepalives_count=3,
                tcp_user_timeout=user_timeout_ms,
            )
            options += [
                f"-c tcp_keepalives_idle={idle}",
                f"-c tcp_keepalives_interval={interval}",
                "-c tcp_keepalives_count=3",
                f"-c tcp_user_timeout={user_timeout_ms}",
            ]
        args["options"] = " ".join(options)
        return args


#: SQLite's primary result code for a write refused by a read-only database or connection
SQLITE_READONLY = 8


def create_db_engine(url: str, busy_timeout: float = 5.0, limits: ConnectionLimits | None = None) -> Engine:
    """``limits`` apply to PostgreSQL only (SQLite's waits are bounded by ``busy_timeout``).

    ``hide_parameters``: an error's text never quotes its statement's values. They are DICOM header
    values (patient names, IDs, birth dates), and an error reaches the log, its traceback the journal."""
    if not is_sqlite(url):
        engine = create_engine(
            url, pool_pre_ping=True, hide_parameters=True, connect_args=limits.connect_args() if limits else {}
        )
        if limits is not None and limits.answer_timeout > 0 and make_url(url).get_driver_name() == "psycopg":
            answering = answering_connection(limits.answer_timeout)

            @event.listens_for(engine, "do_connect")
            def _connect(dialect, conn_rec, cargs, cparams):  # type: ignore[no-untyped-def]
                return answering.connect(*cargs, **cparams)

        return engine
    database = make_url(url).database
    if database and database != ":memory:":
        _make_folder_of(Path(database))
        refuse_network_filesystem(Path(database))
    engine = create_engine(
        url, hide_parameters=True, connect_args={"timeout": busy_timeout, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        if _meddaemons_or_empty(cursor):  # WAL persists in the file: another application's is left as it is
            enter_wal(cursor, busy_timeout)
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @event.listens_for(engine, "handle_error")
    def _read_only_connection(context) -> None:  # type: ignore[no-untyped-def]
        """A connection SQLite opened while the file could not be written (a failing disk, a
        read-only spell) stays read-only for life: kept in the pool, each write that met it put the
        daemon down again, every second, long after the file took writes. Such an error drops the
        pool's connections, as a lost connection does."""
        code = getattr(context.original_exception, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == SQLITE_READONLY:
            context.is_disconnect = True

    return engine


def answering_connection(seconds: float) -> type:
    """A psycopg connection class each of whose round trips fails after ``seconds`` without an
    answer (``ConnectionLimits.answer_timeout``), closing the connection: left open mid-exchange,
    its rollback would wait as long again. The error is psycopg's ``OperationalError``, as a
    dropped connection's: the daemon's outage handling takes it from there."""
    import psycopg

    class AnsweringConnection(psycopg.Connection):  # type: ignore[type-arg]
        def wait(self, gen, interval=0.1, timeout=None):  # type: ignore[no-untyped-def]
            try:
                return super().wait(gen, interval, seconds if timeout is None else timeout)
            except psycopg.OperationalError as exc:
                if type(exc).__name__ != "_WaitTimeout":
                    raise
                self.close()
                raise psycopg.OperationalError(f"the server did not answer within {seconds:g} s") from None

    return AnsweringConnection


def _meddaemons_or_empty(cursor: sqlite3.Cursor) -> bool:
    """Whether a SQLite file holds no table, or meddaemon's (its schema is then made or upgraded):
    another application's file, which the schema code refuses, was switched to WAL first."""
    tables = {row[0] for row in cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return not tables or {"alembic_version", "scans"} <= tables


def enter_wal(cursor: sqlite3.Cursor, busy_timeout: float) -> None:
    """Switch the database to write-ahead logging, waiting for it as for any lock.

    Processes opening a new database file at the same moment race to convert it, and SQLite tells
    the losers "database is locked" at once, without calling its busy handler: of three daemons
    started together on a new database, one failed to start about once in ten."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "database is locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


#: file systems shared over a network (or a cluster): SQLite's locks are not to be trusted there, and
#: its write-ahead log needs shared memory that only processes of one host share
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs"}
)
#: FUSE file systems that are network ones (``fuse.<name>`` in mountinfo)
NETWORK_FUSE = frozenset({"sshfs", "glusterfs", "ceph", "s3fs", "gcsfuse", "rclone", "juicefs"})
MOUNTINFO = Path("/proc/self/mountinfo")


def _make_folder_of(database: Path) -> None:
    """The folder of a SQLite database, made where it is missing; one that cannot be (a file in the
    way, no permission) is a setting to correct, not a traceback."""
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from meddaemon.config import ConfigError

        raise ConfigError(
            f"setting 'db': cannot make the folder of the SQLite database {database}: {exc.strerror or exc}"
        ) from exc


def refuse_network_filesystem(database: Path) -> None:
    """A SQLite database on a network file system is refused before it is opened: SQLite's own
    documentation warns that its locks fail there (two daemons sharing the file corrupt it) and
    that WAL does not work there at all. PostgreSQL is the database of several hosts."""
    kind = filesystem_type(database.parent.resolve())
    if kind is None or not (kind in NETWORK_FILESYSTEMS or kind.removeprefix("fuse.") in NETWORK_FUSE):
        return
    from meddaemon.config import ConfigError

    raise ConfigError(
        f"the SQLite database {database} would be on a network file system ({kind}), where SQLite's locks "
        "fail and its write-ahead log does not work: put the state directory on a local disk, or give "
        "--db a PostgreSQL URL (the database of daemons on several hosts)"
    )


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system ``path`` (absolute, resolved) lies on, from the longest mount
    point above it in ``/proc/self/mountinfo``; None where there is none to read (not Linux)."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    best, kind = -1, None
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if len(parts) < 5 or not rest:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])  # a space is written \040
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= best:
            best, kind = len(point), rest[0]
    return kind


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_lock_error(exc: BaseException) -> bool:
    """Another transaction stood in the way: SQLite's "database is locked"/"busy" (another process
    holds the write lock), PostgreSQL's "deadlock detected" (it rolled this transaction back) and
    "canceling statement due to lock timeout" (``ConnectionLimits.lock_timeout``)."""
    text = str(getattr(exc, "orig", exc)).lower()
    return isinstance(exc, OperationalError) and any(
        sign in text for sign in ("locked", "busy", "deadlock", "lock timeout")
    )


def is_lock_timeout(exc: BaseException) -> bool:
    """PostgreSQL gave up waiting for a lock after ``lock_timeout``."""
    return isinstance(exc, OperationalError) and "lock timeout" in str(getattr(exc, "orig", exc)).lower()


def with_lock_retry(
    work: Callable[[], T],
    on_wait: Callable[[int, BaseException], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    backoff_max: float = 2.0,
    retry_lock_timeouts: bool = True,
) -> T:
    """Run ``work`` (one whole transaction) until it gets past a lock held elsewhere (with
    ``retry_lock_timeouts`` False, a lock timeout is the caller's to handle).

    Nothing is moved on disk before a commit, so retrying a transaction is always safe.
    """
    attempt = 0
    while True:
        try:
            return work()
        except OperationalError as exc:
            if not is_lock_error(exc) or should_stop() or (not retry_lock_timeouts and is_lock_timeout(exc)):
                raise
            attempt += 1
            if on_wait:
                on_wait(attempt, exc)
            time.sleep(min(backoff_max, 0.05 * 2**attempt))


#: how many times a transaction is run again after another process inserted the same unique row first
UNIQUE_RETRIES = 3


def with_unique_retry(work: Callable[[], T], on_retry: Callable[[IntegrityError], None] | None = None) -> T:
    """Run ``work`` (one whole transaction that reads what exists, then inserts what does not) again
    when another process inserted the same unique row between its read and its insert: the next
    run reads that row (two writers registering the same bytes at the same moment on PostgreSQL)."""
    for _ in range(UNIQUE_RETRIES):
        try:
            return work()
        except IntegrityError as exc:
            if on_retry:
                on_retry(exc)
    return work()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session
