"""The schema is created and upgraded by Alembic, identically to the models, on SQLite and PostgreSQL."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from meddaemon.db.migrate import SchemaTooNew, current_revision, head_revision, upgrade
from meddaemon.db.models import Base


def test_upgrade_creates_every_table_at_head(migrated_engine):
    assert current_revision(migrated_engine) == head_revision()
    tables = set(inspect(migrated_engine).get_table_names())
    assert {"scans", "scan_events", "duplicate_arrivals", "tasks", "model_versions", "results"} <= tables


def test_migrations_and_models_agree(migrated_engine):
    with migrated_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_upgrade_twice_is_harmless(migrated_engine):
    upgrade(migrated_engine)
    assert current_revision(migrated_engine) == head_revision()


def test_a_database_from_a_newer_meddaemon_is_refused(migrated_engine):
    with migrated_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    with pytest.raises(SchemaTooNew, match="from_the_future"):
        upgrade(migrated_engine)
