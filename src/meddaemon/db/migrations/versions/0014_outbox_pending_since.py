"""outbox.pending_since: when a row last became pending, so a retried row's wait starts at its retry

The queue's oldest pending age (health's ``outbox`` check, the ``oldest_pending_seconds`` metric)
was taken from ``created_at``: ``medcli outbox retry`` of a row dead for days made health
``degraded`` at once and the metric that old. Existing rows start from their creation. The column
may be NULL (read as ``created_at``): a daemon of the version before, still running on a database
another daemon's start upgraded, queues rows without it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("pending_since", sa.Float(), nullable=True))
    op.execute("UPDATE outbox SET pending_since = created_at")


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("pending_since")
