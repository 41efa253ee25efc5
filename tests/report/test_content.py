"""Which scan a report is asked for (by id, SHA-256 or a prefix of it), and what its report shows."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from daemon_rows import add_scan
from meddaemon.daemon import bookkeeper
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import Result, Scan
from meddaemon.engine.tasks import all_tasks
from meddaemon.report.content import AmbiguousScan, NoResult, find_scan, scans_report_data
from meddaemon.states import ScanState
from meddaemon.web import queries as web_queries
from model_factory import ReportedStates, promote, store_busi_results, write_model
from sql_statements import recorded_statements


def test_a_hash_with_a_failed_attempt_and_a_new_one_finds_the_new_one(migrated_engine):
    sessions = session_factory(migrated_engine)
    sha = "cd" * 32
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        failed = add_scan(session, 1, ScanState.FAILED, sha256=sha, stored_path=None).id
        new = add_scan(session, 2, ScanState.INFERRED, sha256=sha).id
    with sessions() as session:
        assert [find_scan(session, key).id for key in (sha, sha[:8], str(failed))] == [new, new, failed]


def test_a_prefix_of_several_scans_hashes_is_named_ambiguous_with_their_ids_not_no_scan(migrated_engine):
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        first = add_scan(session, 1, ScanState.INFERRED, sha256="5830ae6c01" + "ab" * 27).id
        second = add_scan(session, 2, ScanState.INFERRED, sha256="5830ae6c01" + "cd" * 27).id
    with sessions() as session, pytest.raises(AmbiguousScan, match=f"2 scans \\(ids {first}, {second}\\)"):
        find_scan(session, "5830ae6c")
    with sessions() as session:
        assert find_scan(session, "5830ae6c01ab").id == first


def test_a_prefix_of_digits_only_is_a_prefix_when_no_scan_has_that_id(migrated_engine):
    sessions = session_factory(migrated_engine)
    sha = "7597604971" + "ab" * 27
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        scan = add_scan(session, 1, ScanState.INFERRED, sha256=sha).id
    with sessions() as session:
        assert find_scan(session, sha[:10]).id == scan
        assert find_scan(session, sha[:8]).id == scan
        assert find_scan(session, str(scan)).id == scan
        assert find_scan(session, "1234567") is None
        assert find_scan(session, "9" * 11) is None  # past an INTEGER key: no id, and no such prefix


def test_the_scans_of_a_report_round_are_read_together_each_with_its_latest_version_s_results(
    reported_states: ReportedStates, tmp_path: Path
):
    """Issue 16: a report round reads its scans' rows in two queries whatever their number. Each scan
    shows the results of the model version that ran on it last (here one busi scan run again by a
    second version); a scan without results says so."""
    daemon = reported_states.copy(tmp_path / "state")
    promote(daemon, write_model(tmp_path / "busi_v2", version="v2"))
    rerun_id = store_busi_results(daemon, "v2")

    with daemon.sessions() as session, recorded_statements(daemon.engine, "SELECT") as selects:
        scans = session.scalars(select(Scan).order_by(Scan.id)).all()
        before = len(selects)
        found = scans_report_data(session, scans, daemon.settings.task_specs, state_dir=daemon.settings.state_dir)
        reads = len(selects) - before

        assert reads == 2
        assert {scan.id for scan in scans} == set(found)
        without = [scan.id for scan in scans if isinstance(found[scan.id], NoResult)]
        assert [scan.state for scan in scans if scan.id in without] == ["failed"]  # the empty file
        for scan in scans:
            if scan.id in without:
                continue
            last = session.scalars(select(Result).where(Result.scan_id == scan.id).order_by(Result.id.desc())).first()
            expected = session.execute(
                select(Result.label, Result.probability)
                .where(Result.scan_id == scan.id, Result.model_version_id == last.model_version_id)
                .order_by(Result.id)
            ).all()
            data = found[scan.id]
            assert data.model.version_id == last.model_version_id and data.task == scan.task_name
            assert [(r.label, r.probability) for r in data.results] == [tuple(row) for row in expected]
    rerun_data = found[rerun_id]
    assert rerun_data.model.version == "v2" and [r.probability for r in rerun_data.results] == [0.2, 0.7, 0.1]
    assert all(r.overlay_path is None for r in rerun_data.results)  # v2 drew no heatmap for it


def test_a_scan_s_report_and_its_console_page_show_the_newest_version_s_results_whatever_the_order_stored(
    reported_states: ReportedStates, tmp_path: Path
):
    """v3 then v2 ran on a scan (``medcli evaluate --model v2`` after v3's run): the report showed v2
    (the results stored last) and the console v3 as current, v2 "(earlier)". Both show v3 now."""
    daemon = reported_states.copy(tmp_path / "state")
    for version in ("v2", "v3"):
        promote(daemon, write_model(tmp_path / f"busi_{version}", version=version))
    scan_id = store_busi_results(daemon, "v3", malignant=0.7)
    store_busi_results(daemon, "v2", malignant=0.3, scan_id=scan_id)
    with daemon.sessions() as session:
        scan = session.get(Scan, scan_id)
        data = scans_report_data(session, [scan], daemon.settings.task_specs, state_dir=daemon.settings.state_dir)
        detail = web_queries.scan_detail(session, scan_id, with_phi=False)
    assert data[scan_id].model.version == "v3"
    assert [r.probability for r in data[scan_id].results] == [0.2, 0.7, 0.1]
    assert detail.results[0].version == "v3"
