"""The inference stage: served models, their batch queues, and results into the database.

Claims: the scans it runs (``bookkeeper.claim_for_inference``: routed and waiting scans of served
tasks, under this daemon's id) until their results are committed. Cadence: every turn of the loop
(batches that are full or have waited ``max_wait_ms``); the database sweep runs when a model is
adopted and every ``model_poll_seconds`` (``serving.ModelStage``). Recovery: scans a stopped or lost
daemon held stay ``routed`` and the sweep claims them again. Stop: the queued batches are run and
their results committed (``finish``); a model load in progress is not waited for.

Scans reach it two ways: straight from intake (the worker already built the model input), or from
the database sweep (``routed`` scans after a restart, ``waiting_model`` scans once a model for
their task is promoted), whose inputs are prepared again from work/ in the decoding workers.
A promoted model is picked up without a restart: it is loaded in a background thread
(``daemon/loader.py``) while the version it replaces keeps serving its task; a model that fails
verification is refused with a clear message and never produces a result.

The forward pass runs in a thread of its own (ONNX Runtime and torch release the GIL while they
compute), two batches at a time, one running and one waiting behind it: the loop meanwhile records
the next files, stores the last batch's results and keeps the decoding workers fed, instead of the
cores idling in turn (measured in ``benchmarks/README.md``, issue 16). The results of a batch are
taken back, turned into outcomes and stored by the loop, in the order the batches were handed over.

A map's grid goes into its heatmap row (``engine.heatmap_grid``). With reports on, the scan as the
model saw it and each map's overlay JPEG are written by a small thread pool while the main loop goes
on to the next forward pass; a batch's results are committed once its files exist, so a row never
points at an overlay that is not there. With reports off the overlay is drawn when first shown
(``meddaemon.overlays``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, filing
from meddaemon.daemon import loader as model_loader
from meddaemon.daemon.bookkeeper import BatchRecord, Destinations, HeatmapFile, InferenceOutcome, ScanToInfer
from meddaemon.daemon.intake import prepare_stored
from meddaemon.daemon.metrics import DaemonMetrics
from meddaemon.daemon.stages import STOP_READ_WAIT_SECONDS, Stage
from meddaemon.daemon.workers import RunningSince, StopWaiting
from meddaemon.db.engine import with_lock_retry
from meddaemon.db.models import ModelVersion, Scan, utcnow
from meddaemon.engine.batching import BatchQueue, QueuedScan
from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.heatmap_grid import expand_one, grid_bytes
from meddaemon.engine.overlay import jpeg_bytes, model_pixels, overlay
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import FailureReason, ReadLater, ScanFailure
from meddaemon.files import write_atomically
from meddaemon.states import ScanState

if TYPE_CHECKING:  # torch: imported when the first model is loaded (``_engine``), not at start
    import torch

    from meddaemon.engine.inference import Prediction, ServedModel

log = logging.getLogger("meddaemon.inference")

Submit = Callable[..., Future]
Commit = Callable[[Callable[[Session], Any]], Any]


#: largest model view kept for the reports (``report.images.MAX_SIDE``); a larger one is resized there
REPORT_VIEW_MAX_SIDE = 512
#: threads writing heatmap files: numpy, the JPEG encoder and file writes release the GIL
HEATMAP_WRITERS = 2
#: batches handed to the forward threads and not yet taken back, beyond those running (one per
#: lane): one waiting behind them, so that no lane waits for the loop while the queue fills the next
FORWARDS_WAITING = 1
#: how often the main loop looks for inputs prepared, batches forwarded and batches whose heatmap
#: files are written (s)
STORE_POLL = 0.005
#: how often the main loop looks for finished model loads while one is in progress (s)
LOAD_POLL = 0.1
#: a version whose load failed for another reason than its verification is tried again after (s)
LOAD_RETRY_SECONDS = 300.0
#: how long the task of a worker just killed may take to fail (the pool notices the death)
WORKER_DEATH_NOTICED_SECONDS = 10.0


@dataclass
class _Preparing:
    future: Future
    scan: ScanToInfer
    version_id: int


@dataclass
class _Forwarding:
    """A batch handed to the forward thread: ``future`` gives (its predictions, seconds)."""

    model: ServedModel
    items: list[QueuedScan]
    future: Future


@dataclass
class _Storing:
    """A forwarded batch waiting for its heatmap files before its results are committed."""

    version_id: int
    outcomes: list[InferenceOutcome]
    #: (scan id, the writing of that scan's heatmap files)
    writes: list[tuple[int, Future]]

    def written(self) -> bool:
        return all(future.done() for _, future in self.writes)


class InferenceStage(Stage):
    name = "inference"

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
        kill_workers: Callable[[], None] = lambda: None,
        wait_for_worker: Callable[[Future, float], Any] = lambda future, timeout: future.result(timeout),
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.destinations = destinations
        self.decode_options = decode_options
        self.submit = submit
        #: kills the decoding workers and starts others (a preparation that does not end)
        self.kill_workers = kill_workers
        #: a future's result within a timeout, the daemon kept alive meanwhile (``workers.wait_for``)
        self.wait_for_worker = wait_for_worker
        #: when each preparation began to run in a worker (its timeout counts from there)
        self.running = RunningSince()
        self.commit = commit
        #: the daemon carries out the moves of failed scans and logs every outcome
        self.after_store = after_store
        self.metrics = metrics or DaemonMetrics()
        #: where models run; chosen with the first load (``_engine``)
        self.device: torch.device | None = None
        self.served: dict[str, ServedModel] = {}
        self.rows: dict[int, ModelVersion] = {}
        #: each task's active version, as last read from the database
        self.wanted: dict[str, ModelVersion] = {}
        #: versions whose load failed: not asked for again before the time given (monotonic; inf: refused)
        self.failed_loads: dict[int, float] = {}
        #: why a version's load failed, as its scans' waiting detail says
        self.load_errors: dict[int, str] = {}
        #: versions refused -> their ``promoted_at`` then: promoted again since, they are tried again
        self.refused_promotions: dict[int, datetime | None] = {}
        self.loader = model_loader.ModelLoader(self._load)
        #: loads finished and not yet adopted (``collect_loads``)
        self.loaded: list[model_loader.LoadResult] = []
        self.queue: BatchQueue[int] = BatchQueue(settings.max_batch, settings.max_wait_ms / 1000)
        self.preparing: list[_Preparing] = []
        self.forwarding: list[_Forwarding] = []
        self.storing: list[_Storing] = []
        #: the forward threads, one per lane (``engine.inference.forward_lanes``), started with the engine
        self.forwarder: ThreadPoolExecutor | None = None
        self.lanes = 1
        self.writer = ThreadPoolExecutor(HEATMAP_WRITERS, thread_name_prefix="heatmap-writer")
        self.in_flight: set[int] = set()
        #: scans whose heatmap files could not be written, left alone until the time given (monotonic)
        self.resting: dict[int, float] = {}
        self.inferred = 0
        #: this daemon's id among those sharing the database (``lease.register``), set at start
        self.daemon_id: int | None = None
        #: with ``load_when``: whether files wait in the inbox (a model is loaded only when there is work)
        self.files_waiting: Callable[[], bool] | None = None

    def load_when(self, files_waiting: Callable[[], bool]) -> None:
        """Load a task's model only once there is work for it: files in the inbox (``files_waiting``)
        or scans of the task waiting in the database. ``--once`` on an empty inbox then ends in about
        a second instead of loading, verifying and warming every active model for nothing."""
        self.files_waiting = files_waiting

    def close(self) -> None:
        """Stop the forward and writer threads; batches not yet committed stay ``routed`` and run
        again at start. A model load in progress is not waited for."""
        self.loader.close()
        if self.forwarder is not None:
            self.forwarder.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)

    # -- the stage -------------------------------------------------------------------------------

    def tick(self, now: float, flush: bool) -> bool:
        self.harvest_prepared()
        return self.run_ready(flush=flush) > 0

    def look_again(self) -> int:
        return self.sweep()

    def finish(self) -> None:
        """Run what is queued, once the inputs being prepared are back (waited for at most
        ``STOP_READ_WAIT_SECONDS``: then given up, their scans left for the next run), and commit
        the results."""
        deadline = time.monotonic() + STOP_READ_WAIT_SECONDS
        while self.preparing and time.monotonic() < deadline:
            self.harvest_prepared()
            time.sleep(0.01)
        if self.preparing:
            log.warning("stopping: %d scans whose inputs were being prepared are left for the next run",
                        len(self.preparing))  # fmt: skip
            self.kill_workers()
            self.in_flight -= {item.scan.scan_id for item in self.preparing}
            self.preparing = []
        self.run_ready(flush=True)

    # -- models --------------------------------------------------------------------------------

    def start_engine(self) -> None:
        """Import torch and set up its threads and device now: a live daemon does it at start-up, so
        that the first promotion does not stall the loop (and its watchdog) for a torch import."""
        self._engine()

    def _engine(self) -> torch.device:
        """Torch's threads and the device, set up by the main thread before the first load."""
        if self.device is None:
            from meddaemon.engine.inference import forward_lanes, limit_threads, pick_device

            limit_threads(self.settings.inference_threads)
            self.device = pick_device(self.settings.device)
            self.lanes = forward_lanes(self.settings.concurrent_batches, self.device)
            self.forwarder = ThreadPoolExecutor(self.lanes, thread_name_prefix="forward")
        return self.device

    def _load(self, request: model_loader.LoadRequest) -> ServedModel:
        from meddaemon.engine import registry

        assert self.device is not None
        if (spec := self.settings.task_specs.get(request.task)) is not None:
            manifest = request.manifest or {}
            where = f"{request.task}/{request.version}"
            registry.check_task_matches(spec, manifest.get("labels", []), manifest.get("kind", ""), where)

        def recorded_graphs() -> dict[str, str]:
            with self.sessions() as session:
                return registry.kept_graphs(session, request.version_id)

        return model_loader.load_and_time(
            request,
            device=self.device,
            heatmaps=self.settings.heatmaps,
            batch=self.settings.max_batch,
            lanes=self.lanes,
            graphs=with_lock_retry(recorded_graphs),
            record_graph=registry.graph_recorder(self.sessions, request.version_id),
        )

    def why_waiting(self) -> dict[str, str]:
        """Why the scans of each task with an active version but no served model wait: its model is
        loading, or failed to load. A task missing here has no active version."""
        pending = self.loader.pending()
        why: dict[str, str] = {}
        for task, row in self.wanted.items():
            if task in self.served:
                continue
            name = f"{task}/{row.version}"
            if row.id in pending:
                why[task] = f"model {name} is loading"
            elif row.id in self.load_errors:
                why[task] = f"model {name} could not be loaded: {self.load_errors[row.id]}"
            else:
                why[task] = f"model {name} is not loaded yet"
        return why

    def contracts(self) -> dict[str, InputContract]:
        return {task: model.contract for task, model in self.served.items()}

    def refresh_models(self) -> None:
        """Ask the loader for each task's active version; stop serving tasks without one.

        A task keeps being served by the version it has until the newly promoted one is loaded
        (:meth:`collect_loads`) and, the active versions read here again, adopted if it is still
        the active one; a task without an active version stops being served at once."""
        with self.sessions() as session:
            self.wanted = {
                row.task_name: row
                for row in session.scalars(select(ModelVersion).where(ModelVersion.status == "active"))
            }
            served_ids = [model.version_id for model in self.served.values()]
            retired = set(
                session.scalars(
                    select(ModelVersion.id).where(ModelVersion.id.in_(served_ids), ModelVersion.status == "retired")
                )
            )
            idle = self._tasks_without_work(session) if self.files_waiting is not None else set()
        self._adopt_loaded()
        stopped: list[str] = []
        for task, model in list(self.served.items()):
            if task not in self.wanted:
                log.info("no longer serving %s: the task has no active version", model.name)
                self._stop_serving(task)
            elif model.version_id in retired:  # kept while its successor loaded, or after it was refused
                log.info("no longer serving %s: it was retired", model.name)
                self._stop_serving(task)
                stopped.append(task)
        waiting = self.why_waiting()
        why = {task: waiting.get(task, f"model {task} was retired") for task in stopped}
        settled: int = self.commit(
            lambda session: bookkeeper.wait_for_a_model(session, self.served, self.daemon_id, why)
        )
        if settled:
            log.info("%d routed scan(s) wait for a model: their task's is no longer served", settled)
        now = time.monotonic()
        pending = self.loader.pending()
        for task, row in self.wanted.items():
            model = self.served.get(task)
            if (model is not None and model.version_id == row.id) or row.id in pending:
                continue
            if row.id in self.refused_promotions and self.refused_promotions[row.id] != row.promoted_at:
                log.info("model %s/%s was promoted again since it was refused: trying it again", task, row.version)
                del self.refused_promotions[row.id], self.failed_loads[row.id], self.load_errors[row.id]
            if self.failed_loads.get(row.id, 0.0) > now or task in idle:
                continue
            self._engine()
            folder = self.settings.stored_file(row.path)
            manifest = dict(row.manifest or {})
            self.loader.request(
                model_loader.LoadRequest(task, row.version, row.id, folder, row.sha256, manifest, row.promoted_at)
            )

    def _tasks_without_work(self, session: Session) -> set[str]:
        """Tasks with an active version and nothing for it to do (``load_when``)."""
        assert self.files_waiting is not None
        unserved = set(self.wanted) - set(self.served)
        if not unserved or self.files_waiting():
            return set()
        waiting = set(
            session.scalars(
                select(Scan.task_name)
                .where(Scan.state.in_([ScanState.ROUTED, ScanState.WAITING_MODEL]), Scan.task_name.in_(unserved))
                .distinct()
            )
        )
        return unserved - waiting

    def collect_loads(self, timeout: float = 0.0) -> bool:
        """Take the loads that finished (waiting up to ``timeout`` for one); whether there were any.
        They are adopted by the next :meth:`refresh_models`, against the active versions it reads:
        checked against those of the last poll, a version retired while it loaded was served until
        the next poll."""
        finished = self.loader.finished(timeout)
        self.loaded.extend(finished)
        return bool(finished)

    def _adopt_loaded(self) -> None:
        """Serve the versions whose load finished if they are still the active ones (``self.wanted``)."""
        loaded, self.loaded = self.loaded, []
        for result in loaded:
            request = result.request
            row = self.wanted.get(request.task)
            current = self.served.get(request.task)
            keeps = f"{current.name} keeps serving" if current is not None else "its scans keep waiting"
            if result.model is None:
                self._log_failed_load(result, keeps)
                continue
            if row is None or row.id != request.version_id:
                log.info("loaded %s, which is no longer the active version: not serving it", request.name)
                continue
            if current is not None:
                log.info("no longer serving %s: %s replaces it", current.name, request.name)
                self._stop_serving(request.task)
            model = result.model
            self.served[request.task] = model
            self.rows[row.id] = row
            if row.refusal is not None:  # refused before (by this daemon or another), served now: mended
                from meddaemon.engine import registry

                self.commit(lambda session, version_id=row.id: registry.clear_refusal(session, version_id))
                log.info("model %s was refused before (%s): served now, the refusal cleared", request.name, row.refusal)
            log.info(
                "serving %s/%s (%s, sha256 %s) on %s with %s (loaded in %.1f s)",
                request.task,
                row.version,
                row.architecture,
                row.sha256[:12],
                self.device,
                model.backend,
                result.seconds,
            )

    def wait_for_loads(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait until every requested load has finished, then adopt them (``--once`` at start)."""
        while self.loader.busy() and not stop():
            self.collect_loads(timeout=0.2)
        self.refresh_models()

    def _stop_serving(self, task: str) -> None:
        model = self.served.pop(task)
        for item in self.queue.drop(model.version_id):
            self.in_flight.discard(item.scan_id)

    def _log_failed_load(self, result: model_loader.LoadResult, keeps: str) -> None:
        request = result.request
        if result.refusal is not None:
            self.failed_loads[request.version_id] = float("inf")
            self.load_errors[request.version_id] = f"refused, {result.refusal.reason}"
            self._record_refusal(request, f"{result.refusal.reason}: {result.refusal.message}")
            log.error(
                "refusing model %s: %s (%s); %s",
                request.name,
                result.refusal.reason,
                result.refusal.message,
                keeps,
            )
            return
        self.failed_loads[request.version_id] = time.monotonic() + LOAD_RETRY_SECONDS
        self.load_errors[request.version_id] = f"trying again every {LOAD_RETRY_SECONDS:.0f} s"
        log.error(
            "could not load model %s: %s; %s; trying again in %.0f s",
            request.name,
            result.error,
            keeps,
            LOAD_RETRY_SECONDS,
        )

    def refused_active(self) -> set[str]:
        """The active versions (``task/version``) this daemon refused, as last read."""
        return {f"{task}/{row.version}" for task, row in self.wanted.items() if row.id in self.refused_promotions}

    def _record_refusal(self, request: model_loader.LoadRequest, refusal: str) -> None:
        """Record the refusal on the version unless it was promoted again since the load was asked
        for (``models list``, ``status`` and ``health`` show it), and remember the promotion refused:
        promoted again, even while it loaded, it is tried again."""
        from meddaemon.engine import registry

        self.refused_promotions[request.version_id] = request.promoted_at
        if request.promoted_at is not None:
            self.commit(
                lambda session: registry.record_refusal(session, request.version_id, request.promoted_at, refusal)
            )

    # -- feeding the queues --------------------------------------------------------------------

    def enqueue(
        self,
        scan_id: int,
        task: str,
        inputs: np.ndarray,
        discovered_at: datetime | None,
        sha256: str | None = None,
        prepared_for: InputContract | None = None,
    ) -> None:
        """Queue a scan read by intake (``sha256``: its content hash, which names its heatmap files;
        ``prepared_for``: the contract its input was made for)."""
        model = self.served.get(task)
        if model is None or (prepared_for is not None and prepared_for != model.contract):
            # the model went away, or another version was swapped in while the scan was read (its input
            # made for the old one was run through the new one): the sweep prepares it again
            return
        self.in_flight.add(scan_id)
        self.queue.put(model.version_id, QueuedScan(scan_id, inputs, discovered_at, sha256=sha256))

    def sweep(self) -> int:
        """Claim routed and waiting scans of served tasks from the database and prepare their inputs."""
        budget = 4 * self.settings.max_batch - len(self.in_flight)
        if not self.served or budget <= 0:
            return 0

        now = time.monotonic()
        self.resting = {scan_id: until for scan_id, until in self.resting.items() if until > now}
        exclude = self.in_flight | set(self.resting)

        def claim(session: Session) -> list[ScanToInfer]:
            return bookkeeper.claim_for_inference(
                session, list(self.served), exclude, budget, self.daemon_id, self.destinations
            )

        claimed: list[ScanToInfer] = self.commit(claim)
        for scan in claimed:
            model = self.served[scan.task]
            self.in_flight.add(scan.scan_id)
            future = self.submit(prepare_stored, scan.stored_path, model.contract, self.decode_options, scan.sha256)
            self.preparing.append(_Preparing(future, scan, model.version_id))
        return len(claimed)

    def harvest_prepared(self) -> None:
        """Take the inputs prepared; preparations that have not ended after ``read_timeout_seconds``
        are given up (the workers killed: a read that never ends held the pool, intake with it) and
        each prepared again alone."""
        overdue = [p for p in self.preparing if self.running.overdue([p.future], self._timeout)]
        if overdue:
            log.error("preparing the inputs of scans %s had not ended after %.0f s (read_timeout_seconds); "
                      "the decoding workers are killed", ", ".join(str(p.scan.scan_id) for p in overdue),
                      self._timeout)  # fmt: skip
            self.kill_workers()
        done = [p for p in self.preparing if p.future.done() or p in overdue]
        if not done:
            return
        self.preparing = [p for p in self.preparing if p not in done]
        self.running.forget(p.future for p in done)
        failures: dict[int, list[InferenceOutcome]] = {}
        for item in done:
            result = self._prepared(item)
            model = self.served.get(item.scan.task)
            if isinstance(result, ReadLater):  # out of descriptors or memory: the scan waits a while
                self.resting[item.scan.scan_id] = time.monotonic() + self.settings.rescan_seconds
                log.warning("scan %d: %s; it stays routed and is read again later", item.scan.scan_id, result.message)
            elif isinstance(result, ScanFailure):
                failures.setdefault(item.version_id, []).append(
                    InferenceOutcome(item.scan.scan_id, [], [], failure=result)
                )
            elif model is not None and model.version_id == item.version_id:
                scan = item.scan
                queued = QueuedScan(scan.scan_id, result, scan.discovered_at, sha256=scan.sha256)
                self.queue.put(item.version_id, queued)
                continue
            self.in_flight.discard(item.scan.scan_id)
        for version_id, outcomes in failures.items():
            self._store(version_id, outcomes)

    def _prepared(self, item: _Preparing) -> np.ndarray | ScanFailure | ReadLater:
        """What preparing ``item`` gave; where a worker died under it (this scan's file, or another's
        in the same pool), prepared again alone, in a fresh worker: one that dies again under it
        fails it as ``decoder_crashed``, as intake fails a file that kills its worker."""
        try:
            return self.wait_for_worker(item.future, WORKER_DEATH_NOTICED_SECONDS)  # a killed worker's task: soon
        except (BrokenProcessPool, CancelledError, TimeoutError):
            log.error("scan %d: a decoding worker died while preparing it; preparing it again alone", item.scan.scan_id)
        except StopWaiting:
            return ReadLater(FailureReason.DECODER_CRASHED, "a stop came while it was prepared")
        scan, model = item.scan, self.served.get(item.scan.task)
        if model is None:  # nothing to prepare it for now: the sweep takes it again later
            return ReadLater(FailureReason.DECODER_CRASHED, "a decoding worker died while preparing it")
        try:
            future = self.submit(prepare_stored, scan.stored_path, model.contract, self.decode_options, scan.sha256)
            return self.wait_for_worker(future, self._timeout)
        except StopWaiting:
            return ReadLater(FailureReason.DECODER_CRASHED, "a stop came while it was prepared again")
        except (BrokenProcessPool, CancelledError):
            return ScanFailure(FailureReason.DECODER_CRASHED, "the decoder crashed on this scan's registered copy")
        except TimeoutError:
            self.kill_workers()
            return ScanFailure(
                FailureReason.DECODE_TIMEOUT,
                f"preparing its input had not ended after {self._timeout:.0f} s (read_timeout_seconds); "
                "its decoding worker was killed",
            )

    @property
    def _timeout(self) -> float:
        return self.settings.read_timeout_seconds

    # -- running batches -----------------------------------------------------------------------

    def run_ready(self, flush: bool = False) -> int:
        """Take back the batches forwarded, hand the forward threads every batch that is full or has
        waited long enough (while fewer than the lanes and ``FORWARDS_WAITING`` are there), and
        commit the results of batches whose heatmap files are written. ``flush``: every queued
        batch, waited for, and every result committed. Returns the scans taken back from the
        forward threads."""
        self.store_written()
        done = self.take_forwarded()
        lanes = max((model.lanes for model in self.served.values()), default=1)
        room = None if flush else lanes + FORWARDS_WAITING - len(self.forwarding)
        for version_id, items in self.queue.take_ready(flush, limit=room):
            model = next((m for m in self.served.values() if m.version_id == version_id), None)
            if model is None:
                for item in items:
                    self.in_flight.discard(item.scan_id)
                continue
            assert self.forwarder is not None  # started with the engine, before any model was loaded
            self.forwarding.append(_Forwarding(model, items, self.forwarder.submit(forward, model, items)))
        if flush:
            done += self.take_forwarded(wait=True)
        self.store_written(wait_for_files=flush)
        return done

    def take_forwarded(self, wait: bool = False) -> int:
        """Turn the batches the forward thread has finished (all of them with ``wait``), oldest first,
        into outcomes whose heatmap files are being written; returns their scans. A forward pass that
        raised raises here, in the loop, as when it ran there."""
        done = 0
        while self.forwarding and (wait or self.forwarding[0].future.done()):
            batch = self.forwarding.pop(0)
            predictions, seconds = batch.future.result()
            self.storing.append(self._outcomes(batch.model, batch.items, predictions))
            done += len(batch.items)
            log.debug(
                "%s: batch of %d scans (%d inputs) in %.0f ms",
                batch.model.name,
                len(batch.items),
                sum(item.size for item in batch.items),
                seconds * 1000,
            )
        return done

    def store_written(self, wait_for_files: bool = False) -> None:
        """Commit, oldest first, the batches whose heatmap files are all written."""
        while self.storing and (wait_for_files or self.storing[0].written()):
            batch = self.storing.pop(0)
            wait([future for _, future in batch.writes])
            self._store(batch.version_id, self._without_unwritten(batch))

    def idle(self) -> bool:
        return (
            not self.preparing
            and not self.forwarding
            and not self.storing
            and len(self.queue) == 0
            and not self.loader.busy()
        )

    def next_deadline(self) -> float | None:
        now = time.monotonic()
        if self.storing or self.forwarding:
            return now + STORE_POLL
        deadline = now + LOAD_POLL if self.loader.busy() else self.queue.next_deadline()
        if self.preparing:  # inputs coming back from the decoding workers
            return min(now + STORE_POLL, deadline if deadline is not None else now + STORE_POLL)
        return deadline

    def _outcomes(self, model: ServedModel, items: list[QueuedScan], predictions: list[Prediction]) -> _Storing:
        shas = {item.scan_id: item.sha256 for item in items if item.sha256}
        if model.heatmaps and len(shas) < len(items):  # scans from the sweep of an older daemon's rows
            shas |= self._shas([item.scan_id for item in items if item.scan_id not in shas])
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
            key_maps = model.maps_of_the_call(rows, inputs, probs)
            files = heatmap_files(model, self.settings.heatmaps_dir, shas.get(item.scan_id), key_maps, inputs[key])
            if files:
                maps = [heatmap for _, heatmap in key_maps]
                view = self._view_path(model, shas[item.scan_id])
                write = self.writer.submit(
                    write_heatmap_files, files, maps, inputs[key], model.contract, view, self.settings.reports
                )
                writes.append((item.scan_id, write))
            outcomes.append(InferenceOutcome(item.scan_id, probs.tolist(), positive.tolist(), None, files, latency))
        return _Storing(model.version_id, outcomes, writes)

    def _view_path(self, model: ServedModel, sha: str) -> Path | None:
        """Where the scan as the model saw it goes for its report; None with reports off (a JPEG
        encode and a file per scan that nothing would read)."""
        return filing.view_path(self.settings.heatmaps_dir, sha, model.version_id) if self.settings.reports else None

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
        """Through ``commit``: a database outage here is waited out, not a lost batch of predictions."""

        def read(session: Session) -> dict[int, str]:
            return dict(session.execute(select(Scan.id, Scan.sha256).where(Scan.id.in_(ids))).all())  # type: ignore[arg-type]

        return self.commit(read)


def forward(model: ServedModel, items: list[QueuedScan]) -> tuple[list[Prediction], float]:
    """One batch through the model (in the forward thread): its predictions, and the seconds taken."""
    started = time.perf_counter()
    predictions = model.predict(np.concatenate([item.inputs for item in items]))
    return predictions, time.perf_counter() - started


def heatmap_files(
    model: ServedModel,
    heatmaps_dir: Path,
    sha: str | None,
    maps: Sequence[tuple[int, np.ndarray]],
    model_input: np.ndarray,
) -> list[HeatmapFile]:
    """A scan's heatmaps as their rows keep them, for its ``maps`` (label index, grid): read at the
    size of the ``model_input`` they were computed from, the overlays at ``filing.overlay_path``."""
    if not maps:
        return []
    assert sha is not None
    method = "cam" if model.model.cam_linear is not None else "gradcam"
    height, width = model_input.shape[-2:]
    return [
        HeatmapFile(
            label_index,
            grid_bytes(grid),
            filing.overlay_path(heatmaps_dir, sha, model.version_id, model.labels[label_index]),
            int(height),
            int(width),
            method,
        )
        for label_index, grid in maps
    ]


def write_heatmap_files(
    files: list[HeatmapFile],
    maps: list[np.ndarray],
    model_input: np.ndarray,
    contract: InputContract,
    view_path: Path | None = None,
    overlays: bool = False,
) -> None:
    """In a writer thread: with ``view_path``, the image the model saw, as the report embeds it
    (``report.images``); with ``overlays``, each map's overlay JPEG from its grid (``maps``): with
    reports on (every overlay is read by its report, and drawing it here, from the view
    in hand, cost half of drawing it in the report stage) and in ``medcli evaluate`` (which keeps no
    copy of the scan to draw it from later). Without, the first reader draws it from the map's row
    (``meddaemon.overlays``), and an overlay left from an earlier run of the same version is
    removed so that none is older than its map."""
    view = model_pixels(model_input, contract) if overlays or view_path is not None else None
    for file, grid in zip(files, maps, strict=True):
        if view is not None and overlays:
            write_atomically(file.overlay_path, jpeg_bytes(overlay(view, expand_one(grid, view.shape[:2]))))
        else:
            file.overlay_path.unlink(missing_ok=True)
    if view is not None and view_path is not None and max(view.shape[:2]) <= REPORT_VIEW_MAX_SIDE:
        write_atomically(view_path, jpeg_bytes(view))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
