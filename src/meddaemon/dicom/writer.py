"""A scan's DICOM outputs written to ``<state_dir>/dicom/<sha[:2]>/<sha>/`` and queued in the outbox.

The report stage calls ``prepare`` after writing the scan's PDF (files only, no transaction open)
and ``enqueue`` in the transaction that moves the scan from ``inferred`` to ``reported``: the
outbox rows exist exactly when that step happened. A crash between the two leaves the scan
``inferred``; the next attempt writes the same files again (the same UIDs) and queues them then.

A study report (written once the study is complete) is an Encapsulated PDF too (``prepare_study``,
to ``<state_dir>/dicom/studies/<study key>/``), queued in the transaction that records the study
report. The outbox is keyed by scan: its rows belong to the study's first DICOM scan, under the
key ``study-pdf:<prefix of the PDF's SHA-256 without its dates>``, so each version of the study
report is a row of its own, and the same report rendered again is the same row.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from meddaemon import heap
from meddaemon.config import DestinationConfig, Settings
from meddaemon.db.models import Scan
from meddaemon.dicom import hot_paths, outbox, pdf, pmap, sc, sr
from meddaemon.dicom.content import OutputRefused, ScanFacts, declaring_its_text, scan_facts
from meddaemon.dicom.encoding import encode
from meddaemon.files import fsync_dir, write_atomically
from meddaemon.names import label_file_part
from meddaemon.report.content import reportable_study_scans
from meddaemon.states import ScanState
from meddaemon.stored_paths import stored_name

log = logging.getLogger("meddaemon.dicom")
# highdicom logs a dozen lines at INFO for every object it builds, the source's SOP Instance UID
# among them: more than half of a daemon's log, and an identifier the log must not hold
logging.getLogger("highdicom").setLevel(logging.WARNING)
hot_paths.apply()


@dataclass(frozen=True)
class WrittenObject:
    kind: str
    object_key: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass
class PreparedOutputs:
    """What ``enqueue`` records for one scan: the objects written, and the kinds that could not be
    made with why (their rows are born ``dead``)."""

    scan_id: int
    task: str
    objects: list[WrittenObject] = field(default_factory=list)
    refused: dict[str, OutputRefused] = field(default_factory=dict)
    #: the tasks whose destinations receive the objects, when not ``task`` alone (a study's tasks)
    tasks: tuple[str, ...] = ()


def object_path(dicom_dir: Path, sha256: str, object_key: str) -> Path:
    return dicom_dir / sha256[:2] / sha256 / _object_file_name(object_key)


def study_object_path(dicom_dir: Path, study_instance_uid: str, object_key: str) -> Path:
    folder = hashlib.sha256(study_instance_uid.encode()).hexdigest()[:16]
    return dicom_dir / "studies" / folder / _object_file_name(object_key)


def _object_file_name(object_key: str) -> str:
    """``sr.dcm``, ``pmap_<label>.dcm``: one file per key (``label_file_part``)."""
    kind, _, label = object_key.partition(":")
    return f"{kind}_{label_file_part(label)}.dcm" if label else f"{kind}.dcm"


def build_objects(
    facts: ScanFacts, kinds: tuple[str, ...], pdf_bytes: bytes | None, with_phi: bool
) -> list[tuple[str, Dataset]]:
    """(object key, dataset) for each output of ``kinds`` that the scan has the makings of."""
    facts = declaring_its_text(facts)
    built: list[tuple[str, Dataset]] = []
    if "sr" in kinds:
        built.append((sr.KIND, sr.build(facts)))
    heatmaps = facts.heatmaps()
    if "pmap" in kinds:
        built += pmap.build_all(facts, heatmaps)
    if "sc" in kinds:
        built += sc.build_all(facts, heatmaps)
    if "pdf" in kinds and pdf_bytes is not None:
        built.append((pdf.KIND, pdf.build(facts, pdf_bytes, with_phi)))
    return built


@functools.cache
def _settle_heap() -> None:
    """Once per process, after the first objects were built: what is alive then (the modules, the
    model, highdicom's tables of the standard, loaded at first use) is moved out of the garbage
    collector's sight (``meddaemon.heap.settle``). Building DICOM objects allocates many small
    containers, which triggers full collections; each walked those tables again (up to a fifth of
    the outputs' CPU time)."""
    heap.settle()


class DicomOutputs:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def destinations(self, task: str, kind: str) -> list[DestinationConfig]:
        return self.receivers((task,), kind)

    def receivers(self, tasks: tuple[str, ...], kind: str) -> list[DestinationConfig]:
        """The destinations receiving ``kind`` for any of ``tasks`` (a study's, for its report)."""
        return [
            d
            for d in self.settings.destination
            if any(d.receives(t, kind) and kind in self.settings.dicom_outputs_for(t) for t in tasks)
        ]

    def _facts(self, session: Session, scan_id: int) -> ScanFacts:
        settings = self.settings
        return scan_facts(session, scan_id, settings.state_dir, settings.dicom_uid_root, settings.decode_options)

    def wanted(self, task: str) -> tuple[str, ...]:
        """The outputs of a task's scans that some destination receives."""
        return tuple(k for k in self.settings.dicom_outputs_for(task) if self.destinations(task, k))

    def prepare(self, session_factory: Callable[[], Session], scan_id: int, pdf: bytes | None) -> PreparedOutputs:
        """Build and write the objects of a scan about to be reported (nothing for one that is not
        ``inferred``: a report rebuilt later queues nothing); never raises for a scan that cannot
        have them, only for a disk that cannot take them (``OSError``: the report stage retries)."""
        with session_factory() as session:
            scan = session.get(Scan, scan_id)
            if scan is None or scan.format != "dicom" or not scan.task_name or scan.state != ScanState.INFERRED:
                return PreparedOutputs(scan_id, (scan.task_name or "") if scan is not None else "")
            task = scan.task_name
            kinds = self.wanted(task)
            if not kinds:
                return PreparedOutputs(scan_id, task)
            try:
                facts = self._facts(session, scan_id)
            except OutputRefused as exc:
                log.warning("scan %d: no DICOM outputs: %s (%s)", scan_id, exc.reason, exc)
                return PreparedOutputs(scan_id, task, refused=dict.fromkeys(kinds, exc))
        pdf_bytes = pdf if "pdf" in kinds else None
        prepared = PreparedOutputs(scan_id, task)
        # each object fsynced as written, the scan's folder once after the last: the rows are
        # committed (by ``enqueue``) only after this returns, so every file and rename is durable then
        for kind in kinds:
            try:
                built = build_objects(facts, (kind,), pdf_bytes, self.settings.reports_with_phi)
            except OutputRefused as exc:
                prepared.refused[kind] = exc
                log.warning("scan %d: no %s object: %s (%s)", scan_id, kind, exc.reason, exc)
                continue
            except OSError:
                raise  # a heatmap or overlay file unreadable now: the report stage tries again later
            except Exception as exc:
                prepared.refused[kind] = OutputRefused(
                    "build_failed", f"building the {kind} object failed ({type(exc).__name__})"
                )
                log.error("scan %d: %s", scan_id, prepared.refused[kind])
                continue
            for key, ds in built:
                path = object_path(self.settings.dicom_dir, facts.sha256, key)
                write_atomically(path, encode(ds), durable=True, sync_folder=False)
                prepared.objects.append(WrittenObject(kind, key, str(ds.SOPClassUID), str(ds.SOPInstanceUID), path))
        if prepared.objects:
            fsync_dir(prepared.objects[0].path.parent, strict=True)
            _settle_heap()
        return prepared

    def prepare_study(
        self, session_factory: Callable[[], Session], study_instance_uid: str, pdf_bytes: bytes
    ) -> PreparedOutputs | None:
        """Build and write the Encapsulated PDF of a study report about to be recorded; None when no
        destination receives it or the study has no DICOM scan whose results can join it. Raises only
        for a disk that cannot take it (``OSError``: the study report is retried)."""
        with session_factory() as session:
            latest, _ = reportable_study_scans(session, study_instance_uid)  # the versions the PDF shows
            rows = [(scan.id, scan.task_name) for scan in latest if scan.format == "dicom"]
            tasks = tuple(dict.fromkeys(str(task) for _, task in rows if task))
            if not self.receivers(tasks, pdf.KIND):
                return None
            scans: list[ScanFacts] = []
            for scan_id, _ in rows:
                try:
                    scans.append(self._facts(session, scan_id))
                except OutputRefused as exc:
                    log.info("scan %d: left out of its study report's DICOM object: %s", scan_id, exc.reason)
        if not scans:
            log.warning("a study report has no DICOM object: none of its scans can join the study")
            return None
        try:
            ds = pdf.build_study(scans, pdf_bytes, self.settings.reports_with_phi)
        except Exception as exc:  # a bug: the study report stands, its DICOM object is missing (logged)
            log.error("building a study report's DICOM object failed (%s)", type(exc).__name__)
            return None
        key = pdf.study_object_key(pdf.content_digest(pdf_bytes))
        path = study_object_path(self.settings.dicom_dir, study_instance_uid, key)
        write_atomically(path, encode(ds), durable=True, sync_folder=False)
        fsync_dir(path.parent, strict=True)
        written = WrittenObject(pdf.KIND, key, str(ds.SOPClassUID), str(ds.SOPInstanceUID), path)
        return PreparedOutputs(scans[0].scan_id, scans[0].task, [written], tasks=tasks)

    def enqueue(self, session: Session, prepared: PreparedOutputs) -> int:
        """The outbox rows of ``prepared`` (in the caller's transaction); returns how many."""
        items: list[outbox.NewItem] = []
        for obj in prepared.objects:
            for destination in self.receivers(prepared.tasks or (prepared.task,), obj.kind):
                items.append(
                    outbox.NewItem(
                        obj.object_key,
                        destination.name,
                        obj.sop_class_uid,
                        obj.sop_instance_uid,
                        stored_name(obj.path, self.settings.state_dir),
                    )
                )
        for kind, refused in prepared.refused.items():
            error = f"{refused.reason}: {refused}"
            items += [outbox.NewItem(kind, d.name, error=error) for d in self.destinations(prepared.task, kind)]
        return outbox.enqueue(session, prepared.scan_id, items)
