"""Claims: daemons sharing a database take disjoint work and never store a result twice, on SQLite
and PostgreSQL (where several transactions really run at once).

Every scan row here is SYNTHETIC (made-up hashes and names); no image is read.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from daemon_rows import add_scan, inbox_file, join, look_for_lost
from meddaemon.daemon import bookkeeper, claims
from meddaemon.daemon.bookkeeper import Destinations, InferenceOutcome
from meddaemon.daemon.stability import Signature
from meddaemon.db.clock import db_clock
from meddaemon.db.engine import create_db_engine, session_factory, transaction, with_lock_retry
from meddaemon.db.migrate import upgrade
from meddaemon.db.models import InboxClaim, ModelVersion, Result, Scan
from meddaemon.engine.tasks import all_tasks
from meddaemon.states import ScanState
from sql_statements import recorded_statements

BUSI_LABELS = ["benign", "malignant", "normal"]


def destinations(tmp_path: Path) -> Destinations:
    return Destinations(tmp_path / "work", tmp_path / "archive", tmp_path / "failed")


def model_row(session) -> ModelVersion:  # type: ignore[no-untyped-def]
    row = ModelVersion(
        task_name="busi",
        version="synthetic",
        architecture="small_cnn",
        sha256="0" * 64,
        path="/synthetic",
        status="active",
        manifest={"labels": BUSI_LABELS, "thresholds": {}},
    )
    session.add(row)
    session.flush()
    return row


#: ``claim_inbox_files``'s deadline in these tests; claims are made stale by dating them back past it,
#: never by sleeping: a claim made a moment ago must stay fresh however slowly the next statement runs
UNREAD_AFTER = 30.0


def claimed_ago(sessions, path: Path, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """The open claim on ``path`` dated ``seconds`` back, by the database's clock: a daemon holding it
    that long without recording it."""
    with transaction(sessions) as session:
        session.execute(update(InboxClaim).where(InboxClaim.path == str(path)).values(claimed_at=db_clock() - seconds))


def store(sessions, daemon_id: int, scan_id: int, tmp_path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """Store a result for ``scan_id`` as daemon ``daemon_id`` would; returns the outcomes' states."""
    with transaction(sessions) as session:
        model = session.scalar(select(ModelVersion))
        outcome = InferenceOutcome(scan_id, [0.7, 0.2, 0.1], [True, False, False])
        record = bookkeeper.record_results(session, model, [outcome], destinations(tmp_path), daemon_id)
    return [o.state for o in record.outcomes]


def test_an_inbox_file_is_claimed_by_one_daemon_until_it_leaves_the_inbox(sessions):
    a, b = join(sessions, "node-a"), join(sessions, "node-b")
    files = [inbox_file(Path(f"/inbox/busi/synthetic_{i}.png")) for i in range(6)]
    paths = [f.path for f in files]
    with transaction(sessions) as session:
        got_a = claims.claim_inbox_files(session, a.daemon_id, files[:4])
    with transaction(sessions) as session:
        got_b = claims.claim_inbox_files(session, b.daemon_id, files[2:])
    assert got_a == set(paths[:4]) and got_b == set(paths[4:])

    with transaction(sessions) as session:
        claims.release_inbox_files(session, paths[:1])  # changed while read: it stays in the inbox
        claims.finish_inbox_files(session, paths[1:2])  # moved out of the inbox
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, b.daemon_id, files) == {paths[0]}


def test_a_daemon_gives_back_only_its_own_claims_on_files_another_took_over(sessions):
    """A daemon stopping gives back the files whose reads it gave up: one it held past
    ``claim_unread_seconds`` may be another's by then, and that claim was deleted with its own."""
    a, b = join(sessions, "node-a"), join(sessions, "node-b")
    mine, taken_over = (inbox_file(Path(f"/inbox/busi/synthetic_{i}.png")) for i in range(2))
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, a.daemon_id, [mine])
        claims.claim_inbox_files(session, b.daemon_id, [taken_over])

    with transaction(sessions) as session:
        claims.release_inbox_files(session, [mine.path, taken_over.path], held_by=a.daemon_id)

    with sessions() as session:
        assert session.execute(select(InboxClaim.path, InboxClaim.daemon_id)).all() == [
            (str(taken_over.path), b.daemon_id)
        ]


