"""`check_health` against real databases: heartbeats by the database's clock, queues, failures, disk."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from audit_factory import add_version
from daemon_rows import dead_pid
from meddaemon.config import load_settings
from meddaemon.daemon.health import HealthLimits, HealthReport, check_health, this_node
from meddaemon.daemon.lease import pid_namespace
from meddaemon.db.clock import read_db_clock
from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import current_revision, head_revision, upgrade
from meddaemon.db.models import DaemonInstance, Scan, ScanEvent, Task, utcnow
from meddaemon.db.readonly import read_only_engine

#: the real disk under tmp_path, with no minimum: disk space is tested on its own
NO_DISK_LIMIT = HealthLimits(min_free_bytes=0)


@pytest.fixture
def reader(db_url: str) -> Iterator[Engine]:
    engine = read_only_engine(db_url)
    yield engine
    engine.dispose()


def add_daemon(
    engine: Engine,
    node: str,
    age: float,
    state: str = "running",
    lease: float = 30.0,
    stopped_ago: float | None = None,
    pid: int = 4242,
    namespace: str | None = None,
) -> int:
    """A daemon row whose last heartbeat was ``age`` seconds ago by the database's clock."""
    with Session(engine) as s, s.begin():
        clock = read_db_clock(s)
        row = DaemonInstance(
            node=node,
            pid=pid,
            pid_namespace=namespace,
            version="0.1.0",
            state=state,
            lease_seconds=lease,
            started_at=clock - age - 60,
            heartbeat_at=clock - age,
            stopped_at=None if stopped_ago is None else clock - stopped_ago,
        )
        s.add(row)
        s.flush()
        return row.id


def add_scans(engine: Engine, state: str, n: int, start: int = 0, **kw) -> None:
    with Session(engine) as s, s.begin():
        if s.get(Task, "busi") is None:
            s.add(Task(name="busi", description=""))
            s.flush()
        s.add_all(
            Scan(sha256=f"{start + i:064x}", state=state, source_name=f"s{start + i}.png", task_name="busi", **kw)
            for i in range(n)
        )


def check(reader: Engine, settings, **limits) -> HealthReport:
    return check_health(reader, settings, HealthLimits(**{"min_free_bytes": 0, **limits}))


