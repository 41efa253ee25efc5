"""failed scans can be retried: SHA-256 unique among the scans that are not failed; scans.retried_at

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 16:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

NOT_FAILED = sa.text("state != 'failed'")


def upgrade() -> None:
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_scans_sha256"), type_="unique")
        batch_op.add_column(sa.Column("retried_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_scans_sha256"), ["sha256"], unique=False)
    # outside the batch: SQLite's copy of the table would not carry the WHERE clause over
    op.create_index(
        "uq_scans_sha256_live",
        "scans",
        ["sha256"],
        unique=True,
        sqlite_where=NOT_FAILED,
        postgresql_where=NOT_FAILED,
    )
    # a scan that failed because its registered copy vanished kept the name of that copy in work/,
    # the name a new attempt of the same bytes is given: the file is gone, so is its name
    op.execute("UPDATE scans SET stored_path = NULL WHERE state = 'failed' AND failure_reason = 'vanished'")


def downgrade() -> None:
    """Fails while a failed scan and a later attempt share a SHA-256 (the old schema cannot hold both)."""
    op.drop_index("uq_scans_sha256_live", table_name="scans")
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scans_sha256"))
        batch_op.drop_column("retried_at")
        batch_op.create_unique_constraint(batch_op.f("uq_scans_sha256"), ["sha256"])
