"""results heatmaps

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:11:03.257862
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "heatmaps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("array_path", sa.Text(), nullable=False),
        sa.Column("overlay_path", sa.Text(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["result_id"], ["results.id"], name=op.f("fk_heatmaps_result_id_results"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_heatmaps")),
        sa.UniqueConstraint("result_id", name=op.f("uq_heatmaps_result_id")),
    )


def downgrade() -> None:
    op.drop_table("heatmaps")
