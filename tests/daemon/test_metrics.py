"""The Prometheus endpoint, scraped over real HTTP from a server on a free port, against both databases."""

from __future__ import annotations

import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from daemon_harness import one, scrape
from daemon_rows import add_scan
from meddaemon.daemon import metrics as metrics_module
from meddaemon.daemon.metrics import DaemonMetrics, quantile, start_metrics_server
from meddaemon.db.clock import read_db_clock
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade
from meddaemon.db.models import DaemonInstance, InboxClaim, ModelVersion, Result, Scan, ScanEvent, Task, utcnow
from meddaemon.states import ScanState


def _scan(n: int, state: str, **kw) -> Scan:
    return Scan(sha256=f"{n:064x}", state=state, source_name=f"synthetic_{n}.png", task_name="busi", **kw)


def _populate(engine) -> dict[str, int]:
    now = utcnow()
    with Session(engine) as s, s.begin():
        clock = read_db_clock(s)
        s.add(Task(name="busi", description="breast ultrasound"))
        s.add(Task(name="covid", description="covid"))
        s.flush()
        s.add_all(
            [
                ModelVersion(task_name="busi", version="v2", architecture="mobilenet_v2", sha256="a" * 64, path="/m"),
                ModelVersion(task_name="busi", version="v3", architecture="resnet18", sha256="b" * 64, path="/m"),
                ModelVersion(task_name="covid", version="v1", architecture="densenet121", sha256="c" * 64, path="/m"),
            ]
        )
        s.flush()
        busi_v2, busi_v3, covid_v1 = s.query(ModelVersion).order_by(ModelVersion.id).all()
        busi_v3.status = covid_v1.status = "active"
        busi_v2.status = "retired"
        s.add_all([_scan(i, "routed") for i in range(3)])
        s.add(_scan(10, "failed", failure_reason="truncated_image"))
        s.add(_scan(11, "failed", failure_reason="truncated_image"))
        s.add(_scan(12, "failed", failure_reason="empty_file", registered_at=now - timedelta(hours=1)))
        inferred = [_scan(20 + i, "inferred") for i in range(4)]
        s.add_all(inferred)
        s.flush()
        # 4 scans x 3 labels; a scan's labels share its latency; one scan inferred an hour ago
        for i, (scan, latency) in enumerate(zip(inferred, [100.0, 200.0, 300.0, 5000.0], strict=True)):
            created = now - timedelta(hours=1) if i == 3 else now
            for label in ("benign", "malignant", "normal"):
                s.add(
                    Result(
                        scan_id=scan.id,
                        model_version_id=busi_v3.id,
                        label=label,
                        probability=0.5,
                        threshold=0.5,
                        positive=True,
                        latency_ms=latency,
                        created_at=created,
                    )
                )
        alive = DaemonInstance(
            node="node-a", pid=101, version="0.1.0", state="running", lease_seconds=30.0,
            started_at=clock - 500, heartbeat_at=clock - 5,
        )  # fmt: skip
        stale = DaemonInstance(
            node="node-b", pid=202, version="0.1.0", state="running", lease_seconds=30.0,
            started_at=clock - 500, heartbeat_at=clock - 100,
        )  # fmt: skip
        gone = DaemonInstance(
            node="node-c", pid=303, version="0.1.0", state="stopped", lease_seconds=30.0,
            started_at=clock - 900, heartbeat_at=clock - 800, stopped_at=clock - 800,
        )  # fmt: skip
        s.add_all([alive, stale, gone])
        s.flush()
        synthetic = {"size": 1, "mtime_ns": 1, "inode": 1}
        s.add(InboxClaim(path="busi/x.png", daemon_id=alive.id, claimed_at=clock, **synthetic))
        s.add(InboxClaim(path="busi/left.png", claimed_at=clock - 5, done_at=clock - 1, **synthetic))  # a tombstone
        return {"alive": alive.id, "stale": stale.id}


@pytest.fixture
def server(migrated_engine):
    metrics = DaemonMetrics()
    handle = start_metrics_server("127.0.0.1", 0, migrated_engine, metrics)
    yield handle, metrics
    handle.stop()


