"""model_graphs: the SHA-256 of each ONNX graph kept with a model version, recorded when exported

A start whose kept backend choice is ONNX Runtime serves the graph kept in the version's folder
(``onnx/graph-<key>.onnx``) without building the network. That graph was checked only against the
SHA-256 in the ``.json`` beside it, in the same folder, and against the manifest's self-test on two
fixed inputs: a graph edited to answer those two as before, and anything else otherwise, with its
``.json`` rewritten, was served. The database, which vouches for the weights, now vouches for the
graphs exported from them; a kept graph it has no record of is exported again, and recorded.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 16:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_graphs",
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_graphs_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_version_id", "name", name=op.f("pk_model_graphs")),
    )


def downgrade() -> None:
    op.drop_table("model_graphs")
