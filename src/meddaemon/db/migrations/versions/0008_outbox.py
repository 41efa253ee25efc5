"""outbox: the DICOM objects of each scan for each destination, and their delivery (issue 14)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("object_key", sa.String(length=96), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["claimed_by"], ["daemons.id"], name=op.f("fk_outbox_claimed_by_daemons"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["scan_id"], ["scans.id"], name=op.f("fk_outbox_scan_id_scans"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("scan_id", "object_key", "destination", name=op.f("uq_outbox_scan_id")),
    )
    op.create_index(op.f("ix_outbox_scan_id"), "outbox", ["scan_id"], unique=False)
    op.create_index(op.f("ix_outbox_claimed_by"), "outbox", ["claimed_by"], unique=False)
    op.create_index("ix_outbox_status_next_attempt_at", "outbox", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_outbox_status_next_attempt_at", table_name="outbox")
    op.drop_index(op.f("ix_outbox_claimed_by"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_scan_id"), table_name="outbox")
    op.drop_table("outbox")
