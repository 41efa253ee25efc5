"""The actions do what ``medcli retry`` and ``medcli models promote/retire`` do, through the same
library functions, and each is recorded (who, in which role, what, when, how it went)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.models import ModelVersion, Scan, WebAction
from meddaemon.engine import registry
from meddaemon.web.app import create_app
from model_factory import write_model
from web_factory import UNROUTABLE, csrf_of, rerun, signed_in, web_settings


def rows(root: Path, query):  # type: ignore[no-untyped-def]
    engine = create_db_engine(web_settings(root).db_url)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(query))
    finally:
        engine.dispose()


def register(root: Path, version: str) -> Path:
    """A second busi version imported (registered, not active); returns its folder in the registry."""
    settings = web_settings(root)
    engine = create_db_engine(settings.db_url)
    try:
        with transaction(session_factory(engine)) as session:
            row = registry.import_version(
                session, write_model(root / f"model_{version}", version=version), settings.models_dir
            )
            return Path(row.path)
    finally:
        engine.dispose()


def admin(root: Path, **flags):  # type: ignore[no-untyped-def]
    client = signed_in(create_app(web_settings(root, **flags)), "admin")
    return client, csrf_of(client.get("/failures").text)


def test_retry_of_one_scan_sends_it_back_and_the_next_run_completes_it(fresh_root):
    [failed] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE))
    client, csrf = admin(fresh_root, default_task="busi")
    page = client.get("/failures").text
    assert f'id="retry-{failed.id}"' in page

    response = client.post("/failures/retry", data={"scan": str(failed.id), "csrf": csrf})

    assert response.status_code == 200 and 'id="action-result"' in response.text
    assert "done" in response.text and f"sent back 1 scan(s): {failed.id}" in response.text
    assert (fresh_root / "inbox" / UNROUTABLE).is_file()
    rerun(fresh_root, default_task="busi", reports=False)
    attempts = rows(fresh_root, select(Scan).where(Scan.sha256 == failed.sha256).order_by(Scan.id))
    assert [(s.state, s.retried_at is not None) for s in attempts] == [("failed", True), ("inferred", False)]
    [action] = rows(fresh_root, select(WebAction))
    assert (action.user, action.role, action.action, action.target, action.outcome) == (
        "admin", "admin", "retry", f"scan {failed.id}", "done",
    )  # fmt: skip
    assert action.at is not None


def test_a_retry_whose_original_the_console_may_not_remove_says_so_in_its_record(fresh_root, monkeypatch):
    """The console often runs as a user who may read failed/ but not remove from it: its record said
    only "sent back", the file left in failed/ named in the server's log alone. (EPERM injected.)"""
    import errno
    import os

    [failed] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE))
    client, csrf = admin(fresh_root, default_task="busi")
    failed_dir = web_settings(fresh_root).failed_dir
    real_unlink = os.unlink

    def not_permitted(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).is_relative_to(failed_dir):
            raise PermissionError(errno.EPERM, "Operation not permitted (injected)", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", not_permitted)
    client.post("/failures/retry", data={"scan": str(failed.id), "csrf": csrf})
    [action] = rows(fresh_root, select(WebAction))
    assert action.outcome == "done" and "cannot be removed: Operation not permitted (injected)" in action.detail


def test_retry_of_a_reason_sends_back_every_kept_scan_of_it_and_refusals_are_shown(fresh_root):
    client, csrf = admin(fresh_root)
    client.post("/failures/retry", data={"reason": "unroutable", "csrf": csrf})
    assert (fresh_root / "inbox" / UNROUTABLE).is_file()
    [failed] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE))
    again = client.post("/failures/retry", data={"scan": str(failed.id), "csrf": csrf})
    assert "refused (already_retried)" in again.text
    assert [a.outcome for a in rows(fresh_root, select(WebAction).order_by(WebAction.id))] == ["done", "refused"]
    stale = client.post("/failures/retry", data={"reason": "unroutable", "csrf": csrf})  # it said only "sent back 0"
    assert "no failed scan of reason unroutable waits for a retry" in stale.text


def test_retry_all_of_a_reason_sends_back_scans_that_failed_again_after_a_retry(fresh_root):
    """A bulk retry leaves alone the scans whose bytes failed the same way after a retry, so that a
    schedule does not send a corrupt file back at every run: the console's "Retry all" became a click
    that did nothing, its count unchanged, once a cause was fixed only after a second failure. A
    person's click sends them back, as naming each would."""
    client, csrf = admin(fresh_root)
    client.post("/failures/retry", data={"reason": "unroutable", "csrf": csrf})
    rerun(fresh_root, reports=False)  # the cause not fixed yet: unroutable again
    [_, again] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE).order_by(Scan.id))
    assert again.failure_reason == "unroutable" and again.retried_at is None

    response = client.post("/failures/retry", data={"reason": "unroutable", "csrf": csrf})

    assert f"sent back 1 scan(s): {again.id}" in response.text and "failed_again" not in response.text
    assert (fresh_root / "inbox" / UNROUTABLE).is_file()


