"""Reports of real DICOM files with patient fields: none of them in a de-identified PDF (text and
metadata), all of them with PHI asked for."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from meddaemon.daemon.service import Daemon
from meddaemon.db.models import Report, Scan
from meddaemon.report.builder import ReportBuilder
from model_factory import PHI_STRINGS, STUDY_UID, read_pdf


def _study_scans(daemon: Daemon) -> list[Scan]:
    with daemon.sessions() as session:
        return list(session.scalars(select(Scan).where(Scan.study_instance_uid == STUDY_UID).order_by(Scan.id)))


def assert_no_phi(pdf: Path) -> None:
    text, _, _, metadata = read_pdf(pdf)
    raw = pdf.read_bytes()
    for phi in PHI_STRINGS:
        assert phi not in text
        assert all(phi not in value for value in metadata.values())
        assert phi.encode() not in raw


def test_the_daemons_reports_of_a_dicom_with_patient_fields_hold_none_of_them(reported: Daemon):
    scans = _study_scans(reported)
    assert len(scans) == 2 and scans[0].patient_id == "PHI-ID-98765"  # the source does hold them
    with reported.sessions() as session:
        rows = session.scalars(select(Report).where(Report.scan_id.in_([s.id for s in scans]))).all()
        study = session.scalars(select(Report).where(Report.kind == "study")).all()
    assert len(rows) == 2 and not any(r.with_phi for r in rows)
    assert len(study) == 1 and study[0].study_instance_uid == STUDY_UID
    for row in [*rows, *study]:
        pdf = reported.settings.stored_file(row.path)
        assert hashlib.sha256(pdf.read_bytes()).hexdigest() == row.sha256
        assert_no_phi(pdf)
    text, *_ = read_pdf(reported.settings.stored_file(study[0].path))
    assert STUDY_UID not in text and "SYNTHETIC-VENDOR" in text


@pytest.mark.parametrize("kind", ["scan", "study"])
def test_with_phi_puts_every_patient_field_in(reported: Daemon, tmp_path: Path, kind: str):
    builder = ReportBuilder(reported.settings, reported.sessions)
    out = tmp_path / f"{kind}.pdf"
    if kind == "scan":
        written = builder.scan_report(_study_scans(reported)[0].id, with_phi=True, out=out)
    else:
        written = builder.study_report(STUDY_UID, with_phi=True, out=out)
    assert written.with_phi and written.path == out
    text, _, _, metadata = read_pdf(out)
    for phi in PHI_STRINGS:
        assert phi in text
        assert all(phi not in value for value in metadata.values())  # never in the metadata
    assert "De-identified" not in text
