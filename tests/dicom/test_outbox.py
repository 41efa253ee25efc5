"""The outbox in the database: rows added once per object and destination, claimed by one sender at a
time, delivered once, retried with exponential backoff and jitter, dead after N failures or a
permanent refusal; a scan is archived only when none of its objects is pending."""

from __future__ import annotations

import random
from pathlib import Path

from sqlalchemy import select, update

from daemon_rows import add_scan, join
from meddaemon.daemon import bookkeeper
from meddaemon.db.engine import transaction
from meddaemon.db.models import DaemonInstance, OutboxItem, Scan
from meddaemon.dicom import outbox
from meddaemon.dicom.outbox import DEAD, DELIVERED, PENDING, Backoff, NewItem
from meddaemon.states import ScanState

BACKOFF = Backoff(base_seconds=10.0, max_seconds=100.0, max_attempts=3)


def queue(sessions, state: ScanState = ScanState.REPORTED, n: int = 1, keys=("sr", "pdf")) -> int:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        scan = add_scan(session, n, state, format="dicom")
        items = [NewItem(k, "pacs", "1.2", f"1.2.{n}.{i}", f"dicom/{n}/{k}.dcm") for i, k in enumerate(keys)]
        outbox.enqueue(session, scan.id, items)
        return scan.id


def rows(sessions) -> list[OutboxItem]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def claim(sessions, daemon_id: int | None, limit: int = 10) -> list[outbox.Claimed]:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        return outbox.claim_due(session, daemon_id, limit)


def test_a_replayed_step_adds_no_second_row(sessions):
    scan_id = queue(sessions)
    with transaction(sessions) as session:
        again = outbox.enqueue(session, scan_id, [NewItem("sr", "pacs"), NewItem("sr", "web")])
    assert again == 1  # only the new destination
    assert sorted((r.object_key, r.destination) for r in rows(sessions)) == [
        ("pdf", "pacs"),
        ("sr", "pacs"),
        ("sr", "web"),
    ]


def test_an_acknowledged_object_is_delivered_once_and_never_claimed_again(sessions):
    queue(sessions)
    me = join(sessions).daemon_id
    first = claim(sessions, me)
    assert [c.object_key for c in first] == ["sr", "pdf"]
    with transaction(sessions) as session:
        assert outbox.record_delivered(session, [c.id for c in first]) == len(first)
        assert outbox.record_delivered(session, [first[0].id]) == 0  # a second acknowledgement changes nothing
    assert {r.status for r in rows(sessions)} == {DELIVERED}
    assert claim(sessions, me) == []


def test_a_claimed_row_is_not_claimed_by_another_running_daemon_but_is_after_its_holder_is_gone(sessions):
    queue(sessions)
    a, b = join(sessions, "node-a").daemon_id, join(sessions, "node-b").daemon_id
    assert len(claim(sessions, a)) == 2
    assert claim(sessions, b) == []
    with transaction(sessions) as session:
        session.execute(update(DaemonInstance).where(DaemonInstance.id == a).values(state="lost"))
    assert len(claim(sessions, b)) == 2


def test_a_daemon_declared_lost_claims_nothing_not_even_its_own_rows(sessions):
    """Its sender may live on (a main loop stalled past the lease stops the heartbeats, not the
    sender process): it claimed rows under its lost id, which every other daemon could also take,
    and both sent every object."""
    queue(sessions)
    a, b = join(sessions, "node-a").daemon_id, join(sessions, "node-b").daemon_id
    assert len(claim(sessions, a)) == 2
    with transaction(sessions) as session:
        session.execute(update(DaemonInstance).where(DaemonInstance.id == a).values(state="lost"))
    assert claim(sessions, a) == []
    with transaction(sessions) as session:
        outbox.enqueue(session, rows(sessions)[0].scan_id, [NewItem("pmap", "pacs")])  # queued after it was lost
    assert claim(sessions, a) == []
    assert len(claim(sessions, b)) == 3


def test_a_late_release_or_failure_of_a_lost_daemon_leaves_the_new_holder_s_claim(sessions):
    """A lost daemon that wakes up gave back, or failed, rows another daemon had taken over and was
    sending: a third then sent them beside it, or an object it delivered stayed dead."""
    queue(sessions)
    a, b, c = (join(sessions, f"node-{n}").daemon_id for n in "abc")
    taken = claim(sessions, a)
    with transaction(sessions) as session:
        session.execute(update(DaemonInstance).where(DaemonInstance.id == a).values(state="lost"))
    assert len(claim(sessions, b)) == 2
    with transaction(sessions) as session:
        outbox.release(session, [t.id for t in taken], a)
        assert outbox.record_failure(session, taken[0].id, "C-STORE status 0xC000", True, BACKOFF, a) is None
    assert [(r.claimed_by, r.status, r.attempts) for r in rows(sessions)] == [(b, PENDING, 0)] * 2
    assert claim(sessions, c) == []


