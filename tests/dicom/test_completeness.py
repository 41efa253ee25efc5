"""Study and series completeness (``dicom.completeness``) and the study report that waits for it.

Specified here: a series is complete when none of its instances arrived for ``series_quiet_seconds``
(by the database's clock, SQLite and PostgreSQL), a study when all its series are; a study received
over DICOM gets its study report only once complete, and gets it then without another scan being
reported. Rows are SYNTHETIC (made-up UIDs and hashes); the reported study is the package's
SYNTHETIC ``delivered`` state, copied.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from meddaemon.daemon.reporter import Reporter
from meddaemon.daemon.service import Daemon
from meddaemon.db.clock import db_clock
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.models import ReceivedInstance, Report, Scan
from meddaemon.dicom.completeness import arrival_summary, series_arrivals, studies_still_arriving
from model_factory import STUDY_UID


def arrive(session: Session, study: str, series: str, seconds_ago: float, n: int = 1) -> None:
    """``n`` SYNTHETIC instances of a series, received ``seconds_ago`` by the database's clock."""
    for i in range(n):
        session.execute(
            insert(ReceivedInstance).values(
                sha256=f"{hash((study, series, seconds_ago, i)) & (2**128 - 1):032x}" * 2,
                size_bytes=100,
                file_name=f"dicom/SYNTHETIC_{i}.dcm",
                sop_instance_uid=f"{series}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                study_instance_uid=study,
                series_instance_uid=series,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                calling_ae="SYNTHETIC",
                called_ae="MEDDAEMON",
                peer_address="127.0.0.1",
                peer_port=104,
                association_at=datetime.now(UTC),
                received_at=db_clock() - seconds_ago,
                node="test",
            )
        )


def test_a_series_is_complete_after_its_quiet_time_and_a_study_when_all_its_series_are(migrated_engine):
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        arrive(session, "1.2.3.1", "1.2.3.1.1", seconds_ago=100, n=2)  # quiet
        arrive(session, "1.2.3.1", "1.2.3.1.2", seconds_ago=20)  # still arriving
        arrive(session, "1.2.3.2", "1.2.3.2.1", seconds_ago=61)  # quiet
    with sessions() as session:
        series = {s.series_instance_uid: s for s in series_arrivals(session, ["1.2.3.1", "1.2.3.2"], 60)}
        waiting = studies_still_arriving(session, ["1.2.3.1", "1.2.3.2", "1.2.3.3"], 60)
        summary = arrival_summary(session, 60)
    assert {uid: (s.instances, s.complete) for uid, s in series.items()} == {
        "1.2.3.1.1": (2, True),
        "1.2.3.1.2": (1, False),
        "1.2.3.2.1": (1, True),
    }
    assert list(waiting) == ["1.2.3.1"] and 35 <= waiting["1.2.3.1"] <= 40
    assert (summary.instances_last_hour, summary.series_arriving, summary.studies_arriving) == (4, 1, 1)


def test_the_study_report_of_a_study_received_over_dicom_waits_until_it_is_complete(delivered: Daemon, tmp_path: Path):
    """A copy of a reported state whose two-scan study had instances arrive just now: a newer scan
    report makes the study report stale, yet it is not rebuilt while the study is arriving; once
    quiet (its instances moved back past the 60 s window, rather than waited for: a slow round
    would end the window before it is looked at), the next round rebuilds it, with no further scan
    reported."""
    root = tmp_path / "copy"
    shutil.copytree(delivered.settings.state_dir, root / "state")
    settings = dataclasses.replace(
        delivered.settings, state_dir=root / "state", watch=root / "inbox", db="", series_quiet_seconds=60.0
    )
    engine = create_db_engine(settings.db_url)
    sessions = session_factory(engine)
    try:
        with transaction(sessions) as session:
            arrive(session, STUDY_UID, STUDY_UID + ".1", seconds_ago=0, n=2)
            scan_report = session.scalars(
                select(Report.id).join(Scan, Report.scan_id == Scan.id).where(Scan.study_instance_uid == STUDY_UID)
            ).first()
            session.execute(update(Report).where(Report.id == scan_report).values(created_at=datetime.now(UTC)))

        def study_report_at() -> datetime:
            with sessions() as session:
                return session.scalar(
                    select(func.max(Report.created_at)).where(
                        Report.kind == "study", Report.study_instance_uid == STUDY_UID
                    )
                )

        before = study_report_at()
        reporter = Reporter(settings, sessions)
        reporter.round()
        assert STUDY_UID in reporter.studies_arriving and study_report_at() == before

        with transaction(sessions) as session:
            session.execute(
                update(ReceivedInstance)
                .where(ReceivedInstance.study_instance_uid == STUDY_UID)
                .values(received_at=ReceivedInstance.received_at - 61.0)
            )
        reporter.studies_arriving[STUDY_UID] = time.monotonic()  # and the time to look again come
        deadline = time.monotonic() + 30
        while study_report_at() == before:
            assert time.monotonic() < deadline, "the study report was not rebuilt once the study was quiet"
            reporter.round()
            time.sleep(0.2)
        assert reporter.stats.studies == 1 and reporter.stats.scans == 0 and not reporter.studies_arriving
    finally:
        engine.dispose()
