"""Multi-row INSERTs on the hot paths (a batch's scans, events, results and heatmaps).

They go to the table through SQLAlchemy Core: the rows are plain dicts already, and the ORM's bulk
insert only checks and copies each of them again. New ids come back with ``RETURNING`` and a key
that names each row within the batch; SQLAlchemy's ``sort_by_parameter_order=True`` would put them
in the rows' order too, but on SQLite, which does not promise the order ``RETURNING`` yields rows
in, it sends one INSERT per row (17 statements for a batch of 16 scans; benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_rows(session: Session, model: type[Any], rows: Sequence[Mapping[str, object]]) -> None:
    """``rows`` (column name -> value) into ``model``'s table, as one multi-row INSERT."""
    if rows:
        session.execute(insert(model.__table__), rows)


def insert_missing(session: Session, model: type[Any], rows: Sequence[Mapping[str, object]]) -> None:
    """``rows`` into ``model``'s table, each unless a row with its key is there already, whoever
    inserts it meanwhile (``ON CONFLICT DO NOTHING``): two processes that each saw no row and
    inserted one, the second failed on the primary key."""
    if rows:
        dialect = session.get_bind().dialect.name
        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(dialect_insert(model.__table__).on_conflict_do_nothing(), rows)


def insert_returning_ids(
    session: Session, model: type[Any], rows: Sequence[Mapping[str, object]], key: tuple[str, ...]
) -> list[int]:
    """``rows`` into ``model``'s table as one multi-row INSERT; the new ids, in the rows' order.

    ``key`` names columns whose values tell the rows apart (a unique constraint's, or a name no two
    rows of a batch share). Rows the key does not tell apart are inserted the slower way, ordered by
    SQLAlchemy, so the ids are right whatever the caller passes."""
    if not rows:
        return []
    keys = [tuple(row[column] for column in key) for row in rows]
    if len(set(keys)) < len(keys):
        statement = insert(model).returning(model.id, sort_by_parameter_order=True)
        return list(session.scalars(statement, rows).all())
    table = model.__table__
    returned = session.execute(insert(table).returning(table.c.id, *(table.c[column] for column in key)), rows)
    ids = {tuple(row[1:]): row[0] for row in returned}
    return [ids[k] for k in keys]
