"""Who holds which work, so that daemons sharing a database never do the same work twice.

- An inbox file is claimed (a row in ``inbox_claims``, keyed by its path) before it is read; the
  claim holds until the file has left the inbox, and a while after as a tombstone against daemons
  that saw the file just before it left. ``INSERT ... ON CONFLICT`` makes the claim atomic on
  PostgreSQL and SQLite alike. A claim left unrecorded past a deadline (a daemon whose workers are
  slow to start, or stuck) may be taken over by another daemon; recording renews it
  (``held_inbox_files``), and the first holder's late record is fenced like a lost daemon's.
- A scan's next stage (inference, report) is claimed by setting ``scans.claimed_by``, choosing the
  rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent daemons take disjoint sets without
  waiting for each other. SQLite drops ``SKIP LOCKED`` silently; there ``BEGIN IMMEDIATE`` already
  serialises every writer, which gives the same result on one host.
- Storing the outcome of a claimed stage is fenced: it only counts if the claim is still the
  daemon's (``held_inbox_files``, ``scans_held``), so a daemon declared lost that wakes up later
  cannot store a second result, write a second report (``report.builder.claimed_scan_reports``)
  or carry out a move another daemon took over (``bookkeeper.moves_still_due``). A daemon no longer
  running claims and stores nothing at all (``still_running``), and what a claim racing its
  declaration left it holding is given back at the next look for lost daemons (``held_by_the_gone``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, delete, exists, or_, select, true, union, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from meddaemon.daemon.stability import StableFile
from meddaemon.db.clock import db_clock
from meddaemon.db.models import DaemonInstance, DuplicateArrival, InboxClaim, Scan

#: how long the claim of a file that left the inbox stays, refusing that same file (seconds)
TOMBSTONE_SECONDS = 300.0


@dataclass(frozen=True)
class Released:
    scans: int = 0
    inbox_files: int = 0
    kept_for_moves: int = 0


def claim_inbox_files(
    session: Session, daemon_id: int, files: Iterable[StableFile], unread_after: float | None = None
) -> set[Path]:
    """Claim the files no other daemon holds; returns the paths this daemon got.

    A path whose claim ended (the file left the inbox) can be claimed again only by a different file:
    another size, mtime, inode or change time. The same file seen a moment before it left is refused, so it is
    never read after another daemon moved it away.

    With ``unread_after`` (seconds), a file another daemon claimed longer ago than that and has not
    recorded (its claim neither renewed by a record nor kept for a committed move) is taken over.
    """
    wanted = {str(f.path): f for f in files}
    if not wanted or not session.scalar(select(still_running(daemon_id))):
        return set()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    rows = [
        {
            "path": path,
            "daemon_id": daemon_id,
            "size": f.signature.size,
            "mtime_ns": f.signature.mtime_ns,
            "inode": f.signature.inode,
            "ctime_ns": f.signature.ctime_ns,
            "done_at": None,
        }
        for path, f in sorted(wanted.items())  # one order for every daemon: no lock cycles between them
    ]
    # the rows as parameters of one cached statement (SQLAlchemy sends them as one multi-row INSERT,
    # in this order): rows built into the statement made a new statement to compile for every batch
    statement = insert(InboxClaim).values(claimed_at=db_clock())
    new = statement.excluded
    another_file = or_(
        InboxClaim.size != new.size,
        InboxClaim.mtime_ns != new.mtime_ns,
        InboxClaim.inode != new.inode,
        # NULL (a row from before 0015): unknown, not another. A daemon of the version before leaves
        # the change time of the path's previous file in the row (migration 0015 says what follows)
        InboxClaim.ctime_ns != new.ctime_ns,
    )
    won = session.scalars(
        statement.on_conflict_do_update(
            index_elements=["path"],
            set_={
                column: new[column]
                for column in ("daemon_id", "size", "mtime_ns", "inode", "ctime_ns", "claimed_at", "done_at")
            },
            where=or_(
                and_(InboxClaim.done_at.is_not(None), another_file),
                *([_held_unread(daemon_id, unread_after)] if unread_after is not None else []),
            ),
        ).returning(InboxClaim.path),
        rows,
    ).all()
    return {wanted[p].path for p in won}


def _held_unread(daemon_id: int, older_than: float):  # type: ignore[no-untyped-def]
    """An open claim of another daemon, neither renewed for ``older_than`` seconds nor kept for a
    committed move out of the inbox."""
    moving = or_(
        select(Scan.id).where(Scan.pending_move_from == InboxClaim.path).exists(),
        select(DuplicateArrival.id).where(DuplicateArrival.pending_move_from == InboxClaim.path).exists(),
    )
    return and_(
        InboxClaim.done_at.is_(None),
        InboxClaim.daemon_id.is_not(None),
        InboxClaim.daemon_id != daemon_id,
        InboxClaim.claimed_at < db_clock() - older_than,
        ~moving,
    )


def held_inbox_files(session: Session, daemon_id: int, paths: Iterable[Path]) -> set[str]:
    """Of ``paths``, those this daemon still holds, locked until the transaction ends, their claims
    renewed: a daemon that records a file has read it, and no other may take it over now."""
    names = [str(p) for p in paths]
    if not names:
        return set()
    query = (
        select(InboxClaim.path)
        .where(InboxClaim.daemon_id == daemon_id, InboxClaim.done_at.is_(None), InboxClaim.path.in_(names))
        .where(still_running(daemon_id))
        .order_by(InboxClaim.path)
        .with_for_update()
    )
    held = set(session.scalars(query))
    for chunk in _chunks(held):
        session.execute(update(InboxClaim).where(InboxClaim.path.in_(chunk)).values(claimed_at=db_clock()))
    return held


def release_inbox_files(session: Session, paths: Iterable[Path | str], held_by: int | None = None) -> None:
    """Drop the claims on files that stay in the inbox after all (changed while read, or gone);
    with ``held_by``, only that daemon's (a file it held too long may be another's now)."""
    mine = InboxClaim.daemon_id == held_by if held_by is not None else true()
    for chunk in _chunks(paths):
        session.execute(delete(InboxClaim).where(InboxClaim.path.in_(chunk), InboxClaim.done_at.is_(None), mine))


def finish_inbox_files(session: Session, paths: Iterable[Path | str]) -> None:
    """The files left the inbox: their claims become tombstones (see ``claim_inbox_files``)."""
    for chunk in _chunks(paths):
        session.execute(
            update(InboxClaim)
            .where(InboxClaim.path.in_(chunk), InboxClaim.done_at.is_(None))
            .values(done_at=db_clock(), daemon_id=None)
        )


def forget_finished(session: Session, older_than: float = TOMBSTONE_SECONDS) -> int:
    """Delete the tombstones of files that left the inbox more than ``older_than`` seconds ago."""
    gone = session.execute(delete(InboxClaim).where(InboxClaim.done_at < db_clock() - older_than))
    return gone.rowcount  # type: ignore[attr-defined,no-any-return]


def _chunks(paths: Iterable[Path | str], size: int = 500) -> Iterator[list[str]]:
    names = sorted({str(p) for p in paths})
    for start in range(0, len(names), size):
        yield names[start : start + size]


def still_running(daemon_id: int | None):  # type: ignore[no-untyped-def]
    """True while ``daemon_id`` is running (always, without a daemon): a daemon declared lost
    claims and stores nothing, though it may wake up mid-turn (a main loop stalled past the lease)
    and its sender process live on, and every other daemon may take what it held."""
    if daemon_id is None:
        return true()
    return exists(select(DaemonInstance.id).where(DaemonInstance.id == daemon_id, DaemonInstance.state == "running"))


def claimable_by(daemon_id: int | None):  # type: ignore[no-untyped-def]
    """Scans free for this daemon's next stage: nobody's, or already its own; none for a daemon
    no longer running (a daemon declared lost that woke up claimed the scans released meanwhile,
    or stored their results, under an id nothing releases again)."""
    if daemon_id is None:
        return Scan.claimed_by.is_(None)
    return and_(or_(Scan.claimed_by.is_(None), Scan.claimed_by == daemon_id), still_running(daemon_id))


def scans_held(session: Session, daemon_id: int | None, scan_ids: Collection[int]) -> dict[int, Scan]:
    """The scans among ``scan_ids`` this daemon still holds, locked (in id order, so two
    transactions never wait on each other in a circle) until the transaction ends."""
    if not scan_ids:
        return {}
    query = (
        select(Scan)
        .where(Scan.id.in_(list(scan_ids)), claimable_by(daemon_id))
        .order_by(Scan.id)
        .with_for_update(of=Scan)
    )
    return {scan.id: scan for scan in session.scalars(query)}


def held_by_the_gone(session: Session) -> list[int]:
    """The daemons no longer running that hold scans or inbox claims: those they took after their
    release (a claim made as another declared them lost), which nothing would give back."""
    gone = select(DaemonInstance.id).where(DaemonInstance.state != "running")
    scans = select(Scan.claimed_by).where(Scan.claimed_by.in_(gone))
    files = select(InboxClaim.daemon_id).where(InboxClaim.daemon_id.in_(gone), InboxClaim.done_at.is_(None))
    return sorted(set(session.scalars(union(scans, files))))


def release_daemons(session: Session, daemon_ids: Collection[int]) -> Released:
    """Give back what stopped or lost daemons held: their scans, and their inbox claims, except the
    claims of files whose move out of the inbox is committed and not yet done (those stay, held by
    nobody, until recovery finishes the move)."""
    ids = list(daemon_ids)
    if not ids:
        return Released()
    release_scans = update(Scan).where(Scan.claimed_by.in_(ids)).values(claimed_by=None)
    scans = session.execute(release_scans).rowcount  # type: ignore[attr-defined]
    # Then wait for a transaction of theirs still holding their claims (a record frozen on its way
    # to the server): under READ COMMITTED a statement that waited for a row re-reads that row but
    # not its subqueries, and the claims of moves committed meanwhile were dropped as though none
    # were pending (a file moved, then claimed again and failed as vanished). The statements after
    # this one see what that transaction committed: its scans are released too. Scans before
    # claims, the order in which a daemon's own transactions lock them (``clear_pending``).
    session.execute(
        select(InboxClaim.path).where(InboxClaim.daemon_id.in_(ids), InboxClaim.done_at.is_(None)).with_for_update()
    )
    scans += session.execute(release_scans).rowcount  # type: ignore[attr-defined]
    moving = union(
        select(Scan.pending_move_from).where(Scan.pending_move_from.is_not(None)),
        select(DuplicateArrival.pending_move_from).where(DuplicateArrival.pending_move_from.is_not(None)),
    ).subquery()
    kept = session.execute(
        update(InboxClaim)
        .where(InboxClaim.daemon_id.in_(ids), InboxClaim.done_at.is_(None), InboxClaim.path.in_(select(moving.c[0])))
        .values(daemon_id=None)
    )
    dropped = session.execute(delete(InboxClaim).where(InboxClaim.daemon_id.in_(ids), InboxClaim.done_at.is_(None)))
    return Released(scans, dropped.rowcount, kept.rowcount)  # type: ignore[attr-defined]