def test_a_scrape_reports_what_the_database_holds(migrated_engine, server):
    ids = _populate(migrated_engine)
    handle, _ = server
    assert handle.port > 0
    m = scrape(handle.url)

    assert one(m, "meddaemon_database_up") == 1.0
    assert one(m, "meddaemon_scans", state="routed") == 3
    assert one(m, "meddaemon_scans", state="inferred") == 4
    assert one(m, "meddaemon_scans", state="failed") == 3
    assert one(m, "meddaemon_scans", state="archived") == 0  # every state is there, zero or not
    assert one(m, "meddaemon_scans_failed_total", reason="truncated_image") == 2
    assert one(m, "meddaemon_scans_failed_total", reason="empty_file") == 1
    assert one(m, "meddaemon_scans_failed_total", reason="vanished") == 0  # every reason, zero or not
    assert m["meddaemon_model_info"] == {
        (("architecture", "resnet18"), ("sha256", "b" * 64), ("task", "busi"), ("version", "v3")): 1.0,
        (("architecture", "densenet121"), ("sha256", "c" * 64), ("task", "covid"), ("version", "v1")): 1.0,
    }
    assert one(m, "meddaemon_daemons", state="running") == 2
    assert one(m, "meddaemon_daemons", state="stopped") == 1
    assert one(m, "meddaemon_daemons", state="lost") == 0
    assert one(m, "meddaemon_daemons_alive") == 1
    age_alive = one(m, "meddaemon_daemon_heartbeat_age_seconds", daemon=str(ids["alive"]), node="node-a",
                    pid="101", version="0.1.0")  # fmt: skip
    age_stale = one(m, "meddaemon_daemon_heartbeat_age_seconds", daemon=str(ids["stale"]), node="node-b",
                    pid="202", version="0.1.0")  # fmt: skip
    assert 5 <= age_alive < 15
    assert 100 <= age_stale < 110
    assert len(m["meddaemon_daemon_heartbeat_age_seconds"]) == 2  # stopped daemons have no heartbeat to age
    assert one(m, "meddaemon_inbox_claims") == 1
    # the last minute: 9 scans registered now (one failed an hour ago), 3 inferred now (one an hour ago)
    assert one(m, "meddaemon_throughput_scans_per_second", stage="registered") == pytest.approx(9 / 60)
    assert one(m, "meddaemon_throughput_scans_per_second", stage="inferred") == pytest.approx(3 / 60)
    assert one(m, "meddaemon_throughput_scans_per_second", stage="reported") == 0
    # quantiles over the 3 recent calls (100, 200, 300 ms), once per scan however many labels
    assert one(m, "meddaemon_recent_latency_scans") == 3
    assert one(m, "meddaemon_recent_latency_seconds", quantile="0.5") == pytest.approx(0.2)
    assert one(m, "meddaemon_recent_latency_seconds", quantile="0.9") == pytest.approx(0.28)
    assert 0 <= one(m, "meddaemon_oldest_waiting_seconds", state="routed") < 60
    assert one(m, "meddaemon_oldest_waiting_seconds", state="reported") == 0
    assert one(m, "meddaemon_oldest_waiting_seconds", state="waiting_model") == 0  # a refused model shows here


def test_the_age_of_a_waiting_scan_counts_from_its_entering_the_state_not_its_last_claim(migrated_engine, server):
    """A report failing every 30 s had its scan claimed again each time: its age never passed 30 s."""
    handle, _ = server
    with transaction(session_factory(migrated_engine)) as session:
        session.add(Task(name="busi", description=""))
        session.flush()
        scan = add_scan(session, 1, ScanState.INFERRED, updated_at=utcnow())
        session.add(ScanEvent(scan_id=scan.id, state="inferred", at=utcnow() - timedelta(minutes=20)))
    assert 1195 <= one(scrape(handle.url), "meddaemon_oldest_waiting_seconds", state="inferred") < 1260
    assert one(scrape(handle.url), "meddaemon_moves_waiting") == 0
    with transaction(session_factory(migrated_engine)) as session:
        add_scan(session, 2, ScanState.ARCHIVED, pending_move_from="work/ab/synthetic_2.png")  # archive/ unwritable
    assert one(scrape(handle.url), "meddaemon_moves_waiting") == 1


