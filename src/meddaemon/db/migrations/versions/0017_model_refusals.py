"""model_refusals: a daemon's refusal of a model version recorded on the version

A daemon that refused the active version (its weights no longer match their SHA-256, its manifest
edited) kept serving its predecessor, or left the task's scans waiting, and said so only in its log:
``models list`` named the refused version active, ``status`` and ``health`` saw nothing while the
predecessor served, and promoting the version again once mended changed nothing, as promoting the
active version did. The refusal is now recorded on the version (``refusal``, ``refused_at``), shown
by those commands, and cleared by a promotion, which daemons take as a reason to try it again.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08 01:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("refusal", sa.Text(), nullable=True))
        batch.add_column(sa.Column("refused_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("refused_at")
        batch.drop_column("refusal")
