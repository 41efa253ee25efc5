"""The outbox as health and metrics report it: items per status, and how long the oldest pending one
has waited (a destination down shows as a growing age, then a degraded health check)."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from daemon_rows import add_scan
from meddaemon.daemon.health import HealthLimits, check_health
from meddaemon.daemon.metrics import DatabaseCollector, read_snapshot
from meddaemon.db.clock import read_db_clock
from meddaemon.db.engine import transaction
from meddaemon.db.models import OutboxItem
from meddaemon.db.readonly import read_only_engine
from meddaemon.dicom import outbox
from meddaemon.dicom.outbox import NewItem
from meddaemon.states import ScanState


def queue_one_waiting_for(sessions, seconds: float) -> None:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        scan = add_scan(session, 1, ScanState.REPORTED, format="dicom")
        outbox.enqueue(
            session,
            scan.id,
            [
                NewItem("sr", "pacs", path="dicom/sr.dcm"),
                NewItem("pdf", "pacs", error="source_without_study: SYNTHETIC"),
            ],
        )
        then = read_db_clock(session) - seconds
        session.execute(update(OutboxItem).values(created_at=then, pending_since=then))


def test_health_degrades_when_the_oldest_pending_object_waits_past_the_limit(sessions, db_url, make_settings):
    queue_one_waiting_for(sessions, 1200)
    reader = read_only_engine(db_url)
    try:
        settings = make_settings(db=db_url)
        ok = check_health(reader, settings, HealthLimits(min_free_bytes=0, stuck_seconds=3600)).check("outbox")
        stuck = check_health(reader, settings, HealthLimits(min_free_bytes=0, stuck_seconds=600)).check("outbox")
    finally:
        reader.dispose()
    assert ok.status == "ok" and ok.message.startswith("1 DICOM output waiting, the oldest for 20 min; 1 object dead")
    assert stuck.status == "degraded" and "is a destination down?" in stuck.message
    assert stuck.details["counts"] == {"pending": 1, "delivered": 0, "dead": 1}


def test_objects_refused_for_good_lately_degrade_health_though_nothing_is_pending(sessions, db_url, make_settings):
    """A password changed at the PACS: every object dead at its first attempt (HTTP 401), nothing
    ever pending, and health stayed ok while every result went nowhere."""
    from meddaemon.dicom.outbox import Backoff, claim_due, record_failure

    queue_one_waiting_for(sessions, 60)
    with transaction(sessions) as session:
        [item] = claim_due(session, None, 10)
        assert record_failure(session, item.id, "STOW-RS HTTP 401", True, Backoff(1, 2, 3), None) == outbox.DEAD
    reader = read_only_engine(db_url)
    try:
        settings = make_settings(db=db_url)
        lately = check_health(reader, settings, HealthLimits(min_free_bytes=0)).check("outbox")
        with transaction(sessions) as session:  # the same, two hours on
            session.execute(update(OutboxItem).values(next_attempt_at=read_db_clock(session) - 7200))
        later = check_health(reader, settings, HealthLimits(min_free_bytes=0)).check("outbox")
    finally:
        reader.dispose()
    assert lately.status == "degraded"
    assert lately.message.startswith("1 DICOM output went dead in the last 15 min: pacs: 1 (STOW-RS HTTP 401)")
    assert later.status == "ok"  # the born-dead PDF (no study) never counts: it was never sent


def test_objects_settled_dead_for_a_destination_taken_out_of_the_configuration_do_not_degrade_health(
    sessions, db_url, make_settings
):
    """Nothing was refused: the destination was removed on purpose, and `retry --all-dead`, the
    advice given, could not end the alarm."""
    from meddaemon.dicom.outbox import settle_unconfigured

    queue_one_waiting_for(sessions, 60)
    with transaction(sessions) as session:  # backing off after an outage when the destination was removed
        session.execute(update(OutboxItem).values(attempts=2, next_attempt_at=read_db_clock(session) + 3600))
        assert settle_unconfigured(session, ["new"], 999) == {"pacs": 1}
    reader = read_only_engine(db_url)
    try:
        health = check_health(reader, make_settings(db=db_url), HealthLimits(min_free_bytes=0)).check("outbox")
    finally:
        reader.dispose()
    assert health.status == "ok", health.message


def test_an_item_dead_for_days_and_retried_waits_from_its_retry_not_from_its_creation(sessions, db_url, make_settings):
    """``medcli outbox retry`` of an output dead for two days made health ``degraded`` at once, the
    queue's oldest pending age taken from the row's creation."""
    queue_one_waiting_for(sessions, 2 * 86400)
    with transaction(sessions) as session:
        session.execute(update(OutboxItem).where(OutboxItem.object_key == "sr").values(status=outbox.DEAD))
        assert outbox.retry(session, all_dead=True) == 1
    with sessions() as session:
        oldest = outbox.summary(session).oldest_pending_seconds
    assert oldest is not None and oldest < 60
    reader = read_only_engine(db_url)
    try:
        settings = make_settings(db=db_url)
        health = check_health(reader, settings, HealthLimits(min_free_bytes=0, stuck_seconds=600)).check("outbox")
    finally:
        reader.dispose()
    assert health.status == "ok", health.message


def test_an_item_queued_by_a_daemon_from_before_pending_since_waits_from_its_creation(sessions):
    queue_one_waiting_for(sessions, 1200)
    with transaction(sessions) as session:
        session.execute(update(OutboxItem).values(pending_since=None))
    with sessions() as session:
        oldest = outbox.summary(session).oldest_pending_seconds
    assert oldest is not None and 1200 <= oldest < 1260


def test_metrics_expose_the_queue_per_status_and_the_oldest_pending_age(sessions, migrated_engine):
    queue_one_waiting_for(sessions, 90)
    with Session(migrated_engine) as session:
        snapshot = read_snapshot(session)
    assert snapshot.outbox is not None and snapshot.outbox.counts["pending"] == 1
    families = {m.name: m for m in DatabaseCollector(migrated_engine).collect()}
    items = {s.labels["status"]: s.value for s in families["meddaemon_outbox_items"].samples}
    assert items == {"pending": 1, "delivered": 0, "dead": 1}
    (oldest,) = families["meddaemon_outbox_oldest_pending_seconds"].samples
    assert 89 <= oldest.value < 150
