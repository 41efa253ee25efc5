"""Migration 0009 (evaluations): up and down again keep the live-SHA-256 rule of the scans (the
partial unique index survives SQLite's table copy); down removes evaluated scans with their runs."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import alembic_config, current_revision, head_revision, upgrade


def insert_scan(conn, sha: str, state: str) -> None:  # type: ignore[no-untyped-def]
    conn.execute(
        text(
            "INSERT INTO scans (sha256, state, source_name, registered_at, updated_at) "
            "VALUES (:sha, :state, 'synthetic.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        ),
        {"sha": sha, "state": state},
    )


def test_up_down_and_up_again_keep_one_live_scan_per_content(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        with engine.begin() as conn:
            insert_scan(conn, "a" * 64, "evaluated")
            insert_scan(conn, "b" * 64, "archived")
        with pytest.raises(IntegrityError), engine.begin() as conn:
            insert_scan(conn, "a" * 64, "archived")

        command.downgrade(alembic_config(str(engine.url.render_as_string(hide_password=False))), "0008")
        assert current_revision(engine) == "0008"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT sha256 FROM scans")).scalars().all() == ["b" * 64]
        with engine.begin() as conn:
            insert_scan(conn, "b" * 64, "failed")
        with pytest.raises(IntegrityError), engine.begin() as conn:
            insert_scan(conn, "b" * 64, "routed")

        upgrade(engine)
        with pytest.raises(IntegrityError), engine.begin() as conn:
            insert_scan(conn, "b" * 64, "evaluated")
    finally:
        engine.dispose()