def statuses(report: HealthReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_one_daemon_with_a_fresh_heartbeat_is_healthy(migrated_engine, reader, db_url, make_settings, tmp_path):
    add_daemon(migrated_engine, "node-a", age=2)
    (tmp_path / "inbox").mkdir()
    report = check(reader, make_settings(db=db_url))
    assert statuses(report) == {
        "database": "ok",
        "daemons": "ok",
        "lost_daemons": "ok",
        "queue": "ok",
        "models": "ok",
        "failures": "ok",
        "outbox": "ok",
        "moves": "ok",
        "inbox": "ok",
        "disk": "ok",
    }
    assert (report.status, report.exit_code) == ("ok", 0)
    assert report.check("database").details == {"revision": head_revision(), "head": head_revision()}
    assert report.check("daemons").message == "1 alive on 1 node (node-a)"


def test_no_daemon_at_all_is_down(migrated_engine, reader, db_url, make_settings):
    report = check(reader, make_settings(db=db_url))
    assert (report.check("daemons").status, report.exit_code) == ("down", 2)
    assert report.check("daemons").message == "no daemon alive: none is running"


def test_a_running_row_past_its_lease_by_the_db_clock_is_not_alive(migrated_engine, reader, db_url, make_settings):
    started = time.monotonic()
    add_daemon(migrated_engine, "node-a", age=100, lease=30)
    add_daemon(migrated_engine, "node-b", age=400, state="stopped", stopped_ago=400)
    report = check(reader, make_settings(db=db_url))
    since = time.monotonic() - started  # the heartbeat aged that much more before the check read it
    daemons = report.check("daemons")
    assert daemons.status == "down" and report.exit_code == 2
    assert "1 marked running, all past their lease" in daemons.message
    age = re.search(r"the newest heartbeat is (\d+) s old", daemons.message)
    assert age is not None and 100 <= int(age[1]) <= 100 + since + 0.5, daemons.message


def test_a_stale_daemon_beside_a_live_one_is_degraded(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    stale = add_daemon(migrated_engine, "node-b", age=100)
    report = check(reader, make_settings(db=db_url))
    daemons = report.check("daemons")
    assert (daemons.status, report.exit_code) == ("degraded", 1)
    assert f"{stale} on node-b" in daemons.message
    assert (daemons.details["alive"], daemons.details["expired"]) == (1, 1)


def test_node_requires_a_live_daemon_on_that_node(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    add_daemon(migrated_engine, "node-b", age=500)  # dead on node-b
    settings = make_settings(db=db_url)
    on_a = check(reader, settings, node="node-a").check("daemons")
    assert on_a.status == "degraded"  # node-a is fine; node-b's stale row still shows
    on_b = check(reader, settings, node="node-b")
    assert (on_b.check("daemons").status, on_b.exit_code) == ("down", 2)
    assert on_b.check("daemons").message == "no daemon alive on node node-b (1 alive on other nodes)"


def test_a_daemon_of_this_node_whose_process_is_gone_is_down_before_its_lease_runs_out(
    migrated_engine, reader, db_url, make_settings
):
    """Killed with SIGKILL, its heartbeat still fresh: health (and so `--this-node`, the probes of
    systemd's timer and Docker) called it alive for up to lease_seconds, where the daemons of its
    node declare it lost at once."""
    settings = make_settings(db=db_url)
    here = this_node(settings)
    gone = add_daemon(migrated_engine, here, age=1, pid=dead_pid(), namespace=pid_namespace())
    for limits in ({}, {"node": here}):
        report = check(reader, settings, **limits)
        daemons = report.check("daemons")
        assert (daemons.status, report.exit_code) == ("down", 2), daemons.message
        assert f"daemon {gone} (pid " in daemons.message and "its process is gone" in daemons.message
    add_daemon(migrated_engine, here, age=1, pid=os.getpid(), namespace=pid_namespace())
    add_daemon(migrated_engine, "node-elsewhere", age=1, pid=dead_pid(), namespace=pid_namespace())
    report = check(reader, settings)
    assert report.check("daemons").status == "degraded"  # one alive here, the other node's pid not this host's
    assert report.check("daemons").details["alive"] == 2 and report.check("daemons").details["crashed"] == 1


def test_a_daemon_lost_recently_degrades_and_an_old_loss_is_forgotten(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    old = add_daemon(migrated_engine, "node-b", age=9000, state="lost", stopped_ago=7200)
    settings = make_settings(db=db_url)
    assert check(reader, settings).check("lost_daemons").status == "ok"
    recent = add_daemon(migrated_engine, "node-c", age=90, state="lost", stopped_ago=60, pid=77)
    report = check(reader, settings)
    lost = report.check("lost_daemons")
    assert (lost.status, report.exit_code) == ("degraded", 1)
    assert f"{recent} (node node-c, pid 77)" in lost.message and f"{old} " not in lost.message


def test_a_scan_waiting_too_long_while_daemons_run_is_a_stuck_queue(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    add_scans(migrated_engine, "routed", 2, updated_at=utcnow() - timedelta(seconds=30))
    settings = make_settings(db=db_url)
    assert check(reader, settings, stuck_seconds=600).check("queue").status == "ok"
    add_scans(migrated_engine, "routed", 1, start=10, updated_at=utcnow() - timedelta(minutes=20))
    queue = check(reader, settings, stuck_seconds=600).check("queue")
    assert queue.status == "degraded"
    assert queue.message.startswith("stuck: the oldest routed scan has waited 20 min (limit 10 min)")
    assert queue.details["waiting"] == {"routed": 3}


def add_waiting(engine: Engine, state: str, n: int, entered_ago: timedelta, start: int = 100, **columns) -> None:
    """``n`` scans that entered ``state`` ``entered_ago``, each touched a moment ago (a claim)."""
    add_scans(engine, state, n, start=start, updated_at=utcnow(), **columns)
    with Session(engine) as s, s.begin():
        ids = s.scalars(select(Scan.id).where(Scan.sha256.in_([f"{start + i:064x}" for i in range(n)]))).all()
        s.add_all(ScanEvent(scan_id=i, state=state, at=utcnow() - entered_ago) for i in ids)


def test_a_scan_whose_report_keeps_failing_is_stuck_though_each_new_claim_touches_it(
    migrated_engine, reader, db_url, make_settings
):
    """Every claim of the report stage moved ``updated_at``: a report failing every 30 s (its folder
    unwritable) left the scan 30 s old for ever, and health said ok."""
    add_daemon(migrated_engine, "node-a", age=1)
    add_waiting(migrated_engine, "inferred", 3, entered_ago=timedelta(minutes=20))
    queue = check(reader, make_settings(db=db_url, reports=True), stuck_seconds=600).check("queue")
    assert queue.status == "degraded"
    assert queue.message.startswith("stuck: the oldest inferred scan has waited 20 min (limit 10 min)")


def test_scans_waiting_for_an_active_model_no_daemon_serves_are_a_stuck_queue(
    migrated_engine, reader, db_url, make_settings
):
    """A refused active version (its weights changed on disk) left health ok: only the log said it."""
    add_daemon(migrated_engine, "node-a", age=1)
    add_waiting(migrated_engine, "waiting_model", 3, entered_ago=timedelta(minutes=20))
    settings = make_settings(db=db_url)
    assert check(reader, settings, stuck_seconds=600).check("queue").status == "ok"  # no model: none to serve
    add_version(migrated_engine, "busi", "v1")
    queue = check(reader, settings, stuck_seconds=600).check("queue")
    assert queue.status == "degraded"
    assert queue.message.startswith("stuck: scans wait for the active model of busi (3 scans, the oldest for 20 min)")
    assert "refused or failing to load" in queue.message
    assert check(reader, settings, stuck_seconds=3600).check("queue").status == "ok"  # a model loading is no fault


def test_a_watch_folder_gone_degrades_and_one_never_given_is_not_checked(
    migrated_engine, reader, db_url, make_settings, tmp_path, monkeypatch
):
    """The daemon waits for its inbox to come back, logging it; health said ok all the while."""
    add_daemon(migrated_engine, "node-a", age=1)
    inbox = check(reader, make_settings(db=db_url)).check("inbox")
    assert inbox.status == "degraded"
    assert inbox.message == f"the watch folder {tmp_path / 'inbox'} is gone: removed, or its share unmounted; " \
        "nothing dropped there is read"  # fmt: skip
    (tmp_path / "inbox").mkdir()
    assert check(reader, make_settings(db=db_url)).check("inbox").status == "ok"
    monkeypatch.chdir(tmp_path / "inbox")  # no ./inbox here: the default watch folder, never given
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path / "state"})
    assert "inbox" not in statuses(check(reader, settings))


def test_file_moves_held_back_past_the_limit_degrade(migrated_engine, reader, db_url, make_settings):
    """archive/ or failed/ unwritable: the daemon logs each file and tries again at each rescan, and
    health said ok (the moves were seen by `status` alone)."""
    add_daemon(migrated_engine, "node-a", age=1)
    add_scans(migrated_engine, "archived", 2, pending_move_from="work/ab/synthetic.png", updated_at=utcnow())
    settings = make_settings(db=db_url)
    moves = check(reader, settings, stuck_seconds=600).check("moves")
    assert (moves.status, moves.message) == ("ok", "2 file moves waiting, the oldest for 0 s")
    add_scans(migrated_engine, "failed", 1, start=5, pending_move_from="inbox/busi/x.png",
              updated_at=utcnow() - timedelta(minutes=20))  # fmt: skip
    moves = check(reader, settings, stuck_seconds=600).check("moves")
    assert moves.status == "degraded" and moves.details["waiting"] == 3
    assert moves.message.startswith("3 file moves held back, the oldest for 20 min (limit 10 min)")
    # archived 30 min ago, touched since (a daemon's stop gave back its claims): still 30 min held back
    add_waiting(migrated_engine, "archived", 1, timedelta(minutes=30), start=9, pending_move_from="work/cd/y.png")
    moves = check(reader, settings, stuck_seconds=600).check("moves")
    assert moves.message.startswith("4 file moves held back, the oldest for 30 min")


def test_inferred_scans_are_a_queue_only_when_reports_are_on(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    add_scans(migrated_engine, "inferred", 1, updated_at=utcnow() - timedelta(hours=2))
    assert check(reader, make_settings(db=db_url, reports=True)).check("queue").status == "degraded"
    assert check(reader, make_settings(db=db_url, reports=False)).check("queue").status == "ok"


def test_a_waiting_queue_is_not_called_stuck_when_no_daemon_could_work_on_it(
    migrated_engine, reader, db_url, make_settings
):
    add_scans(migrated_engine, "routed", 1, updated_at=utcnow() - timedelta(hours=2))
    report = check(reader, make_settings(db=db_url))
    assert report.check("queue").status == "ok"
    assert report.check("daemons").status == "down"  # that is the problem to report


def test_many_recent_failures_degrade(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    settings = make_settings(db=db_url)
    add_scans(migrated_engine, "routed", 5)
    add_scans(migrated_engine, "failed", 5, start=100, failure_reason="corrupt_image")
    half = check(reader, settings, max_failure_fraction=0.5).check("failures")
    assert half.status == "ok" and half.message == "5 of 10 scans registered in the last 15 min failed (50%)"
    add_scans(migrated_engine, "failed", 1, start=200, failure_reason="corrupt_image")
    report = check(reader, settings, max_failure_fraction=0.5)
    assert (report.check("failures").status, report.exit_code) == ("degraded", 1)
    # failures registered before the window do not count
    assert check(reader, settings, failure_window_seconds=60).check("failures").status == "degraded"
    add_scans(migrated_engine, "failed", 20, start=300, registered_at=utcnow() - timedelta(hours=1))
    assert check(reader, settings, max_failure_fraction=0.6).check("failures").details["registered"] == 11


def test_files_that_are_no_images_sent_with_whole_studies_are_not_failures_of_the_daemon(
    migrated_engine, reader, db_url, make_settings
):
    """A PACS forwarding whole studies sends their SRs and meddaemon's own results with the images."""
    add_daemon(migrated_engine, "node-a", age=1)
    add_scans(migrated_engine, "archived", 10)
    add_scans(migrated_engine, "failed", 40, start=100, failure_reason="own_output")
    add_scans(migrated_engine, "failed", 20, start=300, failure_reason="no_pixel_data")
    add_scans(migrated_engine, "failed", 2, start=200, failure_reason="corrupt_image")
    failures = check(reader, make_settings(db=db_url), max_failure_fraction=0.5).check("failures")
    assert failures.status == "ok"
    assert failures.message == "2 of 12 scans registered in the last 15 min failed (17%)"


def test_a_few_failures_are_not_a_rate(migrated_engine, reader, db_url, make_settings):
    add_daemon(migrated_engine, "node-a", age=1)
    add_scans(migrated_engine, "failed", 3, failure_reason="empty_file")
    assert check(reader, make_settings(db=db_url)).check("failures").status == "ok"


def test_low_disk_space_in_the_state_directory_degrades(migrated_engine, reader, db_url, make_settings, tmp_path):
    add_daemon(migrated_engine, "node-a", age=1)
    settings = make_settings(db=db_url, state_dir=tmp_path / "not" / "created" / "yet")
    report = check_health(reader, settings, HealthLimits(min_free_bytes=2**62))
    disk = report.check("disk")
    assert (disk.status, report.exit_code) == ("degraded", 1)
    assert disk.details["path"] == str(tmp_path.resolve())  # the nearest folder that exists
    assert "under the" in disk.message and "minimum" in disk.message
    assert not (tmp_path / "not").exists()


def test_a_schema_behind_this_meddaemon_is_reported_and_left_alone(db_url, reader, make_settings):
    engine = create_db_engine(db_url)
    upgrade(engine, "0004")
    try:
        report = check(reader, make_settings(db=db_url))
        database = report.check("database")
        assert database.status == "degraded"
        assert database.message.startswith(f"schema at 0004, behind this meddaemon's {head_revision()}")
        assert report.check("daemons").status == "degraded"  # no daemons table to read yet
        assert report.check("daemons").message.startswith("could not be checked:")
        assert report.exit_code == 1
        assert current_revision(engine) == "0004"  # not upgraded
    finally:
        engine.dispose()


def test_another_application_s_database_is_down_and_named_so_not_upgrade_advice(db_url, reader, make_settings):
    """It said "unknown to this meddaemon: upgrade meddaemon", or "no daemon ever started on it",
    where `start` refuses the database as another application's."""
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE customers (id INTEGER)"))
    database = check(reader, make_settings(db=db_url)).check("database")
    assert database.status == "down" and "holds tables of another application (customers)" in database.message
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('ae1027a6acf')"))
    engine.dispose()
    database = check(reader, make_settings(db=db_url)).check("database")
    assert database.status == "down"
    assert database.message.startswith("the database is another application's (its Alembic revision ae1027a6acf")


def test_a_database_without_the_schema_is_down_and_is_not_created(db_url, reader, make_settings):
    engine = create_db_engine(db_url)
    with engine.connect():  # SQLite: an empty file; PostgreSQL: the fixture's empty database
        pass
    try:
        report = check(reader, make_settings(db=db_url))
        assert (report.check("database").status, report.exit_code) == ("down", 2)
        assert current_revision(engine) is None
    finally:
        engine.dispose()


def test_a_database_that_cannot_be_reached_is_down(make_settings, tmp_path: Path):
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
    engine = read_only_engine(url)
    try:
        report = check_health(engine, make_settings(db=url), NO_DISK_LIMIT)
    finally:
        engine.dispose()
    assert statuses(report) == {"database": "down", "daemons": "down", "inbox": "degraded", "disk": "ok"}
    assert report.check("database").message.startswith("the database is unreachable:")
    assert report.exit_code == 2
    assert report.as_dict()["status"] == "down"


def test_a_missing_sqlite_file_is_down_and_stays_missing(make_settings, tmp_path: Path):
    path = tmp_path / "state" / "meddaemon.db"
    engine = read_only_engine(f"sqlite:///{path}")
    try:
        report = check_health(engine, make_settings(), NO_DISK_LIMIT)
    finally:
        engine.dispose()
    assert report.exit_code == 2
    assert not path.exists()
    # said as every other command says it ("unable to open database file" before)
    assert report.check("database").message == (
        f"no meddaemon database at {path} (run `medcli db upgrade` or start the daemon)"
    )
