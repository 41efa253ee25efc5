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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from meddaemon.db.bulk import insert_rows
from meddaemon.db.models import Report, utcnow
from meddaemon.files import fsync_dir, make_folders, temporary_path, write_atomically
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
    make_folders(path.parent, durable=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: the log must
            exc.filename = str(path)
        raise
    return PdfAside(tmp, path, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class WrittenReport:
    """A report's document at ``path``: its bytes' SHA-256, size and pages, as its row records them."""

    kind: str
    path: Path
    sha256: str
    pages: int
    size_bytes: int
    with_phi: bool
    scan_id: int | None = None
    study_instance_uid: str | None = None
    #: when the data it shows were read, its row's ``created_at`` (a study report: before it is
    #: rendered, so that a scan of the study changed meanwhile makes it stale); None: when recorded
    as_of: datetime | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "pages": self.pages,
            "size_bytes": self.size_bytes,
            "with_phi": self.with_phi,
            "scan_id": self.scan_id,
        }


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
) -> None:
    """The row of the report at ``path`` (``record_reports``)."""
    report = WrittenReport(kind, path, sha256, pages, size, with_phi, scan_id, study_instance_uid)
    record_reports(session, [report], state_dir)


def record_reports(session: Session, records: Sequence[WrittenReport], state_dir: Path) -> None:
    """The rows of these reports: added, or updated where that document was written before (its row
    maybe older, with the path absolute). Stored relative to ``state_dir`` when under it.

    One SELECT and one INSERT however many reports (the report stage records a round's at once);
    an UPDATE for each report written before. Of two records of the same document, the later wins."""
    if not records:
        return
    spellings = {record.path: stored_spellings(record.path, state_dir) for record in records}
    wanted = sorted({spelling for both in spellings.values() for spelling in both})
    known = dict(session.execute(select(Report.path, Report.id).where(Report.path.in_(wanted))).all())
    now = utcnow()
    updates: dict[int, dict[str, object]] = {}
    inserts: dict[str, dict[str, object]] = {}
    for record in records:
        values: dict[str, object] = {
            "scan_id": record.scan_id,
            "study_instance_uid": record.study_instance_uid,
            "sha256": record.sha256,
            "size_bytes": record.size_bytes,
            "pages": record.pages,
            "with_phi": record.with_phi,
            "created_at": record.as_of or now,
        }
        row_id = next((known[spelling] for spelling in spellings[record.path] if spelling in known), None)
        if row_id is not None:
            updates[row_id] = values
        else:
            name = stored_name(record.path, state_dir)
            inserts[name] = {"kind": record.kind, "path": name, **values}
    for row_id, values in updates.items():
        session.execute(update(Report).where(Report.id == row_id).values(**values))
    insert_rows(session, Report, list(inserts.values()))
