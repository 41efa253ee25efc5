"""A batch's rows go in as one multi-row INSERT, and each row gets its own new id back, on both databases."""

import pytest
from sqlalchemy import func, select

from meddaemon.db.bulk import insert_returning_ids, insert_rows
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import Scan, ScanEvent, Task, utcnow
from sql_statements import recorded_statements


def scan_rows(names: list[str], sha: str | None = None) -> list[dict[str, object]]:
    """SYNTHETIC scans, one per name (all of the same bytes when ``sha`` is given)."""
    now = utcnow()
    return [
        {"sha256": sha or f"{i:064x}", "state": "failed", "source_name": name, "updated_at": now, "task_name": "busi"}
        for i, name in enumerate(names)
    ]


@pytest.fixture
def sessions(migrated_engine):
    factory = session_factory(migrated_engine)
    with transaction(factory) as session:
        session.add(Task(name="busi", description="breast ultrasound"))
    return factory


def test_ids_come_back_in_the_rows_order_from_one_statement(migrated_engine, sessions):
    with transaction(sessions) as session:  # ids already taken, so the new ones do not start at 1
        insert_returning_ids(session, Scan, scan_rows(["earlier_a.png", "earlier_b.png"]), key=("source_name",))
    names = [f"synthetic_{n:02d}.png" for n in (7, 3, 11, 0, 5, 9, 1, 14, 2, 8, 13, 4, 6, 12, 10, 15)]

    with recorded_statements(migrated_engine, "INSERT") as statements, transaction(sessions) as session:
        ids = insert_returning_ids(session, Scan, scan_rows(names), key=("source_name",))

    assert len(statements) == 1
    assert len(set(ids)) == len(names)
    with sessions() as session:
        stored = dict(session.execute(select(Scan.id, Scan.source_name).where(Scan.id.in_(ids))).all())
    assert [stored[i] for i in ids] == names


def test_rows_the_key_cannot_tell_apart_still_get_their_own_ids(sessions):
    rows = scan_rows(["same.png", "same.png", "other.png"])
    rows[0]["failure_message"], rows[1]["failure_message"] = "first", "second"

    with transaction(sessions) as session:
        ids = insert_returning_ids(session, Scan, rows, key=("source_name",))

    with sessions() as session:
        stored = dict(session.execute(select(Scan.id, Scan.failure_message).where(Scan.id.in_(ids))).all())
    assert [stored[i] for i in ids] == ["first", "second", None]


def test_rows_without_ids_wanted_go_in_as_one_statement(migrated_engine, sessions):
    with transaction(sessions) as session:
        (scan_id,) = insert_returning_ids(session, Scan, scan_rows(["synthetic.png"]), key=("source_name",))
    events = [{"scan_id": scan_id, "state": state, "detail": None, "at": utcnow()} for state in ("stable", "failed")]

    with recorded_statements(migrated_engine, "INSERT") as statements, transaction(sessions) as session:
        insert_rows(session, ScanEvent, events)
        insert_rows(session, ScanEvent, [])

    assert len(statements) == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ScanEvent)) == 2
