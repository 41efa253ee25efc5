"""audits: the audits medcli audit stores (issue 6)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 20:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_name", sa.String(length=64), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("compare_model_version_id", sa.Integer(), nullable=True),
        sa.Column("labels_path", sa.Text(), nullable=False),
        sa.Column("labels_sha256", sa.String(length=64), nullable=False),
        sa.Column("labels_format", sa.String(length=16), nullable=False),
        sa.Column("predictions_sha256", sa.String(length=64), nullable=False),
        sa.Column("matched", sa.Integer(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["compare_model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_audits_compare_model_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name=op.f("fk_audits_model_version_id_model_versions")
        ),
        sa.ForeignKeyConstraint(["task_name"], ["tasks.name"], name=op.f("fk_audits_task_name_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audits")),
    )
    op.create_index(op.f("ix_audits_created_at"), "audits", ["created_at"], unique=False)
    op.create_index(op.f("ix_audits_model_version_id"), "audits", ["model_version_id"], unique=False)
    op.create_index(op.f("ix_audits_task_name"), "audits", ["task_name"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_audits_task_name"), table_name="audits")
    op.drop_index(op.f("ix_audits_model_version_id"), table_name="audits")
    op.drop_index(op.f("ix_audits_created_at"), table_name="audits")
    op.drop_table("audits")