def test_a_bulk_retry_says_how_many_were_left_alone_and_why_before_naming_a_few(fresh_root):
    """It named the first 20 refusals, cut at 4000 characters mid-sentence, and never said how many
    of the reason stayed failed. Originals changed by hand are left alone by a bulk retry (as by
    ``medcli retry --reason``), and said to be."""
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:
        for i in range(12):
            kept = fresh_root / "state" / "failed" / f"synthetic_changed_{i:03d}_{'x' * 150}.dcm"
            kept.write_bytes(b"SYNTHETIC bytes edited by hand %d" % i)
            session.add(
                Scan(
                    sha256=f"{i + 1:064x}", state="failed", failure_reason="unroutable",
                    source_name=kept.name, stored_path=str(kept.relative_to(fresh_root / "state")),
                )
            )  # fmt: skip
    engine.dispose()
    client, csrf = admin(fresh_root)

    response = client.post("/failures/retry", data={"reason": "unroutable", "csrf": csrf})

    [action] = rows(fresh_root, select(WebAction))
    assert action.detail.startswith("sent back 1 scan(s)") and "; left alone 12: 12 original_changed; " in action.detail
    assert action.detail.count("left alone (original_changed)") == 8 and action.detail.endswith("; and 4 more")
    assert "refused" not in action.detail and action.outcome == "done"
    assert "left alone 12: 12 original_changed" in response.text


def test_promote_after_its_confirmation_switches_the_active_model(fresh_root):
    register(fresh_root, "v2")
    client, csrf = admin(fresh_root)
    assert 'id="promote-busi-v2"' in client.get("/models").text
    confirm = client.get("/models/busi/v2/promote")
    assert confirm.status_code == 200 and "v1 goes back to registered" in confirm.text
    unconfirmed = client.post("/models/busi/v2/promote", data={"csrf": csrf})
    assert unconfirmed.status_code == 400

    done = client.post("/models/busi/v2/promote", data={"csrf": csrf, "confirm": "busi/v2"})

    assert "busi/v2 is the active model of busi" in done.text
    status = {
        m.version: m.status for m in rows(fresh_root, select(ModelVersion).where(ModelVersion.task_name == "busi"))
    }
    assert status == {"v1": "registered", "v2": "active"}
    [action] = rows(fresh_root, select(WebAction))
    assert (action.action, action.target, action.outcome) == ("promote", "busi/v2", "done")


def test_an_active_version_a_daemon_refused_is_shown_so_and_promoted_again_from_the_console(fresh_root):
    """The console showed a refused active version as any active one, offered no promote, and a
    promote posted said "active already: nothing done", its refusal left in place."""
    register(fresh_root, "v2")
    client, csrf = admin(fresh_root)
    assert (
        "busi/v2 is the active model of busi"
        in client.post("/models/busi/v2/promote", data={"csrf": csrf, "confirm": "busi/v2"}).text
    )
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:  # as a daemon records it (SYNTHETIC reason)
        row = registry.get_version(session, "busi", "v2")
        assert registry.record_refusal(session, row.id, row.promoted_at, "hash_mismatch: SYNTHETIC")
    engine.dispose()
    page = client.get("/models").text
    assert 'id="refusal-busi-v2"' in page and "hash_mismatch: SYNTHETIC" in page and 'id="promote-busi-v2"' in page
    confirm = client.get("/models/busi/v2/promote").text
    assert "busi/v2 stays the active model of busi: a daemon refused it (hash_mismatch: SYNTHETIC)" in confirm
    assert "goes back to registered" not in confirm

    again = client.post("/models/busi/v2/promote", data={"csrf": csrf, "confirm": "busi/v2"})

    assert "refusal of it is cleared: the daemons try it again" in again.text
    [v2] = rows(fresh_root, select(ModelVersion).where(ModelVersion.version == "v2"))
    assert v2.status == "active" and v2.refusal is None
    assert 'id="refusal-busi-v2"' not in client.get("/models").text


def test_a_promote_from_the_console_waits_for_a_writer_holding_sqlite_and_is_done(fresh_root):
    """The copy's check before the promotion read through a writing session, whose BEGIN IMMEDIATE
    asked for the write lock: a daemon holding it past the busy timeout made the promotion fail
    ("database is locked"), where the promotion itself waits and is done."""
    import sqlite3
    import threading

    register(fresh_root, "v2")
    client, csrf = admin(fresh_root, busy_timeout=0.3)
    holder = sqlite3.connect(web_settings(fresh_root).db_url.removeprefix("sqlite:///"), check_same_thread=False)
    holder.isolation_level = None
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.5, holder.commit)
    release.start()
    try:
        done = client.post("/models/busi/v2/promote", data={"csrf": csrf, "confirm": "busi/v2"})
    finally:
        release.join()
        holder.close()
    [action] = rows(fresh_root, select(WebAction))
    assert (action.action, action.outcome) == ("promote", "done"), action.detail
    assert "busi/v2 is the active model of busi" in done.text