def test_a_file_seen_just_before_it_left_cannot_be_claimed_but_a_new_file_of_that_name_can(sessions):
    a, b = join(sessions, "node-a"), join(sessions, "node-b")
    moved = inbox_file(Path("/inbox/busi/synthetic_same_name.png"), inode=11)
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, a.daemon_id, [moved])
    with transaction(sessions) as session:
        claims.finish_inbox_files(session, [moved.path])

    with transaction(sessions) as session:  # b's tracker stat the file a moment before a moved it
        assert claims.claim_inbox_files(session, b.daemon_id, [moved]) == set()
    dropped_again = inbox_file(moved.path, inode=12)
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, b.daemon_id, [dropped_again]) == {moved.path}


def test_a_new_file_given_the_freed_inode_size_and_mtime_of_one_that_left_is_told_apart_by_its_change_time(
    sessions, tmp_path: Path
):
    """A move across file systems (a copy, then the source unlinked) frees the inode, and the next
    file of that name can get it back with the size and mtime of the one that left (``cp -p``,
    ``rsync -a``): it was refused, unsaid, for the tombstone's five minutes. Its change time, which
    no one can set, is its own."""
    first = tmp_path / "synthetic_scan.png"
    first.write_bytes(b"SYNTHETIC" * 10)
    was = Signature.of(os.stat(first))
    first.unlink()
    time.sleep(0.05)  # the kernel's coarse clock stamps change times a few milliseconds apart
    first.write_bytes(b"synthetic" * 10)
    os.utime(first, ns=(was.mtime_ns, was.mtime_ns))
    now = Signature.of(os.stat(first))
    assert (now.size, now.mtime_ns) == (was.size, was.mtime_ns) and now.ctime_ns != was.ctime_ns

    a = join(sessions, "node-a")
    path = Path("/inbox/busi/synthetic_scan.png")
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, a.daemon_id, [inbox_file(path, inode=21, ctime_ns=was.ctime_ns)])
        claims.finish_inbox_files(session, [path])
    with transaction(sessions) as session:
        assert (
            claims.claim_inbox_files(session, a.daemon_id, [inbox_file(path, inode=21, ctime_ns=was.ctime_ns)]) == set()
        )
        assert claims.claim_inbox_files(session, a.daemon_id, [inbox_file(path, inode=21, ctime_ns=now.ctime_ns)]) == {
            path
        }


def test_a_file_claimed_but_not_recorded_past_the_deadline_is_taken_over_and_its_first_holder_fenced(sessions):
    slow, peer = join(sessions, "node-slow"), join(sessions, "node-peer")
    stale, fresh = (inbox_file(Path(f"/inbox/busi/synthetic_{n}.png")) for n in ("stale", "fresh"))
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, slow.daemon_id, [stale, fresh])
    claimed_ago(sessions, stale.path, UNREAD_AFTER + 30)

    with transaction(sessions) as session:  # a peer without a deadline leaves both alone
        assert claims.claim_inbox_files(session, peer.daemon_id, [stale, fresh]) == set()
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, peer.daemon_id, [stale, fresh], UNREAD_AFTER) == {stale.path}
    with transaction(sessions) as session:  # the slow daemon's reads come back: it records only what it holds
        assert claims.held_inbox_files(session, slow.daemon_id, [stale.path, fresh.path]) == {str(fresh.path)}
        assert claims.held_inbox_files(session, peer.daemon_id, [stale.path]) == {str(stale.path)}


def test_recording_renews_a_claim_so_a_file_being_recorded_is_not_taken_over(sessions):
    holder, peer = join(sessions, "node-a"), join(sessions, "node-b")
    f = inbox_file(Path("/inbox/busi/synthetic_recorded.png"))
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, holder.daemon_id, [f])
    claimed_ago(sessions, f.path, UNREAD_AFTER + 30)
    with transaction(sessions) as session:
        assert claims.held_inbox_files(session, holder.daemon_id, [f.path]) == {str(f.path)}
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, peer.daemon_id, [f], UNREAD_AFTER) == set()