def test_a_failure_backs_off_exponentially_with_jitter_then_the_row_is_dead_with_the_peers_answer(sessions):
    queue(sessions, keys=("sr",))
    me = join(sessions).daemon_id
    rng = random.Random(1)
    for attempt in (1, 2):
        (item,) = claim(sessions, me)
        with transaction(sessions) as session:
            before = outbox.read_db_clock(session)
            status = outbox.record_failure(session, item.id, "C-STORE status 0xA700", False, BACKOFF, me, rng)
        assert status == PENDING
        (row,) = rows(sessions)
        delay = row.next_attempt_at - before
        nominal = BACKOFF.base_seconds * 2 ** (attempt - 1)
        assert 0.5 * nominal - 1 <= delay <= 1.5 * nominal + 1
        assert claim(sessions, me) == []  # not due yet
        with transaction(sessions) as session:
            session.execute(update(OutboxItem).values(next_attempt_at=0.0))
    (item,) = claim(sessions, me)
    with transaction(sessions) as session:
        assert outbox.record_failure(session, item.id, "C-STORE status 0xC000", False, BACKOFF, me) == DEAD
    (row,) = rows(sessions)
    assert (row.status, row.attempts, row.last_error) == (DEAD, 3, "C-STORE status 0xC000")


def test_a_permanent_refusal_is_dead_at_once(sessions):
    queue(sessions, keys=("sr",))
    (item,) = claim(sessions, None)
    with transaction(sessions) as session:
        assert outbox.record_failure(session, item.id, "C-STORE status 0xA900", True, BACKOFF, None) == DEAD
    assert rows(sessions)[0].attempts == 1


def test_the_backoff_doubles_up_to_its_cap():
    fixed = Backoff(1.0, 8.0, 10)

    class Middle(random.Random):
        def random(self) -> float:
            return 0.5

    assert [fixed.delay(n, Middle()) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    spread = {round(fixed.delay(3), 6) for _ in range(50)}
    assert len(spread) > 40 and min(spread) >= 2.0 and max(spread) <= 6.0
    capped = [fixed.delay(9) for _ in range(200)]  # the jitter never takes a wait past the cap
    assert max(capped) == 8.0 and min(capped) >= 4.0


def test_retry_makes_dead_rows_pending_but_not_those_whose_object_was_never_made(sessions):
    scan_id = queue(sessions, keys=("sr",))
    with transaction(sessions) as session:
        outbox.enqueue(session, scan_id, [NewItem("pmap", "pacs", error="source_without_study: no study")])
        (item,) = outbox.claim_due(session, None, 10)
        outbox.record_failure(session, item.id, "refused", True, BACKOFF, None)
    assert [r.status for r in rows(sessions)] == [DEAD, DEAD]
    with transaction(sessions) as session:
        assert outbox.retry(session, all_dead=True) == 1
    assert [(r.status, r.attempts) for r in rows(sessions)] == [(PENDING, 0), (DEAD, 0)]


def test_purge_forgets_delivered_rows_never_pending_ones_and_names_the_files_left_unreferenced(sessions):
    queue(sessions, keys=("sr", "pdf"))
    with transaction(sessions) as session:
        first = outbox.claim_due(session, None, 1)[0]
        outbox.record_delivered(session, [first.id])
    with transaction(sessions) as session:
        assert outbox.purge(session, (DELIVERED, PENDING)) == outbox.Purged(1, [first.path])
    assert [r.status for r in rows(sessions)] == [PENDING]


def test_the_summary_counts_each_status_and_ages_the_oldest_pending(sessions):
    queue(sessions)
    with sessions() as session:
        summary = outbox.summary(session)
    assert summary.counts == {PENDING: 2, DELIVERED: 0, DEAD: 0}
    assert summary.oldest_pending_seconds is not None and 0 <= summary.oldest_pending_seconds < 60


def test_a_reported_scan_is_archived_only_once_none_of_its_objects_is_pending(sessions, tmp_path: Path):
    scan_id = queue(sessions)
    destinations = bookkeeper.Destinations(tmp_path / "work", tmp_path / "archive", tmp_path / "failed")
    with transaction(sessions) as session:
        assert bookkeeper.claim_for_archive(session, destinations, 10) == []
        items = outbox.claim_due(session, None, 10)
        outbox.record_delivered(session, [items[0].id])
        outbox.record_failure(session, items[1].id, "refused", True, BACKOFF, None)  # dead counts as done
    with transaction(sessions) as session:
        moves = bookkeeper.claim_for_archive(session, destinations, 10)
    assert [m.row_id for m in moves] == [scan_id]
    with sessions() as session:
        assert session.get(Scan, scan_id).state == ScanState.ARCHIVED  # type: ignore[union-attr]


def test_rows_go_with_their_scan(sessions):
    scan_id = queue(sessions)
    with transaction(sessions) as session:
        session.delete(session.get(Scan, scan_id))
    assert rows(sessions) == []
