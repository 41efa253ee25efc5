"""Create and upgrade the schema with Alembic, from code.

Only ``meddaemon start`` and ``medcli db upgrade`` change the schema (``upgrade``). Every other
command opens the database as it is (``open_current``): a mistyped ``--state-dir`` must not leave a
new empty database behind, and a newer ``medcli`` must not upgrade a database under running daemons.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url

from meddaemon.db.engine import create_db_engine, is_sqlite, shown_url
from meddaemon.db.readonly import read_only_engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class SchemaError(RuntimeError):
    """The database cannot be used as it is by this meddaemon (it is missing, behind or ahead)."""


class SchemaTooNew(SchemaError):
    """The database was upgraded by a newer meddaemon than this one."""


class DatabaseMissing(SchemaError):
    """There is no meddaemon database where the settings point (no file, or no schema in it)."""


class SchemaTooOld(SchemaError):
    """The schema is behind this meddaemon's: it needs ``medcli db upgrade`` (or a daemon start)."""


class ForeignDatabase(SchemaError):
    """The settings point at another application's database: tables and no meddaemon schema, or an
    Alembic revision of another application's. meddaemon never puts its tables among them."""


#: the form of every meddaemon revision, past and future ("0016"): a revision of another form is
#: another application's, however new this meddaemon is
OUR_REVISION = re.compile(r"[0-9]{4}")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


@contextmanager
def foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite's foreign keys off while the schema changes, on again after. Alembic's batch mode
    copies a table and drops the original, and with the keys on, that drop deletes every row that
    references the table through ON DELETE CASCADE: upgrading a database to 0009 deleted all its
    results and scan events. What the copies hold is checked instead (``check_foreign_keys``)."""
    if connection.dialect.name != "sqlite":
        yield
        return
    # on the driver's connection, outside any transaction (where the pragma does nothing): a
    # SQLAlchemy statement would begin one first (``db.engine``'s BEGIN IMMEDIATE)
    driver = connection.connection.driver_connection
    assert driver is not None and not connection.in_transaction()
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        # an error that dropped the connection (the file unwritable: ``db.engine``) closed it: the
        # pragma there would hide that error under "Cannot operate on a closed database"
        if not connection.invalidated:
            driver.execute("PRAGMA foreign_keys=ON")


def check_foreign_keys(connection: Connection) -> None:
    """SQLite: every reference of the migrated tables points at a row (``foreign_key_check``)."""
    if connection.dialect.name != "sqlite":
        return
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise SchemaError(f"the migration left {len(broken)} broken references in {', '.join(tables)}")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


#: the PostgreSQL advisory lock an upgrade holds (any number; the same for every meddaemon)
UPGRADE_LOCK = 0x6D6564_6462  # "meddb"


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; refuse a database that is ahead of this code. Returns the
    revision it was at (None: empty), read under the lock: another upgrade may have done the work.

    One upgrade at a time: daemons started together on several hosts each upgraded a new
    PostgreSQL database, and all but the first failed on the objects it had just created. The
    revision is read under the lock (SQLite's BEGIN IMMEDIATE, PostgreSQL's advisory lock), so
    the others find the schema done."""
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    url = engine.url.render_as_string(hide_password=False)
    cfg = alembic_config(url)
    with engine.connect() as conn, foreign_keys_off(conn), conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and not _known(script, current):
            raise _unknown_revision(url, current)
        if current is None:
            refuse_others_tables(conn, url)
        else:
            refuse_a_revision_without_our_tables(conn, url, current)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current


def database_location(url: str) -> str:
    """Where a database is, for messages: the SQLite file, or the URL without its password."""
    parsed = make_url(url)
    if is_sqlite(url) and parsed.database:
        return str(Path(parsed.database))
    return shown_url(parsed)


def open_current(url: str, busy_timeout: float = 5.0, read_only: bool = False) -> Engine:
    """An engine on the existing database at ``url`` whose schema is this meddaemon's head.

    Nothing is created: a SQLite file that does not exist is ``DatabaseMissing`` before any
    connection is made (connecting would create it, and its folder). ``read_only``: one that never
    writes, and on SQLite reads a snapshot without waiting for the write lock (``db.readonly``).
    """
    database = make_url(url).database
    if is_sqlite(url) and database and database != ":memory:" and not Path(database).is_file():
        raise _missing(url)
    engine = read_only_engine(url, busy_timeout) if read_only else create_db_engine(url, busy_timeout)
    try:
        require_current(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def require_current(engine: Engine) -> None:
    """Raise a ``SchemaError`` unless the schema of ``engine``'s database is at this meddaemon's head."""
    url = engine.url.render_as_string(hide_password=False)
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            refuse_others_tables(conn, url)
            raise _missing(url)
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and OUR_REVISION.fullmatch(current):
            refuse_a_revision_without_our_tables(conn, url, current)
    head = head_revision()
    if current == head:
        return
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    if current is None:
        raise _missing(url)
    if not _known(script, current):
        raise _unknown_revision(url, current)
    raise SchemaTooOld(
        f"schema is older than this meddaemon: the database at {database_location(url)} is at revision "
        f"{current}, this meddaemon needs {head}; run `medcli db upgrade` or start the daemon"
    )


def _unknown_revision(url: str, revision: str) -> SchemaError:
    if not OUR_REVISION.fullmatch(revision):
        return ForeignDatabase(
            f"the database at {database_location(url)} is another application's (its Alembic revision "
            f"{revision} is none of meddaemon's); point the settings (--db, MEDDAEMON_DB) at meddaemon's database"
        )
    return SchemaTooNew(
        f"database schema at {database_location(url)} is at revision {revision}, which this meddaemon "
        "does not know; upgrade meddaemon before using this database"
    )


def refuse_others_tables(conn: Connection, url: str) -> None:
    """A database without meddaemon's schema gets it only when it holds no table: a mistyped
    ``--db`` put meddaemon's tables among another application's, and said the database "was empty".
    On PostgreSQL the tables of an extension (PostGIS's ``spatial_ref_sys``) are not another application's."""
    tables = sorted(_own_tables(conn))
    if tables:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise ForeignDatabase(
            f"the database at {database_location(url)} holds tables of another application ({shown}) and no "
            "meddaemon schema; give meddaemon a database of its own (--db, MEDDAEMON_DB)"
        )


def refuse_a_revision_without_our_tables(conn: Connection, url: str, revision: str) -> None:
    """Another application's Alembic may number its revisions as meddaemon does (``0005``): its
    database read as meddaemon's "schema older than this meddaemon", and the upgrade advised ended in a
    traceback (no table ``scans``). Every revision of meddaemon's has ``scans``."""
    if not inspect(conn).has_table("scans"):
        raise ForeignDatabase(
            f"the database at {database_location(url)} is another application's (it is at Alembic revision "
            f"{revision} and holds none of meddaemon's tables); point the settings (--db, MEDDAEMON_DB) at "
            "meddaemon's database"
        )


#: the tables of the schema meddaemon would create its own in, less those an extension owns
_POSTGRESQL_TABLES = text(
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT EXISTS "
    "(SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')"
)


def _own_tables(conn: Connection) -> list[str]:
    if conn.dialect.name == "postgresql":
        return [str(name) for name in conn.scalars(_POSTGRESQL_TABLES)]
    return inspect(conn).get_table_names()


def _missing(url: str) -> DatabaseMissing:
    return DatabaseMissing(
        f"no meddaemon database at {database_location(url)} (run `medcli db upgrade` or start the daemon)"
    )


def _known(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:
        return False
