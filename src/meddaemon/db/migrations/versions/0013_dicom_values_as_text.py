"""values read from DICOM headers kept whole: text columns, where VARCHAR(n) held the standard's maximum

A header breaks its VR's maximum length often enough (a 70-character UID, a CS value of 20): SQLite
kept such a value, PostgreSQL refused the whole batch of scans with it (StringDataRightTruncation),
and the daemon stopped on every start. The values are kept as they came.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 04:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

NOT_FAILED = sa.text("state != 'failed'")

#: table -> (column, its former VARCHAR length)
COLUMNS = {
    "scans": (
        ("photometric_interpretation", 32),
        ("transfer_syntax_uid", 64),
        ("sop_class_uid", 64),
        ("study_instance_uid", 64),
        ("series_instance_uid", 64),
        ("sop_instance_uid", 64),
        ("patient_id", 64),
        ("patient_birth_date", 16),
        ("accession_number", 64),
        ("patient_sex", 16),
        ("patient_age", 16),
        ("modality", 16),
        ("body_part", 64),
        ("view_position", 16),
    ),
    "reports": (("study_instance_uid", 64),),
    "received_instances": (
        ("sop_instance_uid", 64),
        ("sop_class_uid", 64),
        ("study_instance_uid", 64),
        ("series_instance_uid", 64),
        ("transfer_syntax_uid", 64),
    ),
}


def _alter(to_text: bool) -> None:
    # SQLite's batch copy of scans would not carry the partial index's WHERE clause: drop, then recreate
    op.drop_index("uq_scans_sha256_live", table_name="scans")
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, length in columns:
                old, new = (sa.String(length), sa.Text()) if to_text else (sa.Text(), sa.String(length))
                batch_op.alter_column(column, existing_type=old, type_=new)
    op.create_index(
        "uq_scans_sha256_live", "scans", ["sha256"], unique=True, sqlite_where=NOT_FAILED, postgresql_where=NOT_FAILED
    )


def upgrade() -> None:
    _alter(to_text=True)


def downgrade() -> None:
    """Fails on PostgreSQL while a stored value is longer than its old column."""
    _alter(to_text=False)
