"""The report stage: ``inferred`` scans get their PDF and become ``reported``, off the inference path.

It runs in a process of its own (``ReporterProcess``), at a lower CPU priority (``reports_nice``):
reportlab is pure Python, so in a thread it would hold the GIL against the main loop, and in the
main loop a slow report would stall a batch. On a busy machine it yields the CPU to inference and
catches up when the inbox is quiet. ``meddaemon start --once`` writes the reports in its own
process after the inbox is drained (there are no batches left to stall then).

Crash safety: each PDF is written to a temporary name and fsynced; its row, the ``inferred ->
reported`` step and the rename into place are done in one transaction, fenced by the claim (a
daemon declared lost that wakes up writes no row and leaves the PDF in place alone). A crash before
the commit leaves the scan ``inferred`` (the report is written again, to the same name); the
temporaries that killed writers left (of reports, heatmaps, DICOM outputs, models) are removed at
start. A full or read-only disk (any ``OSError``) leaves no file behind and the scan ``inferred``,
retried after ``RETRY_SECONDS``.

Study reports: a study with two or more reported scans gets (again) a study report whenever one of
its scan reports is newer than its study report, so a crash between the two is repaired later. A
study received over DICOM waits until it is complete (``dicom.completeness``: no instance of any of
its series arrived for ``series_quiet_seconds``), so that it is reported once, whole; it is looked
at again when its quiet time has passed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, true, update
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import claims
from meddaemon.daemon.lease import connection_limits
from meddaemon.daemon.outage import OutageGuard, is_outage
from meddaemon.daemon.stages import Cadence, ChildProcessStage
from meddaemon.db.engine import create_db_engine, is_lock_error, session_factory, transaction, with_lock_retry
from meddaemon.db.models import Report, Scan
from meddaemon.dicom.completeness import studies_still_arriving
from meddaemon.files import remove_stale_temporaries
from meddaemon.processes import child_runs, leave_stopping_to_the_parent, start_child, stop_child
from meddaemon.states import ScanState
from meddaemon.stored_paths import stored_spellings

if TYPE_CHECKING:
    from meddaemon.report.builder import ReportBuilder, ReportOutcome

log = logging.getLogger("meddaemon.reporter")

#: A report that failed on a disk error (full, read-only) is tried again after this long.
RETRY_SECONDS = 30.0
#: A report that failed otherwise (a bug, an unreadable overlay) waits longer: the log says why.
ERROR_RETRY_SECONDS = 300.0
#: Scans claimed per round; between rounds a stop request is honoured.
CLAIM = 16
POLL_SECONDS = 0.5
#: how often the studies with a scan failed after their report are looked for (a join over the failed scans)
LATE_FAILURE_SECONDS = 30.0


@dataclass
class ReportStats:
    scans: int = 0
    studies: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)


class Reporter:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        daemon_id: int | None = None,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        #: the daemon this reporter works for: it claims scans in that daemon's name
        self.daemon_id = daemon_id
        #: (k, n): one of n reporters of the same daemon, which reports the scans whose id is k modulo
        #: n (claims in the daemon's name cannot keep its own reporters apart); only k = 0 does studies
        self.share = share
        self.stats = ReportStats()
        #: scan id -> monotonic time before which it is not tried again
        self.retry_after: dict[int, float] = {}
        #: scans whose report could not be written, each logged once while the fault lasts (a full or
        #: read-only reports folder logged every pending scan again every 30 s, with no end)
        self.write_failed: set[int] = set()
        self.studies_checked = False
        #: when to look for studies with a scan that failed after their report (``_with_late_failures``)
        self.late_failure_looks = Cadence(LATE_FAILURE_SECONDS)
        #: study UID -> monotonic time to look again: studies whose instances are still arriving,
        #: and those whose report failed
        self.studies_arriving: dict[str, float] = {}
        #: studies whose report failed and is not written since
        self.studies_failed: set[str] = set()
        self.started = False
        #: studies of scans reported in a round an outage cut short: their study reports are due
        self.studies_owed: set[str] = set()
        #: whether the process is asked to stop (``serve``, ``drain``): a wait for a lock held by another
        #: process then ends (the round's transaction never committed, so nothing is half-done)
        self.should_stop: Callable[[], bool] = lambda: False
        #: ``--once``'s drain: a failed report is left to a later run, not retried by this reporter
        self.draining = False

    @functools.cached_property
    def builder(self) -> ReportBuilder:
        """Built with the first report: reportlab and the decoders are imported only by a reporter
        that has something to report (``--once`` on an empty inbox does not)."""
        from meddaemon.report.builder import ReportBuilder

        return ReportBuilder(self.settings, self.sessions, should_stop=lambda: self.should_stop())

    def start(self) -> None:
        """Once per reporter: remove the temporaries that writers of this host, killed while writing,
        left in the state folders written whole (reports; heatmaps, overlays and views, written by the
        inference stage; DICOM outputs; models). Here, because the reporter runs off the inference
        path: listing a folder of every scan's heatmaps takes a while. One of several reporters
        (``share``, ``--once``'s processes) leaves it to the reporter that follows them (``drain``)."""
        if self.started:
            return
        self.started = True
        if self.share is not None:
            return
        for what, folder in (
            ("report", self.settings.reports_dir),
            ("heatmap", self.settings.heatmaps_dir),
            ("DICOM output", self.settings.dicom_dir),
            ("model", self.settings.models_dir),
        ):
            removed = remove_stale_temporaries(folder)
            if removed:
                log.info("removed %d unfinished %s files left by an earlier run", len(removed), what)

    def round(self) -> int:
        """Report up to ``CLAIM`` scans, then the studies that need it; returns the reports attempted."""
        now = time.monotonic()
        self.retry_after = {k: v for k, v in self.retry_after.items() if v > now}
        ids = self._claim(set(self.retry_after))
        studies = self._report_scans(ids) | self.studies_owed
        self.studies_owed = set()
        studies |= self._quiet_now(now)
        if self.studies_checked and self.late_failure_looks.due(now):
            studies |= self._with_late_failures()
            self.late_failure_looks.done(now)
        attempted = len(ids)
        if self.share is not None and self.share[0] != 0:
            return attempted
        if studies or not self.studies_checked:
            # every study at the first round (to repair a crash between a scan and its study
            # report), then only the studies of the scans just reported or gone quiet
            stale = self._stale_studies(studies if self.studies_checked else None)
            arriving = self._still_arriving(stale)
            for uid in stale:
                if uid in arriving:
                    self.studies_arriving[uid] = now + arriving[uid]
                    continue
                attempted += 1
                self._report_study(uid)
            self.studies_checked = True
        return attempted

    def _with_late_failures(self) -> set[str]:
        """The studies whose study report is older than one of their failed scans: a study report
        names its images without a result, and one that failed after the report's data was read (an
        image arriving late that the model cannot take; one failing at inference after waiting) was
        never added while the daemon ran."""
        phi = self.settings.reports_with_phi

        def read() -> set[str]:
            with self.sessions() as session:
                late = session.execute(
                    select(Scan.study_instance_uid, Report.path)
                    .join(Report, Report.study_instance_uid == Scan.study_instance_uid)
                    .where(Report.kind == "study", Report.with_phi == phi, Scan.state == ScanState.FAILED)
                    .where(Scan.updated_at > Report.created_at)
                    .distinct()
                ).all()
            return {uid for uid, path in late if uid and self._own_study_report(uid, path)}

        return with_lock_retry(read, should_stop=self.should_stop)

    def _own_study_report(self, uid: str, path: str) -> bool:
        """Whether the study report recorded at ``path`` is the one this stage keeps for the study:
        one written elsewhere by hand (``medcli report study UID --out FILE``) is never written
        again, and, older than a scan failed later, made the study look stale at every look."""
        from meddaemon.report.content import study_key
        from meddaemon.report.output import study_report_path

        phi = self.settings.reports_with_phi
        own = study_report_path(self.settings.reports_dir, study_key(uid), phi)
        return path in stored_spellings(own, self.settings.state_dir)

    def _quiet_now(self, now: float) -> set[str]:
        """The studies that were still arriving and whose quiet time has passed since."""
        due = {uid for uid, at in self.studies_arriving.items() if at <= now}
        for uid in due:
            del self.studies_arriving[uid]
        return due

    def _still_arriving(self, studies: list[str]) -> dict[str, float]:
        """Of these studies, those received over DICOM and not complete yet: UID -> seconds to wait."""
        if not studies:
            return {}

        def read() -> dict[str, float]:
            with self.sessions() as session:
                return studies_still_arriving(session, studies, self.settings.series_quiet_seconds)

        arriving = with_lock_retry(read, should_stop=self.should_stop)
        for uid, wait in arriving.items():
            if uid not in self.studies_arriving:
                log.info("a study report waits: its series are still arriving (%.0f s more at least)", wait)
        return arriving

    def drain(self, should_stop: Any = lambda: False) -> tuple[int, int]:
        """Report until nothing is left but scans waiting to be retried (``--once``); an outage is
        waited out as in ``serve``. Returns what is left unreported (``unfinished``)."""
        self.start()
        self.should_stop = should_stop
        self.draining = True
        outage = OutageGuard(self.settings.db_outage_seconds, logger=log)
        try:
            while not should_stop() and outage.run(self.round, should_stop):
                pass
        except Exception as exc:
            if not self._stopped_while_waiting(exc):
                raise
        return self.unfinished()

    def serve(self, stop: threading.Event | EventType) -> None:
        """Report until ``stop`` is set: the loop of the report process. A database outage is
        waited out as the daemon waits it out (``daemon.outage``), for up to ``db_outage_seconds``."""
        self.start()
        self.should_stop = stop.is_set
        outage = OutageGuard(self.settings.db_outage_seconds, sleep=stop.wait, logger=log)
        while not stop.is_set():
            try:
                reported = outage.run(self.round, stop.is_set)
            except Exception as exc:
                if self._stopped_while_waiting(exc):
                    return
                raise
            if not reported:
                stop.wait(POLL_SECONDS)

    def _stopped_while_waiting(self, exc: BaseException) -> bool:
        """Whether ``exc`` ended a wait for the database (away, or locked by another process) that a
        stop cut short: nothing of the round was committed, so nothing is half-done."""
        return self.should_stop() and (is_outage(exc) or is_lock_error(exc))

    # -- one report ----------------------------------------------------------------------------

    def _report_scans(self, scan_ids: list[int]) -> set[str]:
        """Report these scans (recorded together: ``ReportBuilder.claimed_scan_reports``); returns the
        Study Instance UIDs of those reported that have one."""
        if not scan_ids:
            return set()
        outcomes = self.builder.claimed_scan_reports(scan_ids, self.daemon_id)
        studies: set[str] = set()
        lost: Exception | None = None
        for scan_id, outcome in outcomes.items():
            if isinstance(outcome, Exception) and (is_outage(outcome) or self._stopped_while_waiting(outcome)):
                lost = outcome
            elif uid := self._reported(scan_id, outcome):
                studies.add(uid)
        if lost is not None:
            # the database dropped the connection (or a stop ended a wait for a lock): not the report's
            # fault, to be retried in 5 minutes with its scans held, but an outage, waited out and the
            # round run again once it answers
            self.studies_owed |= studies
            raise lost
        return studies

    def _reported(self, scan_id: int, outcome: ReportOutcome) -> str | None:
        """Log what became of a scan's report (a failed one is retried later); its Study Instance
        UID when it was reported and has one."""
        from meddaemon.report.content import NoResult

        if isinstance(outcome, NoResult):
            log.error("scan %d: %s; not reported%s", scan_id, outcome, self._again(ERROR_RETRY_SECONDS, ", "))
            self._retry(scan_id, ERROR_RETRY_SECONDS)
        elif isinstance(outcome, OSError):
            self.stats.errors += 1
            # the path is the report's (named by the scan's hash) or its folder's: the one to fix
            where = f": {outcome.filename}" if outcome.filename else ""
            log.log(
                logging.DEBUG if scan_id in self.write_failed else logging.ERROR,
                "scan %d: could not write its report (%s%s); it stays inferred and is %s",
                scan_id,
                outcome.strerror or type(outcome).__name__,
                where,
                self._again(RETRY_SECONDS),
            )
            self.write_failed.add(scan_id)
            self._retry(scan_id, RETRY_SECONDS)
        elif isinstance(outcome, Exception):
            self.stats.errors += 1
            log.error(
                "scan %d: building its report failed (%s); %s",
                scan_id,
                _where(outcome),
                self._again(ERROR_RETRY_SECONDS),
            )
            self._retry(scan_id, ERROR_RETRY_SECONDS)
        elif outcome is None:
            log.warning("scan %d: no longer this daemon's to report (taken over); its report discarded", scan_id)
        else:
            self.stats.scans += 1
            after = " (after failing to be written)" if scan_id in self.write_failed else ""
            self.write_failed.discard(scan_id)
            log.info(
                "scan %d: report written%s, %d page(s), sha256 %s", scan_id, after, outcome.pages, outcome.sha256[:12]
            )
            return outcome.study_instance_uid
        return None

    def _report_study(self, uid: str) -> None:
        try:
            written = self.builder.study_report(uid)
        except Exception as exc:
            if is_outage(exc) or self._stopped_while_waiting(exc):
                raise
            self._study_failed(uid, exc)
        else:
            self.stats.studies += 1
            self.studies_failed.discard(uid)
            log.info("study report %s, %d page(s)", written.path.name, written.pages)

    def _study_failed(self, uid: str, exc: Exception) -> None:
        """Logged, and looked at again after ``RETRY_SECONDS`` (a disk error) or ``ERROR_RETRY_SECONDS``:
        nothing else brings a study back before another of its scans is reported."""
        self.stats.errors += 1
        self.studies_failed.add(uid)
        seconds = RETRY_SECONDS if isinstance(exc, OSError) else ERROR_RETRY_SECONDS
        self.studies_arriving[uid] = time.monotonic() + seconds
        if isinstance(exc, OSError):
            why = exc.strerror or type(exc).__name__
            log.error("a study report could not be written (%s); %s", why, self._again(seconds))
        else:
            log.error("building a study report failed (%s); %s", _where(exc), self._again(seconds))

    def _retry(self, scan_id: int, seconds: float) -> None:
        self.retry_after[scan_id] = time.monotonic() + seconds

    def _again(self, seconds: float, before: str = "") -> str:
        """When a failed report is tried again: by this reporter, or (``--once``) by a later run."""
        if self.draining:
            return f"{before}left to the next run (the daemon, or --once again)"
        return f"{before}retried in {seconds:.0f} s"

    def unfinished(self) -> tuple[int, int]:
        """The scans and the studies whose report failed and is not yet written (``--once``: left
        to a later run, each logged)."""
        return len(self.retry_after), len(self.studies_failed)

    # -- the database --------------------------------------------------------------------------

    def _claim(self, exclude: set[int]) -> list[int]:
        """Up to ``CLAIM`` inferred scans no other daemon is reporting, claimed for this one."""

        def claim() -> list[int]:
            with transaction(self.sessions) as session:
                query = (
                    select(Scan.id)
                    .where(Scan.state == ScanState.INFERRED, Scan.pending_move_from.is_(None))
                    .where(claims.claimable_by(self.daemon_id))
                    .where(Scan.id % self.share[1] == self.share[0] if self.share is not None else true())
                    .order_by(Scan.id)
                    .limit(CLAIM + len(exclude))
                    .with_for_update(of=Scan, skip_locked=True)
                )
                ids = [i for i in session.scalars(query) if i not in exclude][:CLAIM]
                if ids and self.daemon_id is not None:
                    session.execute(update(Scan).where(Scan.id.in_(ids)).values(claimed_by=self.daemon_id))
                return ids

        return with_lock_retry(claim, should_stop=self.should_stop)

    def _stale_studies(self, among: set[str] | None) -> list[str]:
        """Studies (all, or those ``among``) of 2+ reported scans whose study report is missing or
        older than one of their scan reports or failed scans."""
        phi = self.settings.reports_with_phi

        def read() -> list[str]:
            with self.sessions() as session:
                scans = session.execute(
                    select(Scan.study_instance_uid, func.max(Report.created_at))
                    .join(Report, Report.scan_id == Scan.id)
                    .where(Report.kind == "scan", Report.with_phi == phi, Scan.study_instance_uid.is_not(None))
                    .where(Scan.study_instance_uid.in_(sorted(among)) if among is not None else true())
                    .group_by(Scan.study_instance_uid)
                    .having(func.count(func.distinct(Scan.id)) >= 2)
                ).all()
                if not scans:
                    return []
                uids = [uid for uid, _ in scans]
                studies = {
                    uid: at
                    for uid, path, at in session.execute(
                        select(Report.study_instance_uid, Report.path, Report.created_at)
                        .where(Report.kind == "study", Report.with_phi == phi)
                        .where(Report.study_instance_uid.in_(uids))
                    ).all()
                    if self._own_study_report(uid, path)
                }
                failed = dict(
                    session.execute(
                        select(Scan.study_instance_uid, func.max(Scan.updated_at))
                        .where(Scan.state == ScanState.FAILED, Scan.study_instance_uid.in_(uids))
                        .group_by(Scan.study_instance_uid)
                    ).all()
                )
            latest = {uid: max(_utc(at), _utc(failed.get(uid) or at)) for uid, at in scans if uid}
            return [uid for uid, at in latest.items() if uid not in studies or _utc(studies[uid]) < at]

        return with_lock_retry(read, should_stop=self.should_stop)


def _where(exc: BaseException) -> str:
    """The exception's type and where it was raised, without its message: a reportlab message can
    quote the text of a cell, and with PHI in the report that text may be a patient's name."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{place}"


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- the --once drain ------------------------------------------------------------------------------


def drain(
    settings: Settings, sessions: sessionmaker[Session], daemon_id: int | None, should_stop: Any = lambda: False
) -> tuple[int, int]:
    """Write every report ``--once`` leaves after its drain: in ``report_workers`` processes (one per
    core by default) when there are several rounds' worth, as the cores are idle then; a few in this
    process (starting a process costs more than a few reports). Returns the scans and studies left
    unreported (their reports failed, each logged), for a later run."""
    with sessions() as session:
        waiting = session.scalar(select(func.count()).where(Scan.state == ScanState.INFERRED)) or 0
    workers = min(settings.report_workers or os.cpu_count() or 1, waiting // CLAIM)
    if workers < 2:
        return Reporter(settings, sessions, daemon_id).drain(should_stop)
    context = multiprocessing.get_context("forkserver")
    processes = [
        context.Process(target=_drain_main, args=(settings, daemon_id, (k, workers)), name=f"meddaemon-report-{k}")
        for k in range(workers)
    ]
    for process in processes:
        process.start()
    log.info("writing %d reports in %d processes", waiting, workers)
    for process in processes:
        while process.is_alive():
            process.join(0.2)
            if should_stop():
                process.terminate()  # a killed writer leaves at most a temporary, removed at the next start
        if process.exitcode not in (0, -signal.SIGTERM):
            log.error("report process %s exited with code %s", process.name, process.exitcode)
    # what a process could not finish (it died, or a scan failed): here, as without processes
    return Reporter(settings, sessions, daemon_id).drain(should_stop)


def _drain_main(settings: Settings, daemon_id: int | None, share: tuple[int, int]) -> None:
    leave_stopping_to_the_parent()  # the daemon stops its report processes itself
    from meddaemon.logs import setup_logging

    setup_logging(settings.log_level)
    # one torch thread, as in the decoding workers, should a model view be decoded again; set before
    # torch is imported, which most reports never need (the view is kept beside the heatmaps)
    os.environ["OMP_NUM_THREADS"] = "1"
    engine = create_db_engine(settings.db_url, settings.busy_timeout, connection_limits(settings))
    try:
        Reporter(settings, session_factory(engine), daemon_id, share).drain()
    finally:
        engine.dispose()


# -- the process ---------------------------------------------------------------------------------


class ReporterProcess:
    """The report stage in a child process: the daemon starts it once a model is served, restarts it
    if it dies, and stops it at shutdown."""

    def __init__(self, settings: Settings, daemon_id: int | None = None) -> None:
        self.settings = settings
        context = multiprocessing.get_context("forkserver")
        self.stop_event = context.Event()
        self.process = context.Process(
            target=_process_main,
            args=(settings, self.stop_event, daemon_id),
            name="meddaemon-reporter",
            daemon=False,
        )

    def start(self) -> None:
        start_child(self.process)
        log.info("report process started (pid %s, nice %d)", self.process.pid, self.settings.reports_nice)

    def alive(self) -> bool:
        return child_runs(self.process)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask it to finish the report in hand and exit; kill it if it does not within ``timeout``."""
        stop_child(self.process, self.stop_event, timeout, "the report process", log)


class ReportStage(ChildProcessStage):
    """The report stage as the daemon's loop sees it. Claims: the ``inferred`` scans the report process
    is writing reports for, under this daemon's id. Cadence: the process has its own loop; the daemon
    starts it once a model is served and looks every ``model_poll_seconds`` whether it died (then it
    is restarted). Recovery: temporaries a killed writer left are removed when the process starts,
    and a scan whose report was not committed is still ``inferred``. Stop: the report in hand is
    finished (``ReporterProcess.stop``). With ``--once``: the reports are written here (``drain``)."""

    name = "reports"
    label = "the report process"
    kind = "report"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        daemon_id: int | None,
        should_stop: Callable[[], bool],
        once: bool,
        served: Callable[[], bool],
    ) -> None:
        super().__init__(settings, sessions, daemon_id, should_stop, once)
        #: whether a model is served: the process is started only then
        self.served = served
        #: after ``drain``: the scans and studies whose reports failed, left to a later run
        self.unreported: tuple[int, int] = (0, 0)

    def wanted(self) -> bool:
        return self.served()

    def make_child(self) -> ReporterProcess:
        return ReporterProcess(self.settings, self.daemon_id)

    def drain(self) -> None:
        self.unreported = drain(self.settings, self.sessions, self.daemon_id, self.should_stop)


def _process_main(settings: Settings, stop: EventType, daemon_id: int | None) -> None:
    # the daemon stops this process through ``stop``: a Ctrl-C or SIGTERM sent to the whole
    # process group must not interrupt a report half-way
    leave_stopping_to_the_parent(sigterm=True)
    from meddaemon.logs import setup_logging

    setup_logging(settings.log_level)
    with contextlib.suppress(OSError):
        os.nice(settings.reports_nice)
    import torch  # preprocessing the model's view uses torch: one thread, as in the decoding workers

    torch.set_num_threads(1)
    watchdog = threading.Thread(target=_watch_parent, args=(stop,), daemon=True)
    watchdog.start()
    engine = create_db_engine(settings.db_url, settings.busy_timeout, connection_limits(settings))
    try:
        Reporter(settings, session_factory(engine), daemon_id).serve(stop)
    finally:
        engine.dispose()


def _watch_parent(stop: EventType) -> None:
    """Stop when the daemon is gone (killed with -9: nobody would set ``stop``)."""
    parent = multiprocessing.parent_process()
    while parent is not None and not stop.wait(0.5):
        if not parent.is_alive():
            stop.set()
