"""What a database error says reaches the log (its traceback, the journal): never the statement's
values, which are DICOM header values. SQLite and PostgreSQL, the read-write and read-only engines."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from meddaemon.db.engine import create_db_engine, is_sqlite
from meddaemon.db.readonly import read_only_engine

PHI = "SYNTHETIC^PATIENT^PHI"


def refused_insert(engine: Engine, url: str) -> DBAPIError:
    """An INSERT of a scan carrying ``PHI`` that the database refuses with a message of its own
    that quotes no value (SQLite: NOT NULL; PostgreSQL: a state longer than its VARCHAR(32))."""
    state = None if is_sqlite(url) else "x" * 40
    with pytest.raises(DBAPIError) as refused, engine.begin() as conn:
        conn.execute(
            text("INSERT INTO scans (state, source_name, patient_name) VALUES (:state, 'synthetic.dcm', :name)"),
            {"state": state, "name": PHI},
        )
    return refused.value


def test_a_refused_statement_s_error_quotes_none_of_its_values(migrated_engine: Engine, db_url: str):
    engine = create_db_engine(db_url)
    try:
        error = refused_insert(engine, db_url)
    finally:
        engine.dispose()
    assert "INSERT INTO scans" in str(error)  # the statement is named; its values are not
    assert PHI not in str(error) and "parameters hidden" in str(error)


def test_nor_does_the_read_only_engine_s(migrated_engine: Engine, db_url: str):
    engine = read_only_engine(db_url)
    try:
        with pytest.raises(DBAPIError) as refused, engine.begin() as conn:  # a write: refused as read-only
            conn.execute(
                text("INSERT INTO scans (state, source_name, patient_name) VALUES ('x', 'synthetic.dcm', :name)"),
                {"name": PHI},
            )
    finally:
        engine.dispose()
    assert PHI not in str(refused.value) and "parameters hidden" in str(refused.value)
