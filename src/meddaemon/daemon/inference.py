"""The inference stage: served models, their batch queues, and results into the database.

Scans reach it two ways: straight from intake (the worker already built the model input), or from
the database sweep (``routed`` scans after a restart, ``waiting_model`` scans once a model for
their task is promoted), whose inputs are prepared again from work/ in the decoding workers.
A promoted model is picked up without a restart; a model that fails verification is refused with
a clear message and never produces a result.

Heatmap files (the map as ``.npy``, the overlay as JPEG) are written by a small thread pool while the
main loop goes on to the next forward pass; a batch's results are committed once its files exist, so
a row never points at a file that is not there.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, filing
from meddaemon.daemon.bookkeeper import BatchRecord, Destinations, HeatmapFile, InferenceOutcome, ScanToInfer
from meddaemon.daemon.intake import prepare_stored
from meddaemon.daemon.metrics import DaemonMetrics
from meddaemon.db.models import ModelVersion, Scan, utcnow
from meddaemon.engine.batching import BatchQueue, QueuedScan
from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.inference import Prediction, ServedModel, limit_threads, pick_device
from meddaemon.engine.overlay import jpeg_bytes, model_view, overlay
from meddaemon.engine.registry import ModelRefused, load_version
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import ScanFailure
from meddaemon.files import write_atomically

log = logging.getLogger("meddaemon.inference")

Submit = Callable[..., Future]
Commit = Callable[[Callable[[Session], Any]], Any]


#: threads writing heatmap files: numpy, the JPEG encoder and file writes release the GIL
HEATMAP_WRITERS = 2
#: how often the main loop looks for batches whose heatmap files are written (s)
STORE_POLL = 0.005


@dataclass
class _Preparing:
    future: Future
    scan: ScanToInfer
    version_id: int


@dataclass
class _Storing:
    """A forwarded batch waiting for its heatmap files before its results are committed."""

    version_id: int
    outcomes: list[InferenceOutcome]
    #: (scan id, the writing of that scan's heatmap files)
    writes: list[tuple[int, Future]]

    def written(self) -> bool:
        return all(future.done() for _, future in self.writes)


class InferenceStage:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        destinations: Destinations,
        decode_options: DecodeOptions,
        submit: Submit,
        commit: Commit,
        after_store: Callable[[BatchRecord], None] = lambda record: None,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.destinations = destinations
        self.decode_options = decode_options
        self.submit = submit
        self.commit = commit
        #: the daemon carries out the moves of failed scans and logs every outcome
        self.after_store = after_store
        self.metrics = metrics or DaemonMetrics()
        limit_threads(settings.inference_threads)
        self.device = pick_device(settings.device)
        self.served: dict[str, ServedModel] = {}
        self.rows: dict[int, ModelVersion] = {}
        self.refused: set[int] = set()
        self.queue: BatchQueue[int] = BatchQueue(settings.max_batch, settings.max_wait_ms / 1000)
        self.preparing: list[_Preparing] = []
        self.storing: list[_Storing] = []
        self.writer = ThreadPoolExecutor(HEATMAP_WRITERS, thread_name_prefix="heatmap-writer")
        self.in_flight: set[int] = set()
        #: scans whose heatmap files could not be written, left alone until the time given (monotonic)
        self.resting: dict[int, float] = {}
        self.inferred = 0
        #: this daemon's id among those sharing the database (``lease.register``), set at start
        self.daemon_id: int | None = None

    def close(self) -> None:
        """Stop the writer threads; batches not yet committed stay ``routed`` and run again at start."""
        self.writer.shutdown(wait=True)

    # -- models --------------------------------------------------------------------------------

    def contracts(self) -> dict[str, InputContract]:
        return {task: model.contract for task, model in self.served.items()}

    def refresh_models(self) -> None:
        """Serve each task's active version; load newly promoted ones, drop retired ones."""
        with self.sessions() as session:
            active = {
                row.task_name: row
                for row in session.scalars(select(ModelVersion).where(ModelVersion.status == "active"))
            }
        for task, model in list(self.served.items()):
            if task not in active or active[task].id != model.version_id:
                log.info("no longer serving %s", model.name)
                del self.served[task]
                for item in self.queue.drop(model.version_id):
                    self.in_flight.discard(item.scan_id)
        for task, row in active.items():
            if task in self.served or row.id in self.refused:
                continue
            try:
                loaded = load_version(Path(row.path), device="cpu")
            except ModelRefused as refusal:
                self.refused.add(row.id)
                log.error(
                    "refusing model %s/%s: %s (%s); its scans keep waiting",
                    task,
                    row.version,
                    refusal.reason,
                    refusal.message,
                )
                continue
            model = ServedModel(row.id, loaded, self.device, heatmaps=self.settings.heatmaps)
            backend = model.choose_backend(self.settings.max_batch)
            self.served[task] = model
            self.rows[row.id] = row
            log.info(
                "serving %s/%s (%s, sha256 %s) on %s with %s",
                task,
                row.version,
                row.architecture,
                row.sha256[:12],
                self.device,
                backend,
            )

    # -- feeding the queues --------------------------------------------------------------------

    def enqueue(self, scan_id: int, task: str, inputs: np.ndarray, discovered_at: datetime | None) -> None:
        model = self.served.get(task)
        if model is None:
            return  # the model went away meanwhile: the sweep picks the scan up again
        self.in_flight.add(scan_id)
        self.queue.put(model.version_id, QueuedScan(scan_id, inputs, discovered_at))

    def sweep(self) -> int:
        """Claim routed and waiting scans of served tasks from the database and prepare their inputs."""
        budget = 4 * self.settings.max_batch - len(self.in_flight)
        if not self.served or budget <= 0:
            return 0

        now = time.monotonic()
        self.resting = {scan_id: until for scan_id, until in self.resting.items() if until > now}
        exclude = self.in_flight | set(self.resting)

        def claim(session: Session) -> list[ScanToInfer]:
            return bookkeeper.claim_for_inference(session, list(self.served), exclude, budget, self.daemon_id)

        claimed: list[ScanToInfer] = self.commit(claim)
        for scan in claimed:
            model = self.served[scan.task]
            self.in_flight.add(scan.scan_id)
            future = self.submit(prepare_stored, scan.stored_path, model.contract, self.decode_options)
            self.preparing.append(_Preparing(future, scan, model.version_id))
        return len(claimed)

    def harvest_prepared(self) -> None:
        done = [p for p in self.preparing if p.future.done()]
        if not done:
            return
        self.preparing = [p for p in self.preparing if not p.future.done()]
        failures: dict[int, list[InferenceOutcome]] = {}
        for item in done:
            result = item.future.result()
            model = self.served.get(item.scan.task)
            if isinstance(result, ScanFailure):
                failures.setdefault(item.version_id, []).append(
                    InferenceOutcome(item.scan.scan_id, [], [], failure=result)
                )
            elif model is not None and model.version_id == item.version_id:
                self.queue.put(item.version_id, QueuedScan(item.scan.scan_id, result, item.scan.discovered_at))
                continue
            self.in_flight.discard(item.scan.scan_id)
        for version_id, outcomes in failures.items():
            self._store(version_id, outcomes)

    # -- running batches -----------------------------------------------------------------------

    def run_ready(self, flush: bool = False) -> int:
        """Forward every batch that is full or has waited long enough, and commit the results of
        batches whose heatmap files are written (all of them with ``flush``); returns scans forwarded."""
        done = 0
        self.store_written()
        for version_id, items in self.queue.take_ready(flush):
            model = next((m for m in self.served.values() if m.version_id == version_id), None)
            if model is None:
                for item in items:
                    self.in_flight.discard(item.scan_id)
                continue
            started = time.perf_counter()
            inputs = np.concatenate([item.inputs for item in items])
            predictions = model.predict(inputs)
            forward_s = time.perf_counter() - started
            self.storing.append(self._outcomes(model, items, predictions))
            done += len(items)
            log.debug(
                "%s: batch of %d scans (%d inputs) in %.0f ms", model.name, len(items), len(inputs), forward_s * 1000
            )
        self.store_written(wait_for_files=flush)
        return done

    def store_written(self, wait_for_files: bool = False) -> None:
        """Commit, oldest first, the batches whose heatmap files are all written."""
        while self.storing and (wait_for_files or self.storing[0].written()):
            batch = self.storing.pop(0)
            wait([future for _, future in batch.writes])
            self._store(batch.version_id, self._without_unwritten(batch))

    def idle(self) -> bool:
        return not self.preparing and not self.storing and len(self.queue) == 0

    def next_deadline(self) -> float | None:
        if self.storing:
            return time.monotonic() + STORE_POLL
        return self.queue.next_deadline()

    def _outcomes(self, model: ServedModel, items: list[QueuedScan], predictions: list[Prediction]) -> _Storing:
        shas = self._shas([item.scan_id for item in items])
        outcomes: list[InferenceOutcome] = []
        writes: list[tuple[int, Future]] = []
        row = 0
        now = utcnow()
        for item in items:
            rows = predictions[row : row + item.size]
            inputs = item.inputs
            row += item.size
            failure = next((p.failure for p in rows if p.failure is not None), None)
            latency = (now - _aware(item.discovered_at)).total_seconds() * 1000 if item.discovered_at else None
            if failure is not None:
                outcomes.append(InferenceOutcome(item.scan_id, [], [], failure=failure, latency_ms=latency))
                continue
            probs = np.mean([p.probabilities for p in rows], axis=0)
            positive = model.calls(probs)
            key = item.size // 2  # heatmaps of the key frame when all frames were run
            files = self._heatmap_files(model, shas[item.scan_id], rows[key])
            if files:
                maps = [heatmap for _, heatmap in rows[key].heatmaps]
                writes.append(
                    (item.scan_id, self.writer.submit(write_heatmap_files, files, maps, inputs[key], model.contract))
                )
            outcomes.append(InferenceOutcome(item.scan_id, probs.tolist(), positive.tolist(), None, files, latency))
        return _Storing(model.version_id, outcomes, writes)

    def _heatmap_files(self, model: ServedModel, sha: str, prediction: Prediction) -> list[HeatmapFile]:
        method = "cam" if model.model.cam_linear is not None else "gradcam"
        files: list[HeatmapFile] = []
        for label_index, heatmap in prediction.heatmaps:
            array_path, overlay_path = filing.heatmap_paths(
                self.settings.heatmaps_dir, sha, model.version_id, model.labels[label_index]
            )
            height, width = heatmap.shape
            files.append(HeatmapFile(label_index, array_path, overlay_path, height, width, method))
        return files

    def _without_unwritten(self, batch: _Storing) -> list[InferenceOutcome]:
        """The batch's outcomes less the scans whose heatmap files could not be written (a full disk):
        those stay ``routed`` and the sweep runs them again after ``rescan_seconds``."""
        unwritten: set[int] = set()
        for scan_id, future in batch.writes:
            error = future.exception()
            if error is not None:
                unwritten.add(scan_id)
                self.in_flight.discard(scan_id)
                self.resting[scan_id] = time.monotonic() + self.settings.rescan_seconds
                log.error(
                    "scan %d: could not write its heatmap files (%s); it stays routed and is retried later",
                    scan_id,
                    error,
                )
        return [outcome for outcome in batch.outcomes if outcome.scan_id not in unwritten]

    def _store(self, version_id: int, outcomes: list[InferenceOutcome]) -> None:
        row = self.rows[version_id]

        def store(session: Session) -> BatchRecord:
            return bookkeeper.record_results(
                session, session.merge(row, load=False), outcomes, self.destinations, self.daemon_id
            )

        record = self.commit(store)
        for outcome in outcomes:
            self.in_flight.discard(outcome.scan_id)
        self.inferred += sum(1 for o in record.outcomes if o.state == "inferred")
        stored = {o.scan_id for o in record.outcomes if o.state == "inferred"}
        self.metrics.results_stored(len(stored), [o.latency_ms for o in outcomes if o.scan_id in stored])
        self.after_store(record)

    def _shas(self, ids: list[int]) -> dict[int, str]:
        with self.sessions() as session:
            return dict(session.execute(select(Scan.id, Scan.sha256).where(Scan.id.in_(ids))).all())  # type: ignore[arg-type]


def write_heatmap_files(
    files: list[HeatmapFile], maps: list[np.ndarray], model_input: np.ndarray, contract: InputContract
) -> None:
    """Each map as float16 ``.npy`` and as a JPEG overlay on the image the model saw (in a writer thread)."""
    view = model_view(model_input, contract)
    for file, heatmap in zip(files, maps, strict=True):
        write_atomically(file.array_path, _npy_bytes(heatmap.astype(np.float16)))
        write_atomically(file.overlay_path, jpeg_bytes(overlay(view, heatmap)))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