def test_a_stale_claim_is_not_taken_over_from_a_committed_move_nor_by_its_own_holder(sessions):
    holder, peer = join(sessions, "node-a"), join(sessions, "node-b")
    moving = inbox_file(Path("/inbox/busi/synthetic_moving.png"))
    reread = inbox_file(Path("/inbox/busi/synthetic_reread.png"))
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, holder.daemon_id, [moving, reread])
        add_scan(session, 1, pending_move_from=str(moving.path))  # recorded, its move not carried out yet
    for f in (moving, reread):
        claimed_ago(sessions, f.path, UNREAD_AFTER + 30)
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, peer.daemon_id, [moving], UNREAD_AFTER) == set()
    with transaction(sessions) as session:  # a rescan handed the holder its own file again while it reads it
        assert claims.claim_inbox_files(session, holder.daemon_id, [reread], UNREAD_AFTER) == set()


def test_tombstones_of_files_that_left_are_forgotten_after_a_while(sessions):
    a = join(sessions)
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, a.daemon_id, [inbox_file(Path("/inbox/synthetic_old.png"))])
        claims.finish_inbox_files(session, [Path("/inbox/synthetic_old.png")])
    with transaction(sessions) as session:
        assert claims.forget_finished(session, older_than=60) == 0
    time.sleep(0.05)
    with transaction(sessions) as session:
        assert claims.forget_finished(session, older_than=0.01) == 1