def test_promote_of_a_version_that_fails_verification_is_refused_with_the_reason(fresh_root):
    folder = register(fresh_root, "v2")
    weights = folder / registry.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # damaged after the import
    weights.write_bytes(bytes(data))
    client, csrf = admin(fresh_root)

    response = client.post("/models/busi/v2/promote", data={"csrf": csrf, "confirm": "busi/v2"})

    assert response.status_code == 200 and "refused (hash_mismatch)" in response.text
    status = {
        m.version: m.status for m in rows(fresh_root, select(ModelVersion).where(ModelVersion.task_name == "busi"))
    }
    assert status == {"v1": "active", "v2": "registered"}
    [action] = rows(fresh_root, select(WebAction))
    assert action.outcome == "refused" and "hash_mismatch" in action.detail


def test_a_promote_that_fails_outside_the_database_is_recorded_with_its_message(fresh_root, monkeypatch):
    """Out of file descriptors while verifying: recorded as 'OSError: OSError', its message lost."""
    import errno

    register(fresh_root, "v2")
    client, csrf = admin(fresh_root)

    def out_of_descriptors(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.EMFILE, "Too many open files", "model.safetensors")

    monkeypatch.setattr(registry, "load_version", out_of_descriptors)
    client.post("/models/busi/v2/promote", data={"csrf": csrf, "confirm": "busi/v2"})
    [action] = rows(fresh_root, select(WebAction))
    assert action.outcome == "failed" and "Too many open files" in action.detail, action.detail


def test_retire_takes_a_version_out_of_service(fresh_root):
    client, csrf = admin(fresh_root)
    confirm = client.get("/models/chestxray14/v1/retire").text
    assert "it is the active model" in confirm
    done = client.post("/models/chestxray14/v1/retire", data={"csrf": csrf, "confirm": "chestxray14/v1"})
    assert "chestxray14/v1 is retired" in done.text
    [row] = rows(fresh_root, select(ModelVersion).where(ModelVersion.task_name == "chestxray14"))
    assert row.status == "retired"
    assert client.get("/models/nope/v9/retire").status_code == 404
    # a stale page or a second tab: "done" again, recorded as a second retirement that did nothing
    again = client.post("/models/chestxray14/v1/retire", data={"csrf": csrf, "confirm": "chestxray14/v1"})
    assert "chestxray14/v1 is retired already: nothing done" in again.text
    busi = client.post("/models/busi/v1/promote", data={"csrf": csrf, "confirm": "busi/v1"})
    assert "busi/v1 is active already: nothing done" in busi.text
    assert [a.outcome for a in rows(fresh_root, select(WebAction).order_by(WebAction.id))] == [
        "done",
        "refused",
        "refused",
    ]


@pytest.mark.postgres
def test_a_promote_from_the_console_waits_for_a_cli_holding_the_task_and_is_done_not_deadlocked(
    postgres_url, postgres_admin, tmp_path: Path
):
    """The console locked the version's row, then the task's; the CLI and the registry lock the task's
    first: a CLI retire or promote of the same version at that moment deadlocked with it, and
    PostgreSQL killed one (the console's recorded as failed, with the SQL of the statement)."""
    import threading
    import time

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from meddaemon.db.migrate import upgrade

    settings = web_settings(tmp_path, db=postgres_url)
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    with transaction(session_factory(engine)) as session:
        for version in ("v1", "v2"):
            registry.import_version(session, write_model(tmp_path / version, version=version), settings.models_dir)
        registry.promote(session, "busi", "v1")
    engine.dispose()
    client = signed_in(create_app(settings), "admin")
    csrf = csrf_of(client.get("/models").text)

    cli = create_engine(postgres_url)  # a second session, where medcli would hold its locks
    with cli.connect() as conn:
        transaction_ = conn.begin()
        conn.execute(text("SELECT name FROM tasks WHERE name = 'busi' FOR UPDATE"))
        posted = threading.Thread(
            target=lambda: client.post("/models/busi/v2/promote", data={"confirm": "busi/v2", "csrf": csrf}),
            daemon=True,
        )
        posted.start()
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with cli.connect() as probe:  # pg_stat_activity is a snapshot per transaction: not conn's
                if probe.execute(text(waiting)).scalar():
                    break
            time.sleep(0.05)
        assert posted.is_alive(), "the console's promote ended while the CLI held the task"
        try:
            conn.execute(text("SELECT id FROM model_versions WHERE version = 'v2' FOR UPDATE"))  # as a retire would
            transaction_.commit()
            deadlocked = False
        except OperationalError:  # PostgreSQL killed this side of the deadlock
            transaction_.rollback()
            deadlocked = True
    cli.dispose()
    posted.join(60)
    assert not deadlocked

    engine = create_db_engine(postgres_url)
    with session_factory(engine)() as session:
        [action] = session.scalars(select(WebAction)).all()
        active = session.scalars(select(ModelVersion.version).where(ModelVersion.status == "active")).all()
    engine.dispose()
    assert (action.action, action.outcome) == ("promote", "done"), action.detail
    assert active == ["v2"]


