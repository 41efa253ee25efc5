"""From a scan (or a study) in the database to a PDF in the reports folder with its row: the one
code path that both the daemon's report stage and ``medcli report`` use.

The database is read in a short session, the PDF is rendered and written aside with no transaction
open (SQLite takes its write lock at BEGIN), and the row is committed in a second, short
transaction that also renames the PDF into place (report/output.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import claims, filing
from meddaemon.daemon.bookkeeper import _advance
from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import Scan, ScanEvent, utcnow
from meddaemon.engine.decode import DecodeOptions
from meddaemon.overlays import ViewSource, overlay_jpeg, read_jpeg
from meddaemon.report import images as pictures
from meddaemon.report import output
from meddaemon.report.content import ScanReportData, scan_report_data, study_report_data
from meddaemon.report.fonts import report_fonts
from meddaemon.report.render import Rendered, ScanImages, render_scan, render_study
from meddaemon.report.templates import load_template
from meddaemon.states import ScanState, check_transition

if TYPE_CHECKING:  # highdicom, 0.6 s of each report process's start, only where DICOM goes out
    from meddaemon.dicom.writer import DicomOutputs

T = TypeVar("T")


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
        #: DICOM results out (issue 14): the scan's objects, written with its report, queued with its step
        self.dicom: DicomOutputs | None = None
        if settings.destination:
            from meddaemon.dicom.writer import DicomOutputs

            self.dicom = DicomOutputs(settings)

    # -- rendering (no transaction open) -------------------------------------------------------

    def images(self, data: ScanReportData) -> ScanImages:
        source = self.view_source(data)
        overlays = {
            r.label: overlay_jpeg(r.stored_map, r.overlay_path, source, r.map_size)
            for r in data.heatmaps
            if r.overlay_path
        }
        return ScanImages(self.model_view(data), overlays, pictures.colour_scale_jpeg())

    def view_source(self, data: ScanReportData) -> ViewSource:
        """Where the overlays drawn for this report find the scan as the model saw it."""
        kept = None
        if data.model.version_id is not None and data.heatmaps:
            kept = filing.view_path(self.settings.heatmaps_dir, data.sha256, data.model.version_id)
        return ViewSource(kept, data.stored_path, data.model.contract, self.decode_options)

    def model_view(self, data: ScanReportData) -> bytes | None:
        """The scan as the model saw it: the JPEG the inference stage wrote beside the heatmaps, or,
        without one (heatmaps off, an older result), decoded again from the stored scan."""
        if data.model.version_id is not None and data.heatmaps:
            view = filing.view_path(self.settings.heatmaps_dir, data.sha256, data.model.version_id)
            kept = read_jpeg(view)
            if kept is not None:
                return kept
        return pictures.model_view_jpeg(data.stored_path, data.model.contract, self.decode_options)

    def render_scan(self, data: ScanReportData) -> Rendered:
        return render_scan(data, self.images(data), load_template(data.task), report_fonts(self.settings.reports_font))

    def scan_data(self, scan_id: int, with_phi: bool) -> ScanReportData:
        with self.sessions() as session:
            scan = session.get(Scan, scan_id)
            if scan is None:
                raise LookupError(f"no scan {scan_id}")
            return scan_report_data(
                session, scan, self.settings.task_specs, with_phi, state_dir=self.settings.state_dir
            )

    # -- written and recorded ------------------------------------------------------------------

    def scan_report(self, scan_id: int, with_phi: bool | None = None, out: Path | None = None) -> WrittenReport:
        """Write the report of one scan and record it (on demand: ``medcli report``). The standard
        report (the configured PHI mode, in reports/) also moves a scan still ``inferred`` to
        ``reported``, in the same transaction."""
        phi = self.settings.reports_with_phi if with_phi is None else with_phi
        written = self._scan_report(scan_id, phi, out, fence=None)
        assert written is not None
        return written

    def claimed_scan_report(self, scan_id: int, daemon_id: int | None) -> WrittenReport | None:
        """The standard report of a scan the daemon ``daemon_id`` claimed to report, fenced like its
        results: the row, the ``reported`` step and the PDF in place only if the scan is still
        ``inferred`` and held by that daemon (or nobody). None when it is not (the daemon was
        declared lost and another reported the scan meanwhile): nothing is written then, and the
        PDF already in place stays."""
        return self._scan_report(scan_id, self.settings.reports_with_phi, None, fence=(daemon_id,))

    def _scan_report(
        self, scan_id: int, phi: bool, out: Path | None, fence: tuple[int | None] | None
    ) -> WrittenReport | None:
        data = self.scan_data(scan_id, phi)
        rendered = self.render_scan(data)
        path = (out or output.scan_report_path(self.settings.reports_dir, data.sha256, phi)).absolute()
        written = WrittenReport(
            "scan", path, "", rendered.pages, len(rendered.data), phi, scan_id, data.study_instance_uid
        )
        standard = out is None and phi == self.settings.reports_with_phi
        # DICOM outputs (issue 14) built before the transaction, from the PDF's bytes (its file is
        # put in place only inside the fenced transaction), queued by the ``reported`` step
        prepared = self.dicom.prepare(self.sessions, scan_id, rendered.data) if standard and self.dicom else None

        def then(session: Session) -> bool:
            if fence is not None:
                reported = report_held(session, scan_id, fence[0], path)
            else:
                reported = standard and mark_reported(session, scan_id, path)
            if fence is not None and not reported:
                return False
            if reported and self.dicom and prepared is not None:
                self.dicom.enqueue(session, prepared)
            return True

        return self._write_and_record(written, rendered.data, then)

    def study_report(
        self, study_instance_uid: str, with_phi: bool | None = None, out: Path | None = None
    ) -> WrittenReport:
        phi = self.settings.reports_with_phi if with_phi is None else with_phi
        with self.sessions() as session:
            data = study_report_data(
                session, study_instance_uid, self.settings.task_specs, phi, state_dir=self.settings.state_dir
            )
        rendered = render_study(
            data, [self.images(s) for s in data.scans], load_template, report_fonts(self.settings.reports_font)
        )
        path = (out or output.study_report_path(self.settings.reports_dir, data.study_key, phi)).absolute()
        written = WrittenReport(
            "study", path, "", rendered.pages, len(rendered.data), phi, study_instance_uid=study_instance_uid
        )
        # the study's Encapsulated PDF (issue 14), queued with the study report's row
        standard = out is None and phi == self.settings.reports_with_phi
        dicom = self.dicom if standard else None
        prepared = dicom.prepare_study(self.sessions, study_instance_uid, rendered.data) if dicom else None

        def then(session: Session) -> bool:
            if dicom is not None and prepared is not None:
                dicom.enqueue(session, prepared)
            return True

        recorded = self._write_and_record(written, rendered.data, then)
        assert recorded is not None
        return recorded

    def _write_and_record(
        self, written: WrittenReport, data: bytes, first: Callable[[Session], bool] | None = None
    ) -> WrittenReport | None:
        """Write the PDF aside, then in one transaction: ``first`` (False: give up, nothing written),
        the report's row, the PDF renamed into place, commit (see report/output.py for the order)."""
        aside = output.write_pdf_aside(written.path, data)
        written = replace(written, sha256=aside.sha256)

        def work(session: Session) -> bool:
            if first is not None and not first(session):
                return False
            output.record_report(
                session,
                kind=written.kind,
                path=written.path,
                state_dir=self.settings.state_dir,
                sha256=written.sha256,
                size=written.size_bytes,
                pages=written.pages,
                with_phi=written.with_phi,
                scan_id=written.scan_id,
                study_instance_uid=written.study_instance_uid,
            )
            session.flush()
            aside.put_in_place()
            return True

        try:
            stored = self.commit(work)
        finally:
            aside.discard()
        return written if stored else None

    def commit(self, work: Callable[[Session], T]) -> T:
        """One short transaction, retried past locks held by the daemon's other processes, and once
        more if another writer added the same report's row meanwhile (then it is updated)."""

        def attempt() -> T:
            with transaction(self.sessions) as session:
                return work(session)

        try:
            return with_lock_retry(attempt)
        except IntegrityError:
            return with_lock_retry(attempt)


