"""The overview's figures from SYNTHETIC rows: states, hourly registrations and inferences (the throughput),
failures, the oldest waiting scan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from daemon_rows import add_scan
from meddaemon.daemon import bookkeeper
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import ModelVersion, Result, ScanEvent
from meddaemon.engine.tasks import all_tasks
from meddaemon.states import ScanState
from meddaemon.web import queries
from sql_statements import sqlite_query_plan

NOW = datetime(2026, 11, 30, 12, 30, tzinfo=UTC)


def add_version(session: Session, version: str, heatmaps: bool) -> ModelVersion:
    """A SYNTHETIC busi version row (no files behind it) whose manifest says whether it makes heatmaps."""
    row = ModelVersion(task_name="busi", version=version, architecture="onnx", sha256="0" * 64,
                       path=f"/synthetic/models/{version}", manifest={"heatmaps": heatmaps})  # fmt: skip
    session.add(row)
    session.flush()
    return row


def add_result(session: Session, scan_id: int, version: ModelVersion) -> None:
    for label, probability in (("benign", 0.7), ("malignant", 0.2), ("normal", 0.1)):
        session.add(Result(scan_id=scan_id, model_version_id=version.id, label=label, probability=probability,
                           threshold=0.5, positive=label == "benign"))  # fmt: skip


def test_the_overview_counts_and_finds_the_scan_that_waited_longest(migrated_engine):
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        add_scan(session, 1, ScanState.ARCHIVED, registered_at=NOW - timedelta(hours=3), updated_at=NOW)
        add_scan(
            session, 2, ScanState.ROUTED, registered_at=NOW - timedelta(hours=2), updated_at=NOW - timedelta(hours=2)
        )
        add_scan(session, 3, ScanState.WAITING_MODEL, registered_at=NOW - timedelta(minutes=90),
                 updated_at=NOW - timedelta(minutes=80))  # fmt: skip
        add_scan(session, 4, ScanState.ROUTED, registered_at=NOW - timedelta(minutes=10), updated_at=NOW)
        for n in (5, 6):
            add_scan(session, n, ScanState.FAILED, registered_at=NOW - timedelta(minutes=5), updated_at=NOW,
                     failure_reason="unroutable", failure_message="SYNTHETIC")  # fmt: skip
        for scan_id, state, ago in ((1, "inferred", 170), (1, "archived", 160), (2, "routed", 100), (3, "inferred", 75),
                                    (4, "inferred", 20), (5, "inferred", 15), (6, "inferred", 600)):  # fmt: skip
            session.add(ScanEvent(scan_id=scan_id, state=state, at=NOW - timedelta(minutes=ago)))
    with sessions() as session:
        data = queries.overview(session, hours=4, now=NOW)
    assert data.states == {"archived": 1, "routed": 2, "waiting_model": 1, "failed": 2} and data.total == 6
    assert [(h.start.hour, h.count) for h in data.registered_per_hour] == [(9, 1), (10, 1), (11, 1), (12, 3)]
    assert [(h.start.hour, h.count) for h in data.inferred_per_hour] == [(9, 1), (10, 0), (11, 1), (12, 2)]
    assert data.failures_by_reason == [("unroutable", 2, 2)]
    assert data.oldest_waiting is not None
    assert (data.oldest_waiting.state, round(data.oldest_waiting.age_seconds)) == ("routed", 7200)
    assert data.daemons == [] and data.active_models == {}


def test_every_page_renders_over_sqlite_and_postgresql(migrated_engine, db_url, tmp_path):
    from starlette.testclient import TestClient

    from meddaemon.config import load_settings
    from meddaemon.db.readonly import read_only_engine
    from meddaemon.web.app import create_app

    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        for n, state in enumerate((ScanState.ARCHIVED, ScanState.ROUTED, ScanState.FAILED), start=1):
            add_scan(session, n, state, failure_reason="unroutable" if state == "failed" else None)
        add_scan(session, 4, ScanState.ARCHIVED)
        add_result(session, 1, add_version(session, "onnx_without_cam", heatmaps=False))
        add_result(session, 4, add_version(session, "v1", heatmaps=True))  # a result stored without its map
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    app = create_app(settings, reader=read_only_engine(db_url))
    client = TestClient(app, base_url="http://127.0.0.1")
    for url in ("/", "/worklist", "/worklist?state=failed&q=synthetic&call=negative&since=2020-01-01",
                "/scans/1", "/scans/3", "/failures", "/models", "/audits"):  # fmt: skip
        assert client.get(url).status_code == 200, url
    assert client.get("/scans/99").status_code == 404
    # why a scan page shows no heatmap: the model makes none (as the PDF report says), none was stored, no result
    assert "no heatmap: this model makes none" in client.get("/scans/1").text
    without_map = client.get("/scans/4").text
    assert "no heatmap for this result" in without_map and "makes none" not in without_map
    assert "no result yet" in client.get("/scans/2").text
    app.state.console.dispose()


def test_the_hourly_inferred_count_reads_only_its_index_on_sqlite(tmp_path):
    plan = sqlite_query_plan(
        tmp_path / "m.db",
        "SELECT count(*) FROM scan_events WHERE state = 'inferred' "
        "AND at >= '2026-11-30 11:00:00' AND at < '2026-11-30 12:00:00'",
    )
    assert "COVERING INDEX ix_scan_events_state_at" in plan


def test_a_binary_scan_whose_finding_is_not_called_is_negative_though_its_negative_class_is(migrated_engine):
    """A binary model calls its negative class ("benign" of busi_binary, shown "called" in black) when
    its finding is not: "positive" listed every binary scan, and "negative" none."""
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        binary = ModelVersion(task_name="busi_binary", version="v1", architecture="onnx", sha256="0" * 64,
                              path="/synthetic/models/busi_binary/v1",
                              manifest={"kind": "binary", "labels": ["benign", "malignant"]})  # fmt: skip
        session.add(binary)
        session.flush()
        negative, positive = add_scan(session, 1, ScanState.ARCHIVED).id, add_scan(session, 2, ScanState.ARCHIVED).id
        for scan, malignant in ((negative, 0.3), (positive, 0.8)):
            for label, probability in (("benign", 1 - malignant), ("malignant", malignant)):
                session.add(Result(scan_id=scan, model_version_id=binary.id, label=label, probability=probability,
                                   threshold=0.5, positive=probability >= 0.5))  # fmt: skip

    def listed(**f: str) -> list[int]:
        with sessions() as session:
            return [row.id for row in queries.worklist(session, queries.WorklistFilter(**f)).rows]

    assert listed(call="positive") == [positive] and listed(call="negative") == [negative]
    assert listed(label="benign", call="positive") == [negative]  # a label named: that label's call
    assert listed(label="malignant", call="positive") == [positive]


def test_a_multiclass_top_class_names_a_class_not_a_finding_called_as_its_row_shows(migrated_engine):
    """A multiclass model's call is its top class, shown "called" in black: "positive" listed every
    busi scan ("normal" ones too) and "negative" none. A finding of such a task is asked for by its
    label and call."""
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        busi = ModelVersion(task_name="busi", version="v1", architecture="onnx", sha256="0" * 64,
                            path="/synthetic/models/busi/v1",
                            manifest={"kind": "multiclass", "labels": ["benign", "malignant", "normal"]})  # fmt: skip
        session.add(busi)
        session.flush()
        normal, malignant = add_scan(session, 1, ScanState.ARCHIVED).id, add_scan(session, 2, ScanState.ARCHIVED).id
        for scan, called in ((normal, "normal"), (malignant, "malignant")):
            for label in ("benign", "malignant", "normal"):
                session.add(Result(scan_id=scan, model_version_id=busi.id, label=label,
                                   probability=0.8 if label == called else 0.1, threshold=0.5,
                                   positive=label == called))  # fmt: skip

    def rows(**f: str) -> list[queries.WorklistRow]:
        with sessions() as session:
            return queries.worklist(session, queries.WorklistFilter(**f)).rows

    assert all(row.top is not None and row.top.names_a_class for row in rows())
    assert [row.id for row in rows(call="positive")] == []
    assert [row.id for row in rows(call="negative")] == [malignant, normal]
    assert [row.id for row in rows(label="malignant", call="positive")] == [malignant]
    assert [row.id for row in rows(label="normal", call="positive")] == [normal]


def test_the_call_filter_matches_the_call_each_row_shows_its_latest_versions(migrated_engine):
    """A scan called benign by v1 and negative on every label by v2 shows v2's call: it is listed by
    "negative", not by "positive", as its row says."""
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        v1, v2 = add_version(session, "v1", heatmaps=False), add_version(session, "v2", heatmaps=False)
        scan = add_scan(session, 1, ScanState.ARCHIVED).id
        add_result(session, scan, v1)
        for label, probability in (("benign", 0.1), ("malignant", 0.2), ("normal", 0.3)):
            session.add(Result(scan_id=scan, model_version_id=v2.id, label=label, probability=probability,
                               threshold=0.5, positive=False))  # fmt: skip

    def rows(**f: str) -> list[queries.WorklistRow]:
        with sessions() as session:
            return queries.worklist(session, queries.WorklistFilter(**f)).rows

    def listed(**f: str) -> list[int]:
        return [row.id for row in rows(**f)]

    [row] = rows()
    assert row.top is not None and (row.top.label, row.top.positive) == ("normal", False)
    assert listed(call="negative") == [scan] and listed(call="positive") == []
    assert listed(label="benign", call="negative") == [scan] and listed(label="benign", call="positive") == []


def test_the_file_name_search_ignores_case_on_sqlite_and_postgresql_alike(migrated_engine):
    """LIKE ignores case on SQLite and not on PostgreSQL: the same console found 9 scans for
    'SYNTHETIC' over SQLite and none over PostgreSQL. A % or _ typed is a character, not a wildcard."""
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        add_scan(session, 1, source_name="busi/Synthetic_CXR_1.png")
        add_scan(session, 2, source_name="busi/synthetic_us_2.png")
        add_scan(session, 3, source_name="busi/synthetic_100%_3.png")

    def found(q: str) -> list[str]:
        with sessions() as session:
            page = queries.worklist(session, queries.WorklistFilter(q=q))
        return sorted(row.source_name for row in page.rows)

    everything = ["busi/Synthetic_CXR_1.png", "busi/synthetic_100%_3.png", "busi/synthetic_us_2.png"]
    assert found("synthetic") == found("SYNTHETIC") == found("SyNtHeTiC") == everything
    assert found("synthetic_cxr") == found("SYNTHETIC_CXR_1.PNG") == ["busi/Synthetic_CXR_1.png"]
    assert found("100%") == ["busi/synthetic_100%_3.png"] and found("c_r") == []