def hold_sqlite_write_lock(root: Path, seconds: float):  # type: ignore[no-untyped-def]
    """Another writer (a daemon, a medcli) holding SQLite's write lock for ``seconds``: a thread that
    releases it, to be joined."""
    import sqlite3
    import threading

    holder = sqlite3.connect(web_settings(root).db_url.removeprefix("sqlite:///"), check_same_thread=False)
    holder.isolation_level = None
    holder.execute("BEGIN IMMEDIATE")

    def release() -> None:
        holder.commit()
        holder.close()

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


def test_a_retry_waits_for_a_writer_holding_sqlite_past_the_busy_timeout_and_is_done(fresh_root):
    """The retry read the failed scans through a writing session, tried once: a writer holding the
    lock for 1.5 s failed it after one busy timeout (0.3 s here, 5 s by default), though an action
    waits 10 s."""
    [failed] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE))
    client, csrf = admin(fresh_root, busy_timeout=0.3)
    holder = hold_sqlite_write_lock(fresh_root, 1.5)
    try:
        response = client.post("/failures/retry", data={"scan": str(failed.id), "csrf": csrf})
    finally:
        holder.join()
    assert response.status_code == 200
    [action] = rows(fresh_root, select(WebAction))
    assert (action.outcome, action.detail) == ("done", f"sent back 1 scan(s): {failed.id}")
    [again] = rows(fresh_root, select(Scan).where(Scan.id == failed.id))
    assert again.retried_at is not None


def test_a_retry_that_failed_on_a_lock_is_recorded_without_the_statement(fresh_root, monkeypatch):
    """The record kept SQLAlchemy's whole text, '[SQL: BEGIN IMMEDIATE]' and a web address with it:
    the statement and its parameters are never kept."""
    from meddaemon.web import actions

    monkeypatch.setattr(actions, "LOCK_WAIT_SECONDS", 1.0)
    [failed] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE))
    client, csrf = admin(fresh_root, busy_timeout=0.3)
    holder = hold_sqlite_write_lock(fresh_root, 60.0)
    record = actions.record

    def record_once_the_writer_is_done(*args, **kwargs):  # type: ignore[no-untyped-def]
        holder.cancel()
        holder.function()
        return record(*args, **kwargs)

    monkeypatch.setattr(actions, "record", record_once_the_writer_is_done)
    try:
        response = client.post("/failures/retry", data={"scan": str(failed.id), "csrf": csrf})
    finally:
        holder.cancel()
        holder.join()
    assert response.status_code == 200
    [action] = rows(fresh_root, select(WebAction))
    assert action.outcome == "failed" and action.detail == "OperationalError: database is locked"


def test_an_action_waits_a_bounded_time_for_another_writer_then_says_the_database_is_busy(
    fresh_root, monkeypatch, caplog
):
    """A writer holding the database for 40 s held the click, and a server thread, for 40 s."""
    import time

    from meddaemon.web import actions

    monkeypatch.setattr(actions, "LOCK_WAIT_SECONDS", 1.0)
    register(fresh_root, "v2")
    [failed] = rows(fresh_root, select(Scan).where(Scan.source_name == UNROUTABLE))
    client, csrf = admin(fresh_root, busy_timeout=0.3)
    holder = hold_sqlite_write_lock(fresh_root, 30.0)
    took = []
    try:
        for url, form in (
            ("/failures/retry", {"scan": str(failed.id)}),
            ("/models/busi/v2/promote", {"confirm": "busi/v2"}),
        ):
            began = time.monotonic()
            response = client.post(url, data={**form, "csrf": csrf})
            took.append(time.monotonic() - began)
            assert response.status_code == 503 and 'id="database-down"' in response.text
            assert "could not be recorded: database is locked" in response.text
            assert 'http-equiv="refresh"' not in response.text  # a reload would GET the action's address
    finally:
        holder.cancel()
        holder.function()
    assert max(took) < 10, took
    assert rows(fresh_root, select(WebAction)) == []
    assert {m.version: m.status for m in rows(fresh_root, select(ModelVersion))} == {"v1": "active", "v2": "registered"}
    assert "retry by admin (admin): scan" in caplog.text and "not recorded" in caplog.text