def test_concurrent_daemons_split_the_routed_scans_between_them(sessions):
    with transaction(sessions) as session:
        for n in range(200):
            add_scan(session, n)
    members = [join(sessions, f"node-{i}") for i in range(4)]
    taken: dict[int, list[int]] = {m.daemon_id: [] for m in members}
    start = threading.Barrier(len(members))

    def work(daemon_id: int) -> None:
        start.wait()
        while True:

            def claim() -> list[int]:
                with transaction(sessions) as session:
                    return [
                        s.scan_id
                        for s in bookkeeper.claim_for_inference(session, ["busi"], set(taken[daemon_id]), 7, daemon_id)
                    ]

            got = with_lock_retry(claim)
            if not got:
                return
            taken[daemon_id] += got
            time.sleep(0.001)  # the work itself

    threads = [threading.Thread(target=work, args=(m.daemon_id,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    everything = [scan_id for got in taken.values() for scan_id in got]
    assert len(everything) == len(set(everything)) == 200, "each scan claimed exactly once"
    with sessions() as session:
        owners = dict(session.execute(select(Scan.id, Scan.claimed_by)).all())
    assert all(owners[scan_id] == daemon_id for daemon_id, got in taken.items() for scan_id in got)


@pytest.mark.postgres
def test_on_postgresql_a_claim_skips_rows_another_transaction_holds_instead_of_waiting(postgres_url, tmp_path):
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    factory = session_factory(engine)
    with transaction(factory) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(factory) as session:
        for n in range(10):
            add_scan(session, n)
    a, b = join(factory, "node-a"), join(factory, "node-b")
    holding = factory()
    holding.begin()
    first = bookkeeper.claim_for_inference(holding, ["busi"], (), 4, a.daemon_id)  # not committed yet
    started = time.monotonic()
    with transaction(factory) as session:
        second = bookkeeper.claim_for_inference(session, ["busi"], (), 10, b.daemon_id)
    assert time.monotonic() - started < 4.0  # not the 5 s lock timeout
    holding.commit()
    holding.close()
    assert {s.scan_id for s in first}.isdisjoint({s.scan_id for s in second})
    assert len(first) + len(second) == 10
    engine.dispose()


def test_a_daemon_declared_lost_cannot_store_a_result_for_a_scan_taken_over(sessions, tmp_path):
    slow = join(sessions, "node-slow", lease_seconds=1.0)
    with transaction(sessions) as session:
        model_row(session)
        scan_id = add_scan(session, 1).id
    with transaction(sessions) as session:
        [claimed] = bookkeeper.claim_for_inference(session, ["busi"], (), 5, slow.daemon_id)
    assert claimed.scan_id == scan_id

    time.sleep(1.3)  # the slow daemon stalls past its lease; another takes its scan over
    other = join(sessions, "node-other")
    look_for_lost(sessions, other)
    with transaction(sessions) as session:
        assert [s.scan_id for s in bookkeeper.claim_for_inference(session, ["busi"], (), 5, other.daemon_id)] == [
            scan_id
        ]

    assert store(sessions, slow.daemon_id, scan_id, tmp_path) == []  # the stalled daemon wakes up: fenced
    assert store(sessions, other.daemon_id, scan_id, tmp_path) == ["inferred"]
    assert store(sessions, other.daemon_id, scan_id, tmp_path) == []  # a replay stores nothing either
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == len(BUSI_LABELS)
        scan = session.get(Scan, scan_id)
        assert scan.state == ScanState.INFERRED and scan.claimed_by is None


def test_a_daemon_declared_lost_claims_stores_and_records_nothing_even_what_nobody_took_over(sessions, tmp_path):
    """Woken up mid-turn, a daemon declared lost claimed the scans its release had freed, stored
    their results, and recorded the inbox files it had claimed as it was being declared lost: all
    under an id nothing released again, so those scans stayed claimed for ever."""
    slow = join(sessions, "node-slow", lease_seconds=1.0)
    source = tmp_path / "inbox" / "busi" / "synthetic_2.png"
    with transaction(sessions) as session:
        model_row(session)
        scan_id = add_scan(session, 1).id
        claims.claim_inbox_files(session, slow.daemon_id, [inbox_file(source)])
    time.sleep(1.3)  # the slow daemon stalls past its lease; another declares it lost
    [lost] = look_for_lost(sessions, join(sessions, "node-other"))
    assert lost.daemon_id == slow.daemon_id

    with transaction(sessions) as session:
        assert bookkeeper.claim_for_inference(session, ["busi"], (), 5, slow.daemon_id) == []
        assert claims.held_inbox_files(session, slow.daemon_id, [source]) == set()
        assert claims.claim_inbox_files(session, slow.daemon_id, [inbox_file(source.with_name("new.png"))]) == set()
    assert store(sessions, slow.daemon_id, scan_id, tmp_path) == []
    with sessions() as session:
        assert session.get(Scan, scan_id).claimed_by is None
        assert session.scalar(select(func.count()).select_from(Result)) == 0


def test_what_a_daemon_claimed_as_it_was_declared_lost_is_released_at_the_next_look_for_lost_daemons(
    sessions, tmp_path
):
    """A claim racing the declaration (its transaction begun before, committed after the release)
    leaves a scan and an inbox file held by a daemon no longer running: the next look for lost
    daemons, by any daemon, gives them back."""
    slow = join(sessions, "node-slow", lease_seconds=1.0)
    source = tmp_path / "inbox" / "busi" / "synthetic_3.png"
    with transaction(sessions) as session:
        scan_id = add_scan(session, 1).id
    time.sleep(1.3)
    other = join(sessions, "node-other")
    [lost] = look_for_lost(sessions, other)
    assert lost.released == claims.Released()
    with transaction(sessions) as session:  # what the racing claim committed after the release
        session.execute(update(Scan).where(Scan.id == scan_id).values(claimed_by=slow.daemon_id))
        session.add(InboxClaim(path=str(source), daemon_id=slow.daemon_id, size=1, mtime_ns=1, inode=1, claimed_at=0.0))

    [late] = look_for_lost(sessions, other)
    assert (late.daemon_id, late.why) == (slow.daemon_id, "it claimed work after it was declared lost or stopped")
    assert late.released == claims.Released(scans=1, inbox_files=1)
    with transaction(sessions) as session:
        assert [s.scan_id for s in bookkeeper.claim_for_inference(session, ["busi"], (), 5, other.daemon_id)] == [
            scan_id
        ]
        assert claims.claim_inbox_files(session, other.daemon_id, [inbox_file(source)]) == {source}
    assert look_for_lost(sessions, other) == []


def test_the_claim_on_a_file_whose_move_is_committed_outlives_its_lost_daemon(sessions, tmp_path):
    source = tmp_path / "inbox" / "busi" / "synthetic_1.png"
    crashed = join(sessions, "node-a", lease_seconds=1.0)
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, crashed.daemon_id, [inbox_file(source)])
        scan = add_scan(session, 1, pending_move_from=str(source))
        move = bookkeeper.PlannedMove("scan", scan.id, source, Path(scan.stored_path))

    time.sleep(1.3)
    other = join(sessions, "node-b")
    [lost] = look_for_lost(sessions, other)
    assert lost.released.kept_for_moves == 1
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, other.daemon_id, [inbox_file(source, inode=2)]) == set(), (
            "while its move is pending, the file is not a new arrival"
        )
    with transaction(sessions) as session:
        bookkeeper.clear_pending(session, [move])  # recovery carried the move out
        [claim] = session.scalars(select(InboxClaim)).all()
        assert claim.done_at is not None and claim.daemon_id is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_on_postgresql_claims_whose_move_commits_while_their_daemon_is_released_are_kept(sessions, tmp_path):
    """The lost daemon's record (its claims locked, its scans' moves planned) was frozen on its way
    to the server and committed as another daemon released it: the release waited for the claims,
    re-read them but not the moves pending, which its statement had read before the commit, and
    dropped the claims, so the files were claimed again as they moved and failed as vanished."""
    frozen = join(sessions, "node-frozen", lease_seconds=1.0)
    sources = [tmp_path / "inbox" / "busi" / f"synthetic_{n}.png" for n in range(3)]
    with transaction(sessions) as session:
        assert claims.claim_inbox_files(session, frozen.daemon_id, [inbox_file(p) for p in sources])
    recording = sessions()
    recording.begin()
    assert claims.held_inbox_files(recording, frozen.daemon_id, sources) == {str(p) for p in sources}
    for n, source in enumerate(sources):
        add_scan(recording, n, pending_move_from=str(source), claimed_by=frozen.daemon_id)
    time.sleep(1.3)
    other = join(sessions, "node-b")
    released: list[claims.Released] = []
    releasing = threading.Thread(target=lambda: released.extend(x.released for x in look_for_lost(sessions, other)))
    releasing.start()
    time.sleep(0.5)  # the release is waiting for the record's locks
    assert releasing.is_alive()
    recording.commit()
    recording.close()
    releasing.join(30)
    assert released == [claims.Released(scans=3, inbox_files=0, kept_for_moves=3)]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(InboxClaim).where(InboxClaim.daemon_id.is_(None))) == 3


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_on_postgresql_a_release_locks_scans_then_claims_as_a_daemon_finishing_its_moves_does(sessions, tmp_path):
    """A lost daemon woken in ``clear_pending`` (its scan updated, its claim next) while another
    released it: the release, locking the claims before the scans, met it in a deadlock."""
    woken = join(sessions, "node-woken", lease_seconds=1.0)
    source = tmp_path / "inbox" / "busi" / "synthetic_1.png"
    with transaction(sessions) as session:
        claims.claim_inbox_files(session, woken.daemon_id, [inbox_file(source)])
        scan = add_scan(session, 1, ScanState.ARCHIVED, pending_move_from=str(source), claimed_by=woken.daemon_id)
    time.sleep(1.3)
    finishing = sessions()
    finishing.begin()
    finishing.execute(update(Scan).where(Scan.id == scan.id).values(pending_move_from=None))
    other = join(sessions, "node-b")
    errors: list[Exception] = []

    def release() -> None:
        try:
            look_for_lost(sessions, other)
        except Exception as exc:
            errors.append(exc)

    releasing = threading.Thread(target=release)
    releasing.start()
    time.sleep(0.5)  # the release is waiting for the scan's lock
    claims.finish_inbox_files(finishing, [source])
    finishing.commit()
    finishing.close()
    releasing.join(30)
    assert errors == []


