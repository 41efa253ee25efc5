"""evaluations: cohorts read in place by ``medcli evaluate``; scans.source_path and scans.evaluation_id

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NOT_FAILED = sa.text("state != 'failed'")


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("task_name", sa.String(length=64), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("dataset_path", sa.Text(), nullable=False),
        sa.Column("dataset_layout", sa.String(length=32), nullable=False),
        sa.Column("dataset_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("engine", sa.String(length=16), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("files_total", sa.Integer(), nullable=False),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("reused", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("failures", sa.JSON(), nullable=False),
        sa.Column("images_per_second", sa.Float(), nullable=True),
        sa.Column("meddaemon_version", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name=op.f("fk_evaluations_model_version_id_model_versions")
        ),
        sa.ForeignKeyConstraint(["task_name"], ["tasks.name"], name=op.f("fk_evaluations_task_name_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint("name", name=op.f("uq_evaluations_name")),
    )
    op.create_index(op.f("ix_evaluations_model_version_id"), "evaluations", ["model_version_id"], unique=False)
    op.create_index(op.f("ix_evaluations_state"), "evaluations", ["state"], unique=False)
    op.create_index(op.f("ix_evaluations_task_name"), "evaluations", ["task_name"], unique=False)

    # SQLite's batch copy of scans would not carry the partial index's WHERE clause: drop, then recreate
    op.drop_index("uq_scans_sha256_live", table_name="scans")
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_path", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("evaluation_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_scans_evaluation_id"), ["evaluation_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_scans_evaluation_id_evaluations"),
            "evaluations",
            ["evaluation_id"],
            ["id"],
            ondelete="SET NULL",
        )
    op.create_index(
        "uq_scans_sha256_live", "scans", ["sha256"], unique=True, sqlite_where=NOT_FAILED, postgresql_where=NOT_FAILED
    )

    op.create_table(
        "evaluation_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("scan_id", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("failure_reason", sa.String(length=64), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["evaluation_id"],
            ["evaluations.id"],
            name=op.f("fk_evaluation_files_evaluation_id_evaluations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["scan_id"], ["scans.id"], name=op.f("fk_evaluation_files_scan_id_scans"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_files")),
        sa.UniqueConstraint("evaluation_id", "path", name=op.f("uq_evaluation_files_evaluation_id")),
    )
    op.create_index(op.f("ix_evaluation_files_evaluation_id"), "evaluation_files", ["evaluation_id"], unique=False)
    op.create_index(op.f("ix_evaluation_files_scan_id"), "evaluation_files", ["scan_id"], unique=False)


def downgrade() -> None:
    """Evaluated scans go with their evaluations (they were never in the daemon's pipeline)."""
    op.drop_index(op.f("ix_evaluation_files_scan_id"), table_name="evaluation_files")
    op.drop_index(op.f("ix_evaluation_files_evaluation_id"), table_name="evaluation_files")
    op.drop_table("evaluation_files")
    op.execute("DELETE FROM scans WHERE state = 'evaluated'")
    op.drop_index("uq_scans_sha256_live", table_name="scans")
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_scans_evaluation_id_evaluations"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_scans_evaluation_id"))
        batch_op.drop_column("evaluation_id")
        batch_op.drop_column("source_path")
    op.create_index(
        "uq_scans_sha256_live", "scans", ["sha256"], unique=True, sqlite_where=NOT_FAILED, postgresql_where=NOT_FAILED
    )
    op.drop_index(op.f("ix_evaluations_task_name"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_state"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_model_version_id"), table_name="evaluations")
    op.drop_table("evaluations")
