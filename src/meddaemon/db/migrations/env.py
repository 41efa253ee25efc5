"""Alembic environment: runs on the connection ``db.migrate`` hands over, or on ``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import check_foreign_keys, foreign_keys_off
from meddaemon.db.models import Base

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        check_foreign_keys(connection)


connection = config.attributes.get("connection")
if connection is not None:  # db.migrate.upgrade's, its foreign keys already off
    run(connection)
else:
    engine = create_db_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn, foreign_keys_off(conn):
        run(conn)
    engine.dispose()
