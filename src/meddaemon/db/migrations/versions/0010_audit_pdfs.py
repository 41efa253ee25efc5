"""audit_pdfs: the PDF of an audit, kept with it for the web console; scan_events (state, at) for its throughput chart

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_pdfs",
        sa.Column("audit_id", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["audit_id"], ["audits.id"], name=op.f("fk_audit_pdfs_audit_id_audits"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("audit_id", name=op.f("pk_audit_pdfs")),
    )
    op.create_index("ix_scan_events_state_at", "scan_events", ["state", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_scan_events_state_at", table_name="scan_events")
    op.drop_table("audit_pdfs")
