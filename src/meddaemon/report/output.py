"""Putting a report on disk and in the database: a temporary name, fsync, rename, then the row.

The rename makes the PDF appear whole or not at all; the row (path and SHA-256) is committed after
it. A crash between the two leaves a complete PDF without a row, which the next attempt overwrites
with the same name; the row is keyed by that path, so it is never doubled.
"""

from __future__ import annotations

import contextlib
import hashlib
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.db.models import Report, utcnow
from meddaemon.files import TMP_SUFFIX, left_by_dead_writer, write_atomically


def scan_report_path(reports_dir: Path, sha256: str, with_phi: bool) -> Path:
    """``scans/<sha[:2]>/<sha>.pdf``, or ``<sha>.phi.pdf`` for a report with patient data."""
    return reports_dir / "scans" / sha256[:2] / f"{sha256}{'.phi' if with_phi else ''}.pdf"


def study_report_path(reports_dir: Path, study_key: str, with_phi: bool) -> Path:
    return reports_dir / "studies" / f"{study_key}{'.phi' if with_phi else ''}.pdf"


def summary_report_path(reports_dir: Path, since: datetime, until: datetime) -> Path:
    return reports_dir / "summaries" / f"summary_{since:%Y%m%dT%H%M}_{until:%Y%m%dT%H%M}.pdf"


def write_pdf(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically and durably; returns its SHA-256."""
    write_atomically(path, data, durable=True)
    return hashlib.sha256(data).hexdigest()


def remove_stale_temporaries(reports_dir: Path) -> int:
    """Delete the temporary files a killed report writer of this host left (``.<name>.pdf.<host>-<pid>.tmp``);
    those of live writers, here or on other hosts sharing the folder, stay."""
    removed = 0
    if not reports_dir.is_dir():
        return 0
    for tmp in reports_dir.rglob(f".*.pdf.*{TMP_SUFFIX}"):
        if not left_by_dead_writer(tmp):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def record_report(
    session: Session,
    *,
    kind: str,
    path: Path,
    sha256: str,
    size: int,
    pages: int,
    with_phi: bool,
    scan_id: int | None = None,
    study_instance_uid: str | None = None,
) -> Report:
    """The row of the report at ``path``: added, or updated when that document was written before."""
    row = session.scalar(select(Report).where(Report.path == str(path)))
    if row is None:
        row = Report(kind=kind, path=str(path))
        session.add(row)
    row.scan_id, row.study_instance_uid = scan_id, study_instance_uid
    row.sha256, row.size_bytes, row.pages, row.with_phi = sha256, size, pages, with_phi
    row.created_at = utcnow()
    session.flush()
    return row