def report_held(session: Session, scan_id: int, daemon_id: int | None, path: Path) -> bool:
    """``inferred`` -> ``reported`` with the report's path in the scan's history, only if the scan is
    still ``inferred`` and held by ``daemon_id`` or by nobody (the fence of the report stage); False
    if not. One ``UPDATE`` (which locks the row) and one ``INSERT``: the report stage's hot path, where
    reading the scan as an ORM object, locking it and flushing it cost about 2 ms per report."""
    check_transition(ScanState.INFERRED, ScanState.REPORTED)
    stepped = session.execute(
        update(Scan)
        .where(Scan.id == scan_id, Scan.state == ScanState.INFERRED.value, claims.claimable_by(daemon_id))
        .values(state=ScanState.REPORTED.value, claimed_by=None)
        .execution_options(synchronize_session=False)
    )
    if stepped.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.execute(
        insert(ScanEvent).values(
            scan_id=scan_id, state=ScanState.REPORTED.value, detail=f"report {path.name}", at=utcnow()
        )
    )
    return True


def mark_reported(session: Session, scan_id: int, path: Path) -> bool:
    """``inferred`` -> ``reported`` with the report's path in the scan's history; False if the scan
    was not ``inferred`` (already reported by an earlier attempt, or rebuilt on demand later)."""
    scan = session.get(Scan, scan_id, with_for_update=True)
    if scan is None or scan.state != ScanState.INFERRED:
        return False
    _advance(scan, ScanState.REPORTED, f"report {path.name}", utcnow())
    scan.claimed_by = None
    return True