def test_two_scans_of_one_name_are_archived_under_two_names_before_either_file_moved(sessions, tmp_path, monkeypatch):
    """The archive's day is fixed: on the real clock, midnight between the two claims would file the
    second scan under the next day's folder, by its own name."""
    monkeypatch.setattr(bookkeeper, "utcnow", lambda: datetime(2026, 1, 2, 23, 59, 59, tzinfo=UTC))
    with transaction(sessions) as session:
        for n in (1, 2):
            add_scan(session, n, state=ScanState.REPORTED, source_name="busi/synthetic_same.png")
    targets = []
    for _ in range(2):  # one scan per transaction, as two daemons would; no file is moved in between
        with transaction(sessions) as session:
            [move] = bookkeeper.claim_for_archive(session, destinations(tmp_path), limit=1)
            targets.append(move.target)
    assert targets[0] == tmp_path / "archive" / "2026-01-02" / "busi" / "synthetic_same.png"
    assert targets[1].name == f"synthetic_same__{2:064x}"[:28] + ".png"


def test_a_batch_of_reported_scans_is_archived_with_one_read_one_check_of_the_names_and_one_update(
    sessions, migrated_engine, tmp_path, monkeypatch
):
    """Issue 16: the archive claim reads and locks its batch, checks every target name and changes
    the rows in one statement each; a name another row already holds makes only its scan offer
    another (its hash-suffixed name), and two scans of one name in the batch are kept apart."""
    monkeypatch.setattr(bookkeeper, "utcnow", lambda: datetime(2026, 1, 2, 12, tzinfo=UTC))
    with transaction(sessions) as session:
        for n in range(1, 6):
            add_scan(session, n, state=ScanState.REPORTED, source_name=f"busi/synthetic_{n}.png")
        add_scan(session, 6, state=ScanState.REPORTED, source_name="busi/synthetic_1.png")
        held = destinations(tmp_path).stored(tmp_path / "archive" / "2026-01-02" / "busi" / "synthetic_2.png")
        add_scan(session, 7, state=ScanState.ARCHIVED, source_name="busi/synthetic_2.png", stored_path=held)

    with recorded_statements(migrated_engine) as statements, transaction(sessions) as session:
        moves = bookkeeper.claim_for_archive(session, destinations(tmp_path), limit=16)

    day = tmp_path / "archive" / "2026-01-02" / "busi"
    names = {move.row_id: move.target.relative_to(day).as_posix() for move in moves}
    assert (
        names
        == {
            1: "synthetic_1.png",
            2: f"synthetic_2__{2:064x}"[:25] + ".png",  # its own name is held by scan 7
            3: "synthetic_3.png",
            4: "synthetic_4.png",
            5: "synthetic_5.png",
            6: f"synthetic_1__{6:064x}"[:25] + ".png",  # the batch's scan 1 took the name first
        }
    )
    name_checks = [s for s in statements if s.startswith("SELECT") and "WHERE scans.stored_path IN" in s]
    updates = [s for s in statements if s.startswith("UPDATE scans")]
    assert len(name_checks) == 2 and len(updates) == 1  # the batch's names, then scan 2's second offer
    with sessions() as session:
        rows = {scan.id: scan for scan in session.scalars(select(Scan).where(Scan.id <= 6))}
        assert {scan.state for scan in rows.values()} == {"archived"}
        assert all(destinations(tmp_path).file(rows[i].stored_path) == day / names[i] for i in names)


