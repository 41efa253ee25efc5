"""heatmaps.grid: a map's grid kept in its row instead of a .npy file per scan (issue 16)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 08:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heatmaps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("grid", sa.LargeBinary(), nullable=True))
        batch_op.alter_column("array_path", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    # the old schema has no place for a grid: those heatmaps go (their results stay, without a map)
    op.execute("DELETE FROM heatmaps WHERE array_path IS NULL")
    with op.batch_alter_table("heatmaps", schema=None) as batch_op:
        batch_op.alter_column("array_path", existing_type=sa.Text(), nullable=False)
        batch_op.drop_column("grid")
