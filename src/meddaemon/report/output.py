"""Putting a report on disk and in the database: a temporary name, fsync, then the row and the
rename in one transaction.

The PDF is written aside (``write_pdf_aside``); the transaction records its row (and, for the daemon,
checks that the scan is still its to report: the fence), renames the PDF into place as its last
step, and commits. The rename makes the PDF appear whole or not at all, and a writer whose fence
failed (a daemon declared lost that woke up) discards its PDF without touching the one in place.
A crash between the rename and the commit leaves a complete PDF without its row, which the next
attempt overwrites with the same name; the row is keyed by that path, so it is never doubled.
The scan's row stays locked from the fence to the commit, so no other daemon can report it
meanwhile; what remains is a writer frozen exactly between its last statement and the rename for
longer than the server's idle-in-transaction timeout: the file system cannot be in the transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.db.models import Report, utcnow
from meddaemon.files import fsync_dir, temporary_path, write_atomically
from meddaemon.stored_paths import stored_name, stored_spellings


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


@dataclass
class PdfAside:
    """A PDF written whole and fsynced under a temporary name beside ``path``, not yet in place."""

    tmp: Path
    path: Path
    sha256: str
    placed: bool = False

    def put_in_place(self) -> None:
        """Rename it to ``path`` (once: a transaction retried after its rename does not rename again)."""
        if self.placed:
            return
        os.replace(self.tmp, self.path)
        self.placed = True
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        if not self.placed:
            with contextlib.suppress(OSError):
                self.tmp.unlink()


def write_pdf_aside(path: Path, data: bytes) -> PdfAside:
    """Write ``data`` durably to the temporary name of ``path``; ``put_in_place`` publishes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return PdfAside(tmp, path, hashlib.sha256(data).hexdigest())


def record_report(
    session: Session,
    *,
    kind: str,
    path: Path,
    state_dir: Path,
    sha256: str,
    size: int,
    pages: int,
    with_phi: bool,
    scan_id: int | None = None,
    study_instance_uid: str | None = None,
) -> Report:
    """The row of the report at ``path``: added, or updated when that document was written before
    (its row maybe older, with the path absolute). Stored relative to ``state_dir`` when under it."""
    row = session.scalar(select(Report).where(Report.path.in_(stored_spellings(path, state_dir))))
    if row is None:
        row = Report(kind=kind, path=stored_name(path, state_dir))
        session.add(row)
    row.scan_id, row.study_instance_uid = scan_id, study_instance_uid
    row.sha256, row.size_bytes, row.pages, row.with_phi = sha256, size, pages, with_phi
    row.created_at = utcnow()
    session.flush()
    return row
