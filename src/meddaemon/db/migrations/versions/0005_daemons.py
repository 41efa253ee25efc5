"""daemons: several daemons on one database, their leases and claims (issue 7)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 23:30:00
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "daemons",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pid_namespace", sa.String(length=64), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_daemons")),
    )
    op.create_index(op.f("ix_daemons_state"), "daemons", ["state"], unique=False)
    op.create_table(
        "inbox_claims",
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("daemon_id", sa.Integer(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("inode", sa.BigInteger(), nullable=False),
        sa.Column("claimed_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["daemon_id"], ["daemons.id"], name=op.f("fk_inbox_claims_daemon_id_daemons"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("path", name=op.f("pk_inbox_claims")),
    )
    op.create_index(op.f("ix_inbox_claims_daemon_id"), "inbox_claims", ["daemon_id"], unique=False)
    _leave_each_stored_name_to_its_newest_scan()
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_scans_claimed_by"), ["claimed_by"], unique=False)
        # two daemons must never file two scans under one name (bookkeeper.free_target)
        batch_op.create_index(batch_op.f("ix_scans_stored_path"), ["stored_path"], unique=True)
        batch_op.create_foreign_key(
            batch_op.f("fk_scans_claimed_by_daemons"), "daemons", ["claimed_by"], ["id"], ondelete="SET NULL"
        )


def _leave_each_stored_name_to_its_newest_scan() -> None:
    """Before this revision a failed or archived file's name was chosen by looking at the disk only:
    once an operator cleared ``failed/``, the next failure of that name took it again, and the
    unique index below refused the upgrade for good. The file is the newest scan's; the older
    scans' was gone already: their name is forgotten, with an event saying so."""
    scans = sa.table("scans", sa.column("id", sa.Integer()), sa.column("state"), sa.column("stored_path"))
    events = sa.table("scan_events", sa.column("scan_id"), sa.column("state"), sa.column("at"), sa.column("detail"))
    bind = op.get_bind()
    shared = (
        sa.select(scans.c.stored_path)
        .where(scans.c.stored_path.is_not(None))
        .group_by(scans.c.stored_path)
        .having(sa.func.count() > 1)
    )
    for path in bind.execute(shared).scalars().all():
        *older, newest = bind.execute(
            sa.select(scans.c.id, scans.c.state).where(scans.c.stored_path == path).order_by(scans.c.id)
        ).all()
        at = datetime.now(UTC)
        bind.execute(
            events.insert(),
            [
                {
                    "scan_id": scan_id,
                    "state": state,
                    "at": at,
                    "detail": f"{path} is scan {newest.id}'s file: this scan's was gone before revision 0005",
                }
                for scan_id, state in older
            ],
        )
        bind.execute(scans.update().where(scans.c.id.in_([scan_id for scan_id, _ in older])).values(stored_path=None))


def downgrade() -> None:
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_scans_claimed_by_daemons"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_scans_stored_path"))
        batch_op.drop_index(batch_op.f("ix_scans_claimed_by"))
        batch_op.drop_column("claimed_by")
    op.drop_index(op.f("ix_inbox_claims_daemon_id"), table_name="inbox_claims")
    op.drop_table("inbox_claims")
    op.drop_index(op.f("ix_daemons_state"), table_name="daemons")
    op.drop_table("daemons")
