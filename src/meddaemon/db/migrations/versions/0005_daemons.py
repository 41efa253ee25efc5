"""daemons: several daemons on one database, their leases and claims (issue 7)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "daemons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pid_namespace", sa.String(length=64), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_daemons")),
    )
    op.create_index(op.f("ix_daemons_state"), "daemons", ["state"], unique=False)
    op.create_table(
        "inbox_claims",
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("daemon_id", sa.Integer(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("inode", sa.BigInteger(), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["daemon_id"], ["daemons.id"], name=op.f("fk_inbox_claims_daemon_id_daemons"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("path", name=op.f("pk_inbox_claims")),
    )
    op.create_index(op.f("ix_inbox_claims_daemon_id"), "inbox_claims", ["daemon_id"], unique=False)
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_scans_claimed_by"), ["claimed_by"], unique=False)
        # two daemons must never file two scans under one name (bookkeeper.free_target)
        batch_op.create_index(batch_op.f("ix_scans_stored_path"), ["stored_path"], unique=True)
        batch_op.create_foreign_key(
            batch_op.f("fk_scans_claimed_by_daemons"), "daemons", ["claimed_by"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_scans_claimed_by_daemons"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_scans_stored_path"))
        batch_op.drop_index(batch_op.f("ix_scans_claimed_by"))
        batch_op.drop_column("claimed_by")
    op.drop_index(op.f("ix_inbox_claims_daemon_id"), table_name="inbox_claims")
    op.drop_table("inbox_claims")
    op.drop_index(op.f("ix_daemons_state"), table_name="daemons")
    op.drop_table("daemons")
