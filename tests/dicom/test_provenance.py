"""Who sent a scan and which version of its instance it is (``dicom.provenance``, ``medcli scans``),
on SQLite and PostgreSQL. Rows are SYNTHETIC (made-up UIDs and hashes)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert

from meddaemon.db.clock import db_clock
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import ReceivedInstance
from meddaemon.dicom.provenance import provenance


def received(session, sha: str, uid: str, calling_ae: str) -> None:  # type: ignore[no-untyped-def]
    session.execute(
        insert(ReceivedInstance).values(
            sha256=sha * 64,
            size_bytes=100,
            file_name=f"dicom/{calling_ae}_{sha}.dcm",
            sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            calling_ae=calling_ae,
            called_ae="MEDDAEMON",
            peer_address="127.0.0.1",
            peer_port=104,
            association_at=datetime.now(UTC),
            received_at=db_clock(),
            node="test",
        )
    )


def test_each_content_names_its_first_sender_and_its_version_among_the_contents_of_its_instance(migrated_engine):
    sessions = session_factory(migrated_engine)
    with transaction(sessions) as session:
        received(session, "a", "1.2.3.4.1", "CT01")
        received(session, "b", "1.2.3.4.2", "CT01")
        received(session, "a", "1.2.3.4.1", "ORTHANC")  # the same bytes again
        received(session, "c", "1.2.3.4.2", "ORTHANC")  # a correction of 1.2.3.4.2
    with sessions() as session:
        found = provenance(session, ["a" * 64, "b" * 64, "c" * 64, "d" * 64])
    assert sorted(found) == ["a" * 64, "b" * 64, "c" * 64]
    first, original, corrected = found["a" * 64], found["b" * 64], found["c" * 64]
    assert (first.calling_ae, first.receptions, first.versions) == ("CT01", 2, 1)
    assert first.describe() == "from CT01@127.0.0.1"
    assert (original.version, original.versions, corrected.version, corrected.versions) == (1, 2, 2, 2)
    assert corrected.describe() == "from ORTHANC@127.0.0.1, version 2 of 1.2.3.4.2"
