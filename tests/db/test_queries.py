"""`meddaemon status` numbers, from rows written through the real schema on both databases."""

from datetime import timedelta

from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import DuplicateArrival, ModelVersion, Scan, Task, utcnow
from meddaemon.db.queries import status_summary


def _scan(n: int, state: str, **kw) -> Scan:
    return Scan(sha256=f"{n:064x}", state=state, source_name=f"synthetic_{n}.png", **kw)


def test_status_counts_states_reasons_duplicates_and_recent_throughput(migrated_engine):
    factory = session_factory(migrated_engine)
    now = utcnow()
    with transaction(factory) as s:
        s.add(Task(name="busi", description="breast ultrasound"))
        s.flush()
        s.add_all([_scan(i, "waiting_model", task_name="busi", registered_at=now) for i in range(3)])
        s.add(_scan(10, "failed", failure_reason="truncated_image", failure_message="cut short", registered_at=now))
        s.add(
            _scan(
                11,
                "failed",
                failure_reason="truncated_image",
                failure_message="cut short",
                registered_at=now - timedelta(hours=2),
            )
        )
        old = _scan(
            12,
            "failed",
            failure_reason="empty_file",
            failure_message="0 bytes",
            registered_at=now - timedelta(minutes=30),
            pending_move_from="/inbox/x",
        )
        s.add(old)
        s.flush()
        s.add(DuplicateArrival(scan_id=old.id, source_name="copy.png", stored_path="/a/copy.png", size_bytes=1))

    with factory() as s:
        summary = status_summary(s, recent=2, now=now + timedelta(seconds=1))

    assert summary.states == {"waiting_model": 3, "failed": 3}
    assert summary.total == 6
    assert summary.failures_by_reason == {"truncated_image": 2, "empty_file": 1}
    assert summary.duplicates == 1
    assert len(summary.last_failures) == 2
    assert summary.registered_last_minute == 4
    assert summary.registered_last_hour == 5
    assert summary.pending_moves == 1
    assert summary.as_dict()["total"] == 6


def test_the_latest_failures_leave_out_the_ones_retried_whose_retry_rewrote_their_time(migrated_engine):
    """A retry stamps the failed row (``retried_at``, a ``failed`` step "sent for retry"): it was
    listed first, at the retry's time, though its new attempt had been scored."""
    factory = session_factory(migrated_engine)
    now = utcnow()
    with transaction(factory) as s:
        s.add(_scan(1, "failed", failure_reason="contract_mismatch", failure_message="colour", updated_at=now))
        s.add(
            _scan(
                2,
                "failed",
                failure_reason="contract_mismatch",
                failure_message="colour",
                retried_at=now + timedelta(minutes=1),
                updated_at=now + timedelta(minutes=1),
            )
        )
    with factory() as s:
        summary = status_summary(s)
    assert [f.source_name for f in summary.last_failures] == ["synthetic_1.png"]
    assert summary.failures_by_reason == {"contract_mismatch": 2}


def test_status_of_an_empty_database_is_all_zero(migrated_engine):
    with session_factory(migrated_engine)() as s:
        summary = status_summary(s)
    assert (summary.total, summary.duplicates, summary.last_failures) == (0, 0, [])


def test_status_names_the_tasks_without_an_active_model_and_the_scans_waiting_for_each(migrated_engine):
    factory = session_factory(migrated_engine)
    with transaction(factory) as s:
        s.add_all([Task(name=name, description=name) for name in ("busi", "chestxray14", "covid")])
        s.flush()
        s.add(ModelVersion(task_name="covid", version="v1", architecture="small_cnn", sha256="0" * 64, path="/m"))
        s.add(
            ModelVersion(
                task_name="chestxray14",
                version="v2",
                architecture="small_cnn",
                sha256="1" * 64,
                path="/m2",
                status="active",
            )
        )
        s.add_all([_scan(i, "waiting_model", task_name="busi") for i in range(3)])
        s.add(_scan(3, "waiting_model", task_name="covid"))
        s.add(_scan(4, "routed", task_name="busi"))

    with factory() as s:
        summary = status_summary(s)
    assert summary.waiting_model == {"busi": 3, "covid": 1}
    assert summary.as_dict()["waiting_model"] == {"busi": 3, "covid": 1}