def test_the_daemons_own_counters_are_served_beside_the_database(migrated_engine, server):
    handle, metrics = server
    metrics.files_recorded("routed", None)
    metrics.files_recorded("routed")
    metrics.files_recorded("failed", "truncated_image")
    metrics.files_recorded("duplicate", None)
    metrics.results_stored(3, [40.0, 700.0, None])
    metrics.results_stored(0, [])
    metrics.inbox_waiting(7)
    metrics.inbox_unlisted(2)
    m = scrape(handle.url)

    assert one(m, "meddaemon_files_recorded_total", outcome="routed", reason="") == 2
    assert one(m, "meddaemon_files_recorded_total", outcome="failed", reason="truncated_image") == 1
    assert one(m, "meddaemon_files_recorded_total", outcome="duplicate", reason="") == 1
    assert one(m, "meddaemon_scans_inferred_total") == 3
    assert one(m, "meddaemon_inference_latency_seconds_count") == 2
    assert one(m, "meddaemon_inference_latency_seconds_sum") == pytest.approx(0.74)
    assert one(m, "meddaemon_inference_latency_seconds_bucket", le="0.05") == 1
    assert one(m, "meddaemon_inference_latency_seconds_bucket", le="1.0") == 2
    assert one(m, "meddaemon_inbox_waiting_files") == 7
    assert one(m, "meddaemon_inbox_unlisted_folders") == 2
    # an empty database: zeros, no latency quantiles, and no error
    assert one(m, "meddaemon_database_up") == 1
    assert one(m, "meddaemon_scans", state="routed") == 0
    assert "meddaemon_recent_latency_seconds" not in m


def test_every_metric_is_named_for_meddaemon_and_explained(migrated_engine, server):
    handle, _ = server
    with urllib.request.urlopen(handle.url, timeout=10) as response:
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        if family.name.startswith(("python_", "process_")):
            continue
        assert family.name.startswith("meddaemon_"), family.name
        assert len(family.documentation) > 20, family.name


def test_two_servers_in_one_process_do_not_collide(migrated_engine):
    first = start_metrics_server("127.0.0.1", 0, migrated_engine, DaemonMetrics())
    second = start_metrics_server("127.0.0.1", 0, migrated_engine, DaemonMetrics())
    try:
        assert first.port != second.port
        assert one(scrape(first.url), "meddaemon_database_up") == 1
        assert one(scrape(second.url), "meddaemon_database_up") == 1
    finally:
        first.stop()
        second.stop()


def test_a_stopped_server_frees_its_port(migrated_engine):
    handle = start_metrics_server("127.0.0.1", 0, migrated_engine)
    url = handle.url
    handle.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


@pytest.mark.parametrize("where", ["port taken", "host unknown"])
def test_an_endpoint_that_cannot_listen_is_a_settings_error_naming_them(migrated_engine, where: str):
    """The port taken (by the web console given the same one) or a host that is not this machine's:
    a traceback out of the daemon's start, exit 1, where a bad setting exits 2 naming it."""
    import socket

    from meddaemon.config import ConfigError
    from meddaemon.daemon.metrics import MetricsStage

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = ("127.0.0.1", taken.getsockname()[1]) if where == "port taken" else ("no-such-host.invalid", 0)
        stage = MetricsStage(host, port, migrated_engine, DaemonMetrics(), busy_timeout=1.0)
        with pytest.raises(ConfigError, match="'metrics_host' and 'metrics_port': the metrics endpoint cannot listen"):
            stage.start()
    assert stage.server is None


def test_a_postgresql_server_that_is_down_is_reported_in_the_scrape_not_as_a_500():
    handle = start_metrics_server("127.0.0.1", 0, "postgresql+psycopg://postgres@127.0.0.1:1/nothing", DaemonMetrics())
    try:
        m = scrape(handle.url)
    finally:
        handle.stop()
    assert one(m, "meddaemon_database_up") == 0
    assert "meddaemon_scans" not in m
    assert "meddaemon_inbox_waiting_files" in m  # the daemon's own metrics still come through


def test_a_sqlite_file_that_is_not_a_database_is_reported_down(tmp_path: Path):
    broken = tmp_path / "meddaemon.db"
    broken.write_bytes(b"not a database" * 100)
    handle = start_metrics_server("127.0.0.1", 0, f"sqlite:///{broken}")
    try:
        assert one(scrape(handle.url), "meddaemon_database_up") == 0
    finally:
        handle.stop()
    assert broken.read_bytes() == b"not a database" * 100


