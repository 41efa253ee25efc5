"""From a scan (or a study) in the database to a PDF in the reports folder with its row: the one
code path that both the daemon's report stage and ``medcli report`` use.

The database is read in a short session, the PDF is rendered and written aside with no transaction
open (SQLite takes its write lock at BEGIN), and the row is committed in a second, short
transaction that also renames the PDF into place (report/output.py); the report stage records the
reports of a round, up to 16 scans, in one such transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import claims, filing
from meddaemon.daemon.bookkeeper import advance
from meddaemon.db.bulk import insert_rows
from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import Scan, ScanEvent, utcnow
from meddaemon.engine.heatmap_grid import map_is_flat
from meddaemon.overlays import ViewSource, overlay_jpeg, read_jpeg
from meddaemon.report import images as pictures
from meddaemon.report import output
from meddaemon.report.content import ScanReportData, scans_report_data, study_report_data
from meddaemon.report.fonts import report_fonts
from meddaemon.report.output import WrittenReport
from meddaemon.report.render import Rendered, ScanImages, render_scan, render_study
from meddaemon.report.templates import load_template
from meddaemon.states import ScanState, check_transition

if TYPE_CHECKING:  # highdicom, 0.6 s of each report process's start, only where DICOM goes out
    from meddaemon.dicom.writer import DicomOutputs, PreparedOutputs

T = TypeVar("T")


#: what became of each scan of a round (``ReportBuilder.claimed_scan_reports``)
ReportOutcome = WrittenReport | None | Exception


@dataclass
class _WrittenAside:
    """A scan's report rendered and written under its temporary name; its row not recorded yet."""

    report: WrittenReport
    aside: output.PdfAside
    #: its DICOM objects (issue 14), queued with its ``reported`` step
    prepared: PreparedOutputs | None


