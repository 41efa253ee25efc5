"""web console: the actions people take through it (web_actions); worklist indexes by state and task, newest first

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_actions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_actions")),
    )
    op.create_index(op.f("ix_web_actions_at"), "web_actions", ["at"], unique=False)
    op.create_index("ix_scans_state_id", "scans", ["state", "id"], unique=False)
    op.create_index("ix_scans_task_id", "scans", ["task_name", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_scans_task_id", table_name="scans")
    op.drop_index("ix_scans_state_id", table_name="scans")
    op.drop_index(op.f("ix_web_actions_at"), table_name="web_actions")
    op.drop_table("web_actions")