def test_a_missing_sqlite_file_is_down_and_is_not_created(tmp_path: Path):
    missing = tmp_path / "nowhere" / "meddaemon.db"
    handle = start_metrics_server("127.0.0.1", 0, f"sqlite:///{missing}")
    try:
        assert one(scrape(handle.url), "meddaemon_database_up") == 0
    finally:
        handle.stop()
    assert not missing.exists()


def test_quantiles_interpolate_between_order_statistics_like_numpy():
    numpy = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert quantile(values, q) == pytest.approx(float(numpy.quantile(values, q)))
    assert quantile([4.0], 0.99) == 4.0


def test_a_scrape_does_not_wait_for_the_sqlite_write_lock(tmp_path: Path):
    """The daemon's transactions take SQLite's write lock at BEGIN; a scrape reads beside them."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'meddaemon.db'}", busy_timeout=5.0)
    upgrade(engine)
    handle = start_metrics_server("127.0.0.1", 0, engine, busy_timeout=5.0)
    try:
        with Session(engine) as writer, writer.begin():  # BEGIN IMMEDIATE: the write lock, held
            writer.add(Task(name="busi", description=""))
            writer.flush()
            started = time.monotonic()
            m = scrape(handle.url)
            assert time.monotonic() - started < 2.0
        assert one(m, "meddaemon_database_up") == 1
    finally:
        handle.stop()
        engine.dispose()


def test_time_windows_look_only_at_the_latest_result_rows(migrated_engine, server, monkeypatch):
    """results.created_at has no index: a scrape reads the latest RECENT_ROWS rows by id, not the table."""
    _populate(migrated_engine)
    monkeypatch.setattr(metrics_module, "RECENT_ROWS", 6)  # the rows of the last two scans inferred
    handle, _ = server
    m = scrape(handle.url)
    assert one(m, "meddaemon_recent_latency_scans") == 1  # the other of the two is an hour old
    assert one(m, "meddaemon_recent_latency_seconds", quantile="0.5") == pytest.approx(0.3)
    assert one(m, "meddaemon_throughput_scans_per_second", stage="inferred") == pytest.approx(1 / 60)


def test_a_daemon_waiting_out_a_database_outage_reports_the_database_down(migrated_engine, server):
    """Its own transactions fail (the outage guard says so) even when the scrape's read gets through."""
    handle, metrics = server
    metrics.database_reachable(False)
    assert one(scrape(handle.url), "meddaemon_database_up") == 0
    metrics.database_reachable(True)
    assert one(scrape(handle.url), "meddaemon_database_up") == 1


def test_a_scrape_while_a_table_is_locked_or_the_link_frozen_says_down_within_its_deadline(
    migrated_postgres_url: str,
):
    """A table held in ACCESS EXCLUSIVE (a migration, VACUUM FULL) or a link that stops answering
    mid-read held the scrape, and every scrape after it, for as long as it lasted: Prometheus saw no
    answer (up 0), never `meddaemon_database_up 0`, and the scrapes' threads piled up."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from tcp_proxy import tcp_proxy

    where = make_url(migrated_postgres_url)
    with tcp_proxy((where.host or "127.0.0.1", where.port or 5432)) as proxy:
        through = where.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        handle = start_metrics_server("127.0.0.1", 0, through, DaemonMetrics(), busy_timeout=1.0)
        holder = create_db_engine(migrated_postgres_url)
        try:
            assert one(scrape(handle.url), "meddaemon_database_up") == 1
            with holder.connect() as connection:
                connection.execute(text("LOCK TABLE scans IN ACCESS EXCLUSIVE MODE"))
                started = time.monotonic()
                assert one(scrape(handle.url), "meddaemon_database_up") == 0
                assert time.monotonic() - started < 8.0
                connection.rollback()
            assert one(scrape(handle.url), "meddaemon_database_up") == 1
            proxy.freeze()
            for _ in range(2):  # the read left hanging, and the scrape after it
                started = time.monotonic()
                assert one(scrape(handle.url), "meddaemon_database_up") == 0
                assert time.monotonic() - started < 8.0
        finally:
            proxy.thaw()
            holder.dispose()
            handle.stop()