def test_the_database_refuses_two_scans_filed_under_one_path(sessions):
    with pytest.raises(IntegrityError), transaction(sessions) as session:
        add_scan(session, 1, stored_path="/synthetic/archive/one.png")
        add_scan(session, 2, stored_path="/synthetic/archive/one.png")


def test_a_daemon_drops_only_its_own_claims_on_files_that_changed_while_it_read_them(make_settings):
    """A file that changed while it was read stays in the inbox and its claim ends: held past
    ``claim_unread_seconds``, that claim may be another daemon's by then, and recording the batch
    deleted it, leaving the file to a third reader while the second still read it."""
    from meddaemon.daemon.service import Daemon

    daemon = Daemon(make_settings())
    daemon.prepare()
    a, b = join(daemon.sessions, "node-a"), join(daemon.sessions, "node-b")
    daemon.intake.daemon_id = a.daemon_id
    changed = inbox_file(daemon.settings.watch / "busi" / "synthetic_changed.png")
    with transaction(daemon.sessions) as session:
        claims.claim_inbox_files(session, b.daemon_id, [changed])  # taken over from a, which was slow

    daemon.intake._record([], changed=[changed.path])

    with daemon.sessions() as session:
        assert session.execute(select(InboxClaim.path, InboxClaim.daemon_id)).all() == [
            (str(changed.path), b.daemon_id)
        ]
