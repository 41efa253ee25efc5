"""The SQL statements an engine sends, recorded (for tests that a batch goes in as one statement), and
the plans SQLite makes for a query (for tests that it reads its index)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, event, text


@contextmanager
def recorded_statements(engine: Engine, verb: str = "") -> Iterator[list[str]]:
    """Every statement ``engine`` sends meanwhile that begins with ``verb`` (all when empty)."""
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith(verb.upper()):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def sqlite_query_plan(database: Path, query: str) -> str:
    """SQLite's ``EXPLAIN QUERY PLAN`` for ``query`` on a new database at ``database`` with the
    current schema, its steps joined: for tests that a query reads the index it was given."""
    from meddaemon.db.engine import create_db_engine
    from meddaemon.db.migrate import upgrade

    engine = create_db_engine(f"sqlite:///{database}")
    upgrade(engine)
    try:
        with engine.connect() as conn:
            return " ".join(str(row[-1]) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {query}")))
    finally:
        engine.dispose()
