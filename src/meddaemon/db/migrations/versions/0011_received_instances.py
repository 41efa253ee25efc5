"""received_instances: which sender pushed which DICOM instance to the receiver (issue 18)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "received_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("file_name", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=False),
        sa.Column("peer_address", sa.String(length=255), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=False),
        sa.Column("association_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_received_instances")),
    )
    op.create_index(op.f("ix_received_instances_sha256"), "received_instances", ["sha256"], unique=False)
    op.create_index(
        op.f("ix_received_instances_sop_instance_uid"), "received_instances", ["sop_instance_uid"], unique=False
    )
    op.create_index(
        "ix_received_instances_study_received",
        "received_instances",
        ["study_instance_uid", "received_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_received_instances_study_received", table_name="received_instances")
    op.drop_index(op.f("ix_received_instances_sop_instance_uid"), table_name="received_instances")
    op.drop_index(op.f("ix_received_instances_sha256"), table_name="received_instances")
    op.drop_table("received_instances")