class ReportBuilder:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], should_stop: Callable[[], bool] = lambda: False
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        #: a stop asked for ends a wait for a lock held by another process (``commit``)
        self.should_stop = should_stop
        self.decode_options = settings.decode_options
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
        flat = {r.label for r in data.heatmaps if r.stored_map is not None and map_is_flat(r.stored_map)}
        return ScanImages(self.model_view(data), overlays, pictures.colour_scale_jpeg(), flat)

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
        data = self.scans_data([scan_id], with_phi)[scan_id]
        if isinstance(data, LookupError):
            raise data
        return data

    def scans_data(self, scan_ids: Sequence[int], with_phi: bool) -> dict[int, ScanReportData | LookupError]:
        """Each scan's report data, or why there is none (no such scan, no result to report)."""
        with self.sessions() as session:
            scans = session.scalars(select(Scan).where(Scan.id.in_(scan_ids))).all()
            found = scans_report_data(
                session,
                scans,
                self.settings.task_specs,
                with_phi,
                state_dir=self.settings.state_dir,
                frame_policy=self.settings.frame_policy,
            )
        return {scan_id: found.get(scan_id) or LookupError(f"no scan {scan_id}") for scan_id in scan_ids}

    # -- written and recorded ------------------------------------------------------------------

    def scan_report(self, scan_id: int, with_phi: bool | None = None, out: Path | None = None) -> WrittenReport:
        """Write the report of one scan and record it (on demand: ``medcli report``). The standard
        report (the configured PHI mode, in reports/) also moves a scan still ``inferred`` to
        ``reported``, in the same transaction."""
        phi = self.settings.reports_with_phi if with_phi is None else with_phi
        data = self.scan_data(scan_id, phi)
        rendered = self.render_scan(data)
        path = (out or output.scan_report_path(self.settings.reports_dir, data.sha256, phi)).absolute()
        written = WrittenReport(
            "scan", path, "", rendered.pages, len(rendered.data), phi, scan_id, data.study_instance_uid
        )
        standard = out is None and phi == self.settings.reports_with_phi
        # DICOM outputs (issue 14) built before the transaction, from the PDF's bytes (its file is
        # put in place only inside the transaction), queued by the ``reported`` step
        prepared = self.dicom.prepare(self.sessions, scan_id, rendered.data) if standard and self.dicom else None

        def then(session: Session) -> bool:
            if standard and mark_reported(session, scan_id, path) and self.dicom and prepared is not None:
                self.dicom.enqueue(session, prepared)
            return True

        recorded = self._write_and_record(written, rendered.data, then)
        assert recorded is not None
        return recorded

    def claimed_scan_reports(self, scan_ids: Sequence[int], daemon_id: int | None) -> dict[int, ReportOutcome]:
        """The standard reports of scans the daemon ``daemon_id`` claimed to report (a round of the
        report stage), fenced like its results: a scan's row, its ``reported`` step and its PDF in
        place only if the scan is still ``inferred`` and held by that daemon (or nobody).

        Their rows are read together, each is rendered and written aside on its own, then all are
        recorded in one transaction (a transaction of its own cost a report 4.7 ms of CPU, recorded
        with its round's 0.55; benchmarks/README.md). Each scan's outcome: its report; None when it
        is no longer the daemon's (declared lost, and another reported it meanwhile: nothing is
        written, the PDF already in place stays); or the exception that stopped it (one that stops
        the reading or the transaction stops every scan's)."""
        phi = self.settings.reports_with_phi
        outcomes: dict[int, ReportOutcome] = {}
        written: dict[int, _WrittenAside] = {}
        try:
            found: Mapping[int, ScanReportData | Exception] = self.scans_data(scan_ids, phi)
        except Exception as exc:
            found = dict.fromkeys(scan_ids, exc)
        try:
            for scan_id, data in found.items():
                if isinstance(data, Exception):
                    outcomes[scan_id] = data
                    continue
                try:
                    written[scan_id] = self._written_aside(data, phi)
                except Exception as exc:
                    outcomes[scan_id] = exc
            if written:
                try:
                    held = self.commit(lambda session: self._record_held(session, written, daemon_id))
                except Exception as exc:
                    outcomes.update(dict.fromkeys(written, exc))
                else:
                    outcomes.update({scan_id: w.report if scan_id in held else None for scan_id, w in written.items()})
        finally:
            for each in written.values():
                each.aside.discard()
        return {scan_id: outcomes[scan_id] for scan_id in scan_ids}

    def _written_aside(self, data: ScanReportData, phi: bool) -> _WrittenAside:
        scan_id = data.scan_id
        rendered = self.render_scan(data)
        path = output.scan_report_path(self.settings.reports_dir, data.sha256, phi).absolute()
        # DICOM outputs (issue 14) built before the transaction, from the PDF's bytes (its file is
        # put in place only inside the fenced transaction), queued by the ``reported`` step
        prepared = self.dicom.prepare(self.sessions, scan_id, rendered.data) if self.dicom else None
        aside = output.write_pdf_aside(path, rendered.data)
        report = WrittenReport(
            "scan", path, aside.sha256, rendered.pages, len(rendered.data), phi, scan_id, data.study_instance_uid
        )
        return _WrittenAside(report, aside, prepared)

    def _record_held(self, session: Session, written: Mapping[int, _WrittenAside], daemon_id: int | None) -> set[int]:
        """The fence, then for the scans it let through: their DICOM objects queued, their rows,
        their PDFs renamed into place (report/output.py for the order); returns those scans."""
        held = reports_held(session, {scan_id: w.report.path for scan_id, w in written.items()}, daemon_id)
        kept = [written[scan_id] for scan_id in held]
        if self.dicom is not None:
            for each in kept:
                if each.prepared is not None:
                    self.dicom.enqueue(session, each.prepared)
        output.record_reports(session, [each.report for each in kept], self.settings.state_dir)
        session.flush()
        for each in kept:
            each.aside.put_in_place()
        return set(held)

    def study_report(
        self, study_instance_uid: str, with_phi: bool | None = None, out: Path | None = None
    ) -> WrittenReport:
        phi = self.settings.reports_with_phi if with_phi is None else with_phi
        as_of = utcnow()
        with self.sessions() as session:
            data = study_report_data(
                session,
                study_instance_uid,
                self.settings.task_specs,
                phi,
                state_dir=self.settings.state_dir,
                frame_policy=self.settings.frame_policy,
            )
        rendered = render_study(
            data, [self.images(s) for s in data.scans], load_template, report_fonts(self.settings.reports_font)
        )
        path = (out or output.study_report_path(self.settings.reports_dir, data.study_key, phi)).absolute()
        written = WrittenReport(
            "study",
            path,
            "",
            rendered.pages,
            len(rendered.data),
            phi,
            study_instance_uid=study_instance_uid,
            as_of=as_of,
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
            output.record_reports(session, [written], self.settings.state_dir)
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
            return with_lock_retry(attempt, should_stop=self.should_stop)
        except IntegrityError:
            return with_lock_retry(attempt, should_stop=self.should_stop)


def reports_held(session: Session, paths: Mapping[int, Path], daemon_id: int | None) -> list[int]:
    """``inferred`` -> ``reported``, with its report's name (``paths``) in its history, for each of
    these scans still ``inferred`` and held by ``daemon_id`` or by nobody (the fence of the report
    stage); returns those scans. Their rows are locked in id order (no lock cycles between daemons)
    until the transaction ends. Core statements for a round's scans at once: reading each scan as
    an ORM object, locking it and flushing it cost about 2 ms a report, a statement of its own each
    about 1."""
    check_transition(ScanState.INFERRED, ScanState.REPORTED)
    if not paths:
        return []
    held = list(
        session.scalars(
            select(Scan.id)
            .where(Scan.id.in_(sorted(paths)), Scan.state == ScanState.INFERRED.value, claims.claimable_by(daemon_id))
            .order_by(Scan.id)
            .with_for_update()
        )
    )
    if not held:
        return []
    session.execute(
        update(Scan)
        .where(Scan.id.in_(held))
        .values(state=ScanState.REPORTED.value, claimed_by=None)
        .execution_options(synchronize_session=False)
    )
    at = utcnow()
    insert_rows(
        session,
        ScanEvent,
        [
            {"scan_id": scan_id, "state": ScanState.REPORTED.value, "detail": f"report {paths[scan_id].name}", "at": at}
            for scan_id in held
        ],
    )
    return held


def mark_reported(session: Session, scan_id: int, path: Path) -> bool:
    """``inferred`` -> ``reported`` with the report's path in the scan's history; False if the scan
    was not ``inferred`` (already reported by an earlier attempt, or rebuilt on demand later)."""
    scan = session.get(Scan, scan_id, with_for_update=True)
    if scan is None or scan.state != ScanState.INFERRED:
        return False
    advance(scan, ScanState.REPORTED, f"report {path.name}", utcnow())
    scan.claimed_by = None
    return True
