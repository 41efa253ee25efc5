"""inbox_claims.ctime_ns: a file's change time joins its size, mtime and inode as its identity

A claim's tombstone refuses the file it names for a while after that file left the inbox. Size,
mtime and inode did not tell a new file from the one that left when a move across file systems (a
copy, then the source unlinked) freed the inode and the next file of that name got it back with
the same size and mtime (``cp -p``, ``rsync -a``): it was refused, unsaid, for the tombstone's five
minutes, and ``--once`` waited for it. No one can set a file's change time; a new file has its own.
Existing rows have none: compared as unknown, they refuse as before. A daemon of the version before,
still running beside this one, claims a path without writing its change time: for the five minutes
the path's row lasts, that row keeps the change time of the file before, and this version's daemon
that saw the other's file just before it left may take it for a new one, find it gone and record a
failed ``vanished`` scan (nothing lost, nothing read twice); once every daemon runs 0015, never.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 13:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("inbox_claims", sa.Column("ctime_ns", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox_claims", schema=None) as batch_op:
        batch_op.drop_column("ctime_ns")
