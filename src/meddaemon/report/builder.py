"""From a scan (or a study) in the database to a PDF in the reports folder with its row: the one
code path that both the daemon's report stage and ``medcli report`` use.

The database is read in a short session, the PDF is rendered and written with no transaction open
(SQLite takes its write lock at BEGIN), and the row is committed in a second, short transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon.bookkeeper import _advance
from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import Scan, utcnow
from meddaemon.engine.decode import DecodeOptions
from meddaemon.report import images as pictures
from meddaemon.report import output
from meddaemon.report.content import ScanReportData, scan_report_data, study_report_data
from meddaemon.report.fonts import report_fonts
from meddaemon.report.render import Rendered, ScanImages, render_scan, render_study
from meddaemon.report.templates import load_template
from meddaemon.states import ScanState


@dataclass(frozen=True)
class WrittenReport:
    kind: str
    path: Path
    sha256: str
    pages: int
    size_bytes: int
    with_phi: bool
    scan_id: int | None = None
    study_instance_uid: str | None = None

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


class ReportBuilder:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.decode_options = DecodeOptions(frame_policy=settings.frame_policy, max_pixels=settings.max_pixels)  # type: ignore[arg-type]

    # -- rendering (no transaction open) -------------------------------------------------------

    def images(self, data: ScanReportData) -> ScanImages:
        overlays = {r.label: pictures.overlay_jpeg(r.overlay_path) for r in data.heatmaps if r.overlay_path}
        return ScanImages(
            pictures.model_view_jpeg(data.stored_path, data.model.contract, self.decode_options),
            overlays,
            pictures.colour_scale_jpeg(),
        )

    def render_scan(self, data: ScanReportData) -> Rendered:
        return render_scan(data, self.images(data), load_template(data.task), report_fonts(self.settings.reports_font))

    def scan_data(self, scan_id: int, with_phi: bool) -> ScanReportData:
        with self.sessions() as session:
            scan = session.get(Scan, scan_id)
            if scan is None:
                raise LookupError(f"no scan {scan_id}")
            return scan_report_data(session, scan, self.settings.task_specs, with_phi)

    # -- written and recorded ------------------------------------------------------------------

    def scan_report(self, scan_id: int, with_phi: bool | None = None, out: Path | None = None) -> WrittenReport:
        """Write the report of one scan and record it. The standard report (the configured PHI mode,
        in reports/) also moves a scan still ``inferred`` to ``reported``, in the same transaction."""
        phi = self.settings.reports_with_phi if with_phi is None else with_phi
        data = self.scan_data(scan_id, phi)
        rendered = self.render_scan(data)
        path = (out or output.scan_report_path(self.settings.reports_dir, data.sha256, phi)).absolute()
        sha = output.write_pdf(path, rendered.data)
        written = WrittenReport(
            "scan", path, sha, rendered.pages, len(rendered.data), phi, scan_id, data.study_instance_uid
        )
        standard = out is None and phi == self.settings.reports_with_phi
        self._record(written, (lambda session: mark_reported(session, scan_id, path)) if standard else None)
        return written

    def study_report(
        self, study_instance_uid: str, with_phi: bool | None = None, out: Path | None = None
    ) -> WrittenReport:
        phi = self.settings.reports_with_phi if with_phi is None else with_phi
        with self.sessions() as session:
            data = study_report_data(session, study_instance_uid, self.settings.task_specs, phi)
        rendered = render_study(
            data, [self.images(s) for s in data.scans], load_template, report_fonts(self.settings.reports_font)
        )
        path = (out or output.study_report_path(self.settings.reports_dir, data.study_key, phi)).absolute()
        sha = output.write_pdf(path, rendered.data)
        written = WrittenReport(
            "study", path, sha, rendered.pages, len(rendered.data), phi, study_instance_uid=study_instance_uid
        )
        self._record(written)
        return written

    def _record(self, written: WrittenReport, then: Callable[[Session], object] | None = None) -> None:
        def work(session: Session) -> None:
            output.record_report(
                session,
                kind=written.kind,
                path=written.path,
                sha256=written.sha256,
                size=written.size_bytes,
                pages=written.pages,
                with_phi=written.with_phi,
                scan_id=written.scan_id,
                study_instance_uid=written.study_instance_uid,
            )
            if then is not None:
                then(session)

        self.commit(work)

    def commit(self, work: Callable[[Session], None]) -> None:
        """One short transaction, retried past locks held by the daemon's other processes, and once
        more if another writer added the same report's row meanwhile (then it is updated)."""

        def attempt() -> None:
            with transaction(self.sessions) as session:
                work(session)

        try:
            with_lock_retry(attempt)
        except IntegrityError:
            with_lock_retry(attempt)


def mark_reported(session: Session, scan_id: int, path: Path) -> bool:
    """``inferred`` -> ``reported`` with the report's path in the scan's history; False if the scan
    was not ``inferred`` (already reported by an earlier attempt, or rebuilt on demand later)."""
    scan = session.get(Scan, scan_id, with_for_update=True)
    if scan is None or scan.state != ScanState.INFERRED:
        return False
    _advance(scan, ScanState.REPORTED, f"report {path.name}", utcnow())
    scan.claimed_by = None
    return True
