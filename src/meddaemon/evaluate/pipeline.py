"""``medcli evaluate``: a cohort read in place, scored by a model version, written in bulk.

The local engine streams: decoding processes read chunks of files (at most ``2 x workers`` chunks
in flight, so memory stays bounded whatever the cohort's size), the driver gathers their model
inputs into large batches for the model (the faster of eager PyTorch and ONNX Runtime on the CPU,
CUDA when asked), and every second or so writes what is done in one transaction. What is written
stays written: a run stopped by Ctrl-C or killed resumes, file by file, where it stopped, because
bytes a model version scored before are never scored again (only hashed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon.workers import DecodingPool, wait_for
from meddaemon.db.engine import session_factory, transaction, with_unique_retry
from meddaemon.db.models import Evaluation, ModelVersion
from meddaemon.engine import registry
from meddaemon.engine.backend_cache import BACKEND_PROBE_BATCH, BackendCache
from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.inference import ServedModel, forward_lanes, limit_threads, pick_device
from meddaemon.engine.tasks import InputContract
from meddaemon.evaluate import store
from meddaemon.evaluate.cohort import Cohort, read_cohort
from meddaemon.evaluate.reading import FileRead, init_reader, prefixes, read_chunk, read_file
from meddaemon.evaluate.scoring import outcomes_of, stack
from meddaemon.evaluate.store import FileOutcome
from meddaemon.failures import FailureReason, ScanFailure
from meddaemon.names import is_utf8, shown_name, utf8_name
from meddaemon.training.datasets import DEFAULT_MAX_BAD_FRACTION

log = logging.getLogger("meddaemon.evaluate")

ENGINES = ("local", "ray")
#: seconds between two writes of what is done (and two progress updates)
FLUSH_SECONDS = 1.0


class EvaluationStopped(RuntimeError):
    """The run stopped before the end: too many unreadable files, a model refused. Done work is kept,
    and the run's row says so (``evaluation_id``, once it has one: its summary lists what was read)."""

    evaluation_id: int | None = None
    #: what the dataset's layout says of it (``layout_notes``): the stopped run's summary shows it too
    layout_notes: dict[str, Any] | None = None


class TooManyUnreadable(EvaluationStopped):
    """More of the dataset's files than ``max_bad_fraction`` cannot be read: the dataset is at fault."""


@dataclass(frozen=True)
class EvaluationRequest:
    path: Path
    task: str
    model_version: str | None = None
    name: str | None = None
    heatmaps: bool = False
    batch_size: int = 64
    #: decoding processes; 0 decodes in the driver (slow; for tests and debugging)
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))
    device: str = "auto"
    engine: str = "local"
    ray_address: str | None = None
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    #: the run is to be audited against its layout's labels: a cohort without any is refused first
    audit: bool = False

    def parameters(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    #: files done a second, those only hashed (already scored) among them
    files_per_second: float


ProgressFn = Callable[[Progress], None]


@dataclass
class EvaluationOutcome:
    evaluation_id: int
    name: str
    state: str
    summary: dict[str, Any]


@dataclass
class Prepared:
    """Everything an engine needs: the cohort, the verified model, the scored set, the run's row."""

    request: EvaluationRequest
    settings: Settings
    cohort: Cohort
    version: ModelVersion
    model: ServedModel
    scored: np.ndarray
    evaluation_id: int
    decode_options: DecodeOptions

    @property
    def paths(self) -> list[str]:
        return [str(p) for p in self.cohort.files]

    @property
    def model_folder(self) -> Path:
        """The version's folder: its weights, and the backend choice kept beside them."""
        return self.settings.stored_file(self.version.path)


def dataset_path(path: Path) -> Path:
    """``path`` made absolute, each ``..`` taking away the name before it, as the shell's ``cd``
    does: ``x/..`` and ``.`` name one folder, and its evaluation's default name and stored path are
    its own, not ``..``'s. Links are kept as given: ``/data`` is not swapped for the mount it
    points to, which another Ray node may reach under ``/data`` only."""
    return Path(os.path.normpath(path.absolute()))


def run_evaluation(
    db: Engine, settings: Settings, request: EvaluationRequest, progress: ProgressFn | None = None
) -> EvaluationOutcome:
    """Evaluate ``request.path``; raises EvaluationStopped (after recording why), KeyboardInterrupt
    (after recording the run as interrupted), store.EvaluationError for bad usage."""
    check_request(request)
    request = replace(request, path=dataset_path(request.path))
    if not is_utf8(request.path):
        raise store.EvaluationError(
            f"{shown_name(request.path)}: the dataset's path is not UTF-8, and is stored to audit "
            "the run again; give it a UTF-8 name (a symbolic link will do). Names inside it may be anything"
        )
    specs = settings.task_specs
    if request.task not in specs:
        raise store.EvaluationError(f"unknown task {request.task!r}; tasks: {', '.join(sorted(specs))}")
    cohort = read_cohort(request.path, specs[request.task])
    if request.audit and cohort.index is None:
        raise store.EvaluationError(cohort.unlabelled())
    sessions = session_factory(db)
    with sessions() as session:
        version = find_model_version(session, request.task, request.model_version)
        scored = prefixes(store.scored_shas(session, version, with_heatmaps=request.heatmaps))
        name = request.name or default_name(session, request.path, cohort, version)
        graphs = registry.kept_graphs(session, version.id)
        session.expunge(version)
    with store.one_run_at_a_time(db, name):
        options = settings.decode_options
        decoders = None
        if request.engine == "local":
            # started first: their start-up (torch, the decoders) overlaps the model's verification
            contract = InputContract.from_dict(version.manifest["input_contract"])
            decoders = Decoders(
                cohort.files, contract, options, scored, request.workers, request.batch_size,
                settings.read_timeout_seconds,
            )  # fmt: skip
        try:
            model = _serve(settings, request, version, graphs, registry.graph_recorder(sessions, version.id))
            prepared = Prepared(request, settings, cohort, version, model, scored, 0, options)
            return _run(sessions, name, prepared, decoders, progress)
        finally:
            if decoders is not None:
                decoders.close()


#: the longest evaluation name (``evaluations.name``)
MAX_NAME = 255


#: how long the head at ``--ray-address`` may take to accept a connection, and to answer as a gRPC
#: server does, before the run is refused
RAY_CONNECT_SECONDS = 5.0
#: HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, Ray
#: Client's server) answers with a SETTINGS frame of its own (RFC 9113, 3.4)
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def ray_address_unreachable(address: str) -> str | None:
    """Why no Ray head answers at ``address`` (or this process cannot talk to one), or None.
    ``ray.init`` retries for ever an address nothing answers at (a wrong port, a typo) or where
    another service listens (a database's port), printing only its own warnings; 'auto' and 'local'
    are Ray's own to resolve. A cluster whose gRPC is TLS (``RAY_USE_TLS``) is only connected to."""
    if address in ("auto", "local"):
        return None
    if "://" in address.removeprefix("ray://"):  # http://HOST:PORT, a dashboard's address: said as a DNS failure
        return "not HOST:PORT (or ray://HOST:PORT, 'auto', 'local')"
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return "not HOST:PORT (or ray://HOST:PORT, 'auto', 'local')"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_SECONDS) as connection:
            if address.startswith("ray://") and not _has_ray_client():
                return "a ray:// address needs Ray Client (pip install 'ray[client]'), not installed here"
            if os.environ.get("RAY_USE_TLS", "").lower() in ("1", "true"):
                return None
            connection.sendall(HTTP2_PREFACE)
            answer = _read_up_to(connection, 9)
    except OSError as exc:
        return f"nothing answers there ({exc.strerror or type(exc).__name__})"
    if len(answer) < 9 or answer[3] != HTTP2_SETTINGS:
        return "what answers there is no Ray head (no gRPC server: another service's port?)"
    return None


def _read_up_to(connection: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes, fewer where the peer closes or is silent for ``RAY_CONNECT_SECONDS``."""
    data = b""
    try:
        while len(data) < size and (chunk := connection.recv(size - len(data))):
            data += chunk
    except TimeoutError:
        pass
    return data


def _has_ray_client() -> bool:
    """Ray Client's own test (gRPC importable): without it ``ray.init("ray://...")`` raised a ValueError."""
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


def check_request(request: EvaluationRequest) -> None:
    """Refuse, before anything starts, what this request asks and no engine here can do."""
    if request.name is not None and len(request.name) > MAX_NAME:  # PostgreSQL refused it with a traceback
        raise store.EvaluationError(f"--name is at most {MAX_NAME} characters, not {len(request.name)}")
    if request.engine not in ENGINES:
        raise store.EvaluationError(f"unknown engine {request.engine!r}; one of {', '.join(ENGINES)}")
    if request.ray_address is not None and request.engine != "ray":  # a local run, where a cluster was meant
        raise store.EvaluationError(f"--ray-address is for --engine ray, not --engine {request.engine}")
    if request.ray_address is not None and not request.ray_address.strip():  # "$RAY_HEAD" unset: a local Ray
        raise store.EvaluationError("--ray-address is empty; give the head's HOST:PORT, 'auto' or 'local'")
    if request.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise store.EvaluationError("the Ray engine needs Ray: pip install 'meddaemon[ray]'") from None
        why = ray_address_unreachable(request.ray_address) if request.ray_address else None
        if why is not None:
            raise store.EvaluationError(
                f"--ray-address {request.ray_address}: {why}; start the cluster (ray start --head) or give its "
                "head's address"
            )
    if request.engine == "local" and request.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise store.EvaluationError(
                f"--device {request.device}: no CUDA device is available here; use --device cpu or auto"
            )


def _serve(
    settings: Settings,
    request: EvaluationRequest,
    version: ModelVersion,
    graphs: dict[str, str],
    record_graph: Callable[[str, str], None],
) -> ServedModel:
    """The version verified, served from the graph an earlier run kept when there is one (``graphs``:
    the hashes recorded of those kept); otherwise its network, the backend chosen when the first batch
    is scored (``_Batcher``: a rerun scores none)."""
    from meddaemon.engine.serving import serve_version

    limit_threads(settings.inference_threads)
    # with Ray the driver's copy only scores the odd file again: the actors hold the GPUs
    wanted = request.device if request.device != "auto" else settings.device
    device = pick_device("cpu" if request.engine == "ray" else wanted)
    lanes = forward_lanes(settings.concurrent_batches, device) if request.engine == "local" else 1
    folder = settings.stored_file(version.path)
    batch = min(request.batch_size, BACKEND_PROBE_BATCH)
    try:
        return serve_version(
            folder,
            version.id,
            device,
            heatmaps=request.heatmaps,
            batch=batch,
            lanes=lanes,
            choose=False,
            registered=registry.Registered(version.sha256, dict(version.manifest or {}), graphs),
            record_graph=record_graph,
        )
    except registry.ModelRefused as refusal:
        raise EvaluationStopped(
            f"model {version.task_name}/{version.version} refused: {refusal.reason} ({refusal.message})"
        ) from None


def _run(
    sessions: sessionmaker[Session],
    name: str,
    prepared: Prepared,
    decoders: Decoders | None,
    progress: ProgressFn | None,
) -> EvaluationOutcome:
    request, cohort, version = prepared.request, prepared.cohort, prepared.version
    with transaction(sessions) as session:
        earlier = store.evaluation_values(session, name)
        evaluation = store.open_evaluation(
            session, name=name, version=version, dataset_path=request.path, layout=cohort.layout,
            engine=request.engine, files_total=len(cohort.files), parameters=request.parameters(),
        )  # fmt: skip
        prepared.evaluation_id = evaluation_id = evaluation.id
    log.info(
        "evaluation %d (%s): %d files of %s, model %s",
        evaluation_id, name, len(cohort.files), cohort.root, prepared.model.name,
    )  # fmt: skip
    writer = Writer(sessions, prepared, progress)
    state: str = store.INTERRUPTED
    message: str | None = None
    outcomes: Iterator[tuple[FileOutcome, Future | None] | None] | None = None
    received = refused = False
    try:
        with ctrl_c_noted() as interrupted:
            if decoders is None:
                from meddaemon.evaluate.ray_engine import ray_outcomes

                outcomes = ray_outcomes(prepared)
            else:
                outcomes = local_outcomes(prepared, decoders)
            for item in outcomes:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                if item is None:  # the engine waits (a Ray run stalled): what came back is written meanwhile
                    writer.flush_when_due()
                    continue
                received = True
                writer.add(*item)
            writer.flush(final=True)
        state = store.COMPLETED
    except EvaluationStopped as exc:
        state, message = store.STOPPED, str(exc)
        exc.evaluation_id = evaluation_id
        exc.layout_notes = layout_notes(prepared.cohort)
        writer.flush(final=True, check=False)
        raise
    except store.EvaluationError as exc:  # the engine refused the request (a cluster without GPUs, or unreachable)
        state, message = store.STOPPED, str(exc)
        if not received:
            refused = True
            raise
        # refused by a retry, with files written (the cluster lost mid-run): the run stopped, not a usage error
        stopped = EvaluationStopped(message)
        stopped.evaluation_id, stopped.layout_notes = evaluation_id, layout_notes(prepared.cohort)
        writer.flush(final=True, check=False)
        raise stopped from exc
    except Exception as exc:
        state, message = store.STOPPED, f"{type(exc).__name__}: {exc}"
        raise
    except BaseException as exc:  # Ctrl-C, or SystemExit: Ray's driver turns SIGTERM into one
        why = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "a signal"
        state, message = store.INTERRUPTED, f"stopped by {why}; run the same command again to resume"
        writer.flush(final=True, check=False)
        raise
    finally:
        if outcomes is not None:
            outcomes.close()  # stops the decoding processes, or the Ray run, before the row says how it ended
        if decoders is not None:
            decoders.close()
        writer.close()
        with transaction(sessions) as session:
            row = session.get(Evaluation, evaluation_id)
            assert row is not None
            if refused:  # nothing was run: the evaluation stays as it was (the refusal is raised)
                store.put_back(session, evaluation_id, earlier)
            else:
                store.forget_files_gone(session, evaluation_id, (utf8_name(cohort.relative(f)) for f in cohort.files))
                if state == store.COMPLETED and (left := store.left_to_daemon(session, evaluation_id)):
                    message = (
                        f"{left} files left to the daemon, which is still working on the same bytes; "
                        "run the same command again once it has scored them"
                    )
                store.finish_evaluation(session, row, state, message, writer.images_per_second())
    with sessions() as session:
        row = session.get(Evaluation, evaluation_id)
        assert row is not None
        summary = {**store.evaluation_summary(session, row), **layout_notes(prepared.cohort)}
        return EvaluationOutcome(evaluation_id, row.name, row.state, summary)


def layout_notes(cohort: Cohort) -> dict[str, Any]:
    """What the dataset's layout says of it, for the run's summary: the files it leaves out, and why
    (an IDC patch named class0 filed under ``1/``), and its warnings (a manifest's repeated rows, a
    BUSI folder not of the task), which went unmentioned."""
    index = cohort.index
    skipped = index.skipped if index is not None else []
    return {
        "left_out": [{"path": cohort.relative(s.path), "message": s.reason} for s in skipped],
        "warnings": list(index.warnings) if index is not None else list(cohort.warnings),
    }


@contextmanager
def ctrl_c_noted() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt, as Python's own handler does, and is noted too. Python runs
    a signal's handler wherever the main thread is: inside a finaliser (a ``__del__`` the garbage
    collector calls at that moment) the exception is dropped ("Exception ignored in ..."), and a run
    sent SIGINT went on to its end and exited 0. The run checks the note at every file."""
    noted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum: int, frame: object) -> None:
        noted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def find_model_version(session: Session, task: str, version: str | None) -> ModelVersion:
    """The named version of ``task``, or its active one. Not the audit's fallback to the newest with
    results: with none active that was a retired version, out of service for good, scoring new files."""
    from meddaemon.audit.predictions import AuditInputError, find_version

    if version is None:
        query = select(ModelVersion).where(ModelVersion.task_name == task)
        active = session.scalars(query.where(ModelVersion.status == "active")).first()
        if active is not None:
            return active
        known = ", ".join(f"{v.version} ({v.status})" for v in session.scalars(query.order_by(ModelVersion.id)))
        raise store.EvaluationError(
            f"task {task!r} has no active model version; name one with --model VERSION (known: {known or 'none'})"
        )
    try:
        return find_version(session, task, version)
    except AuditInputError as exc:
        raise store.EvaluationError(str(exc)) from None


def default_name(session: Session, path: Path, cohort: Cohort, version: ModelVersion) -> str:
    """``<dataset>-<task>-<version>``, the dataset named by its folder (a manifest by its file's
    stem): the same command names the same evaluation, so running it again resumes or refreshes it.
    Where that name is another dataset's (every copy of BUSI is ``Dataset_BUSI_with_GT``), eight
    hex digits of the path's SHA-256 join it. A dataset name too long for the column is cut."""
    suffix = f"-{version.task_name}-{version.version}"

    def named(dataset: str, suffix: str = suffix) -> str:
        return dataset[: MAX_NAME - len(suffix)] + suffix

    def holder(name: str) -> str | None:
        return session.scalars(select(Evaluation.dataset_path).where(Evaluation.name == name)).one_or_none()

    if path.is_file() and holder(by_folder := named(cohort.root.name)) == str(path):
        return by_folder  # a manifest's run begun by an earlier release, which named it by its folder
    dataset = path.stem if path.is_file() else cohort.root.name
    taken = holder(name := named(dataset))
    if taken is None or taken == str(path):
        return name
    return named(dataset, f"-{hashlib.sha256(os.fsencode(path)).hexdigest()[:8]}{suffix}")


class Writer:
    """The driver's side: outcomes gathered and written in one transaction every ``FLUSH_SECONDS``
    (heatmap files first), progress reported, the unreadable fraction watched."""

    def __init__(self, sessions: sessionmaker[Session], prepared: Prepared, progress: ProgressFn | None) -> None:
        self.sessions = sessions
        self.prepared = prepared
        self.progress = progress
        self.total = len(prepared.cohort.files)
        self.pending: list[tuple[FileOutcome, Future | None]] = []
        self.done = 0
        #: files decoded and run through the model (scored, a copy of a file scored in the run, or
        #: given the heatmaps they lacked): the files only hashed would make a rerun's images/s that of hashing
        self.forwarded = 0
        self.failed = 0
        self.not_images = 0
        self.started = time.monotonic()
        self.last_flush = self.started
        self.ended: float | None = None

    def add(self, outcome: FileOutcome, write: Future | None = None) -> None:
        self.pending.append((outcome, write))
        self.flush_when_due()

    def flush_when_due(self) -> None:
        if self.pending and time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self, final: bool = False, check: bool = True) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            unwritten = self._unwritten(batch)
            outcomes = [o for o, _ in batch if o.read.path not in unwritten]
            counts = with_unique_retry(lambda outcomes=outcomes: self._record(outcomes), _log_recorded_first)
            self.done += len(outcomes) - len(counts.redo)
            self.forwarded += counts.forwarded
            self.failed += counts.failed
            self.not_images += counts.not_images
            self.last_flush = time.monotonic()
            if counts.redo:
                self.pending += score_in_driver(self.prepared, counts.redo)
            self._report()  # before a stop for unreadable files: the count of the files it read
            if check:
                self._check_unreadable()
            if not final:
                break
        if final:
            self.ended = time.monotonic()

    def _record(self, outcomes: list[FileOutcome]) -> store.ChunkCounts:
        with transaction(self.sessions) as session:
            evaluation = session.get(Evaluation, self.prepared.evaluation_id)
            version = session.get(ModelVersion, self.prepared.version.id)
            assert evaluation is not None and version is not None
            return store.record_chunk(session, evaluation, version, outcomes, self.prepared.settings.state_dir)

    def close(self) -> None:
        if self.ended is None:
            self.ended = time.monotonic()

    def images_per_second(self) -> float | None:
        """The run's rate of images through the model; None when none went through it."""
        seconds = (self.ended or time.monotonic()) - self.started
        return self.forwarded / seconds if seconds > 0 and self.forwarded else None

    def _files_per_second(self) -> float:
        seconds = time.monotonic() - self.started
        return self.done / seconds if seconds > 0 else 0.0

    def _unwritten(self, batch: Sequence[tuple[FileOutcome, Future | None]]) -> set[str]:
        """Files whose heatmaps could not be written (a full disk): left out, scored again next run."""
        futures = [w for _, w in batch if w is not None]
        wait(futures)
        unwritten = set()
        for outcome, write in batch:
            if write is not None and write.exception() is not None:
                log.error("%s: heatmap files not written (%s)", shown_name(outcome.read.path), write.exception())
                unwritten.add(outcome.read.path)
        return unwritten

    def _check_unreadable(self) -> None:
        """Files that are no image at all are left out of the fraction, as training leaves them out:
        a PACS export's structured reports would otherwise hide unreadable images. Only the ones seen
        so far are left out, so the fraction can only grow as the run goes on, never stop it wrongly."""
        limit = self.prepared.request.max_bad_fraction
        images = self.total - self.not_images
        if images and self.failed / images > limit:
            raise TooManyUnreadable(
                f"{self.failed} of {images} images cannot be read (more than {limit:.0%}); "
                "fix the dataset (the files read so far are listed with their reasons)"
            )

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(Progress(self.done, self.total, self._files_per_second()))


def score_in_driver(prepared: Prepared, reads: Sequence[FileRead]) -> list[tuple[FileOutcome, Future | None]]:
    """Decode and score a few files in the driver (known bytes whose scan lost its results)."""
    empty = np.zeros(0, dtype=np.uint64)
    contract = prepared.model.contract
    root = prepared.cohort.root
    fresh = relative_names(
        root, [read_file(str(root / r.path), contract, prepared.decode_options, empty) for r in reads]
    )
    failed: list[tuple[FileOutcome, Future | None]] = [(FileOutcome(r), None) for r in fresh if r.inputs is None]
    ready = [r for r in fresh if r.inputs is not None]
    if not ready:
        return failed
    return failed + outcomes_of(prepared.model, ready, prepared.model.predict(stack(ready)))


#: what the decoding processes' forkserver imports once, before its first fork (``DecodingPool``'s ``preload``)
DECODERS_PRELOAD = ("meddaemon.evaluate.reading",)
#: the longest a decoding process is waited for to start (its imports), where ``read_timeout`` is shorter
PROCESS_START_SECONDS = 120.0


class Decoders:
    """The decoding processes and the chunks of files they read: at most two chunks per process in
    flight, so memory stays bounded whatever the cohort's size. With no process (``workers`` 0)
    the files are read in the driver, one chunk at a time.

    The processes fork from a forkserver that imported the readers (torch, the decoders) once, and
    the first chunks are handed to them from a thread of their own, which waits for that import, so
    that the driver meanwhile loads and verifies the model.

    A process that dies (a native decoder's segfault, the kernel's OOM killer) or a chunk not read
    after ``read_timeout`` seconds (a decoder caught in a loop) costs the run nothing but time: the
    chunks in hand are read again one file at a time, and the file that harms its process again
    fails with the daemon's reason (``decoder_crashed``, ``decode_timeout``). Either stopped the run,
    or held it for ever."""

    def __init__(
        self,
        files: Sequence[Path],
        contract: InputContract,
        options: DecodeOptions,
        scored: np.ndarray,
        workers: int,
        batch_size: int,
        read_timeout: float,
    ) -> None:
        per_task = max(4, min(32, batch_size // max(1, workers)))
        paths = [str(p) for p in files]
        self.chunks = iter([paths[i : i + per_task] for i in range(0, len(paths), per_task)])
        self.contract, self.options, self.scored = contract, options, scored
        self.read_timeout = read_timeout
        self.window: deque[tuple[list[str], Future]] = deque()
        #: the read of one file alone (``_read_alone``): a close while it runs kills the processes too
        self.alone: Future = Future()
        self.alone.set_result([])
        self.limit = 2 * workers
        self.pool: DecodingPool | None = None
        #: done once the first chunks are handed out, with what stopped that if anything did
        self.started: Future[None] = Future()
        #: a task ahead of the chunks, done once a process of the current pool has started
        self.first_process: Future | None = None
        if workers:
            self.pool = DecodingPool(workers, preload=DECODERS_PRELOAD, initializer=init_reader, initargs=(scored,))
            self.pool.start()
            threading.Thread(target=self._first_fill, name="decoders-start", daemon=True).start()

    def __iter__(self) -> Iterator[list[FileRead]]:
        if self.pool is None:
            for chunk in self.chunks:
                yield read_chunk(chunk, self.contract, self.options, self.scored)
            return
        self.started.result()
        self._wait_for_a_process()
        while self.window:
            try:
                reads = wait_for(self.window[0][1], self.read_timeout)
            except (BrokenProcessPool, TimeoutError) as exc:
                yield from self._read_again_alone(timed_out=isinstance(exc, TimeoutError))
                self._fill()
                continue
            self.window.popleft()
            self._fill()  # before the model takes these: the processes read on meanwhile
            yield reads

    def _fill(self) -> None:
        assert self.pool is not None
        while len(self.window) < self.limit:
            chunk = next(self.chunks, None)
            if chunk is None:
                return
            self.window.append((chunk, self.pool.submit(read_chunk, chunk, self.contract, self.options)))

    def _first_fill(self) -> None:
        try:
            self.first_process = self.pool.started() if self.pool is not None else None
            self._fill()
        except BaseException as exc:  # raised in the driver, by ``__iter__``
            self.started.set_exception(exc)
        else:
            self.started.set_result(None)

    def _read_again_alone(self, timed_out: bool) -> Iterator[list[FileRead]]:
        """The chunks in hand after a process died or a read did not end: those read whole as they
        were, the others one file at a time in fresh processes."""
        assert self.pool is not None
        in_hand = list(self.window)
        self.window.clear()
        log.warning(
            "a decoding process %s; reading the %d files in hand again one at a time",
            f"had not ended a read after {self.read_timeout:.0f} s" if timed_out else "died",
            sum(len(chunk) for chunk, _ in in_hand),
        )
        self._fresh_pool()
        for chunk, future in in_hand:
            if future.done() and not future.cancelled() and future.exception() is None:
                yield future.result()
            else:
                yield [self._read_alone(path) for path in chunk]

    def _read_alone(self, path: str) -> FileRead:
        assert self.pool is not None
        self.alone = self.pool.submit(read_chunk, [path], self.contract, self.options)
        try:
            [read] = wait_for(self.alone, self.read_timeout)
            return read
        except BrokenProcessPool:
            failure = ScanFailure(FailureReason.DECODER_CRASHED, "the decoder crashed on this file")
        except TimeoutError:
            why = (
                f"its read had not ended after {self.read_timeout:.0f} s (read_timeout_seconds); its process was killed"
            )
            failure = ScanFailure(FailureReason.DECODE_TIMEOUT, why)
        log.warning("%s: %s: %s", shown_name(path), failure.reason.value, failure)
        self._fresh_pool()
        return FileRead(path, failure=failure)

    def _fresh_pool(self) -> None:
        """New processes in place of the old, killed, and one of them started, so that its start (its
        imports: seconds on a busy machine) does not count against the next file's timeout."""
        assert self.pool is not None
        self.pool.replace(kill=True)
        self.first_process = self.pool.started()
        self._wait_for_a_process()

    def _wait_for_a_process(self) -> None:
        """Wait until a process of the pool has started (``first_process``, ahead of the chunks in its
        queue): a read's timeout counts from there. Counted from the wait for the first chunk, a
        process's start on a busy machine (its imports: seconds) timed healthy reads out."""
        if self.first_process is None:
            return
        try:
            wait_for(self.first_process, max(self.read_timeout, PROCESS_START_SECONDS))
        except (BrokenProcessPool, TimeoutError):
            raise RuntimeError("no decoding process could be started") from None

    def close(self) -> None:
        if self.pool is not None:
            self.started.exception()  # waits for the start; what stopped it, if anything, matters no more
        unfinished = any(not future.done() for _, future in self.window) or not self.alone.done()
        for _, future in self.window:
            future.cancel()
        self.window.clear()
        if self.pool is not None:
            self.pool.shutdown(kill=unfinished)  # a read that does not end is not waited for
            self.pool = None


def local_outcomes(prepared: Prepared, decoders: Decoders) -> Iterator[tuple[FileOutcome, Future | None]]:
    """The local engine: decoding processes feed large batches to the model in this process."""
    request = prepared.request
    heatmaps_dir = prepared.settings.heatmaps_dir if request.heatmaps else None
    writers = ThreadPoolExecutor(2, thread_name_prefix="heatmap-writer") if heatmaps_dir else None
    batch = _Batcher(prepared, heatmaps_dir, writers)
    try:
        for reads in decoders:
            yield from batch.take(relative_names(prepared.cohort.root, reads))
        yield from batch.finish()
    finally:
        batch.close()
        if writers is not None:
            writers.shutdown(wait=True)


def relative_names(root: Path, reads: list[FileRead]) -> list[FileRead]:
    """Files are named relative to the dataset root in the database (a manifest's may lie elsewhere).
    The cohort's files are named from its root, so a prefix is all most take (pathlib's parsing was
    6 % of the driver's CPU)."""
    prefix = os.path.join(str(root), "")
    for read in reads:
        if read.path.startswith(prefix):
            read.path = read.path[len(prefix) :].replace(os.sep, "/")
            continue
        path = Path(read.path)
        read.path = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    return reads


class _Batcher:
    """Decoded files gathered until a batch is full; failed and known files pass straight through.

    Full batches go to the model in threads of their own, as many at once as the model has lanes
    (``ServedModel.lanes``), and one more waits behind them, so that the driver goes on taking the
    decoded files meanwhile; their outcomes come back in the order of the batches."""

    def __init__(self, prepared: Prepared, heatmaps_dir: Path | None, writers: ThreadPoolExecutor | None) -> None:
        self.model = prepared.model
        self.folder = prepared.model_folder
        self.size = prepared.request.batch_size
        self.heatmaps_dir = heatmaps_dir
        self.writers = writers
        self.waiting: list[FileRead] = []
        self.rows = 0
        self.forwarder: ThreadPoolExecutor | None = None
        self.forwarding: deque[tuple[list[FileRead], Future]] = deque()

    def take(self, reads: Iterable[FileRead]) -> Iterator[tuple[FileOutcome, Future | None]]:
        for read in reads:
            if read.inputs is None:
                yield FileOutcome(read), None
                continue
            self.waiting.append(read)
            self.rows += int(read.inputs.shape[0])
            if self.rows >= self.size:
                self._forward()
                yield from self._forwarded(beyond=self.model.lanes)
        yield from self._forwarded(beyond=self.model.lanes)

    def finish(self) -> Iterator[tuple[FileOutcome, Future | None]]:
        """The outcomes of every batch still in the model, and of the last, partial one."""
        self._forward()
        yield from self._forwarded(beyond=0)

    def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.shutdown(wait=True, cancel_futures=True)

    def _forward(self) -> None:
        if not self.waiting:
            return
        reads, self.waiting, self.rows = self.waiting, [], 0
        if self.forwarder is None:  # the backend measured only when something is to be scored (a rerun never is)
            if not self.model.chosen:
                self.model.choose_backend(min(self.size, BACKEND_PROBE_BATCH), BackendCache(self.folder))
            self.forwarder = ThreadPoolExecutor(self.model.lanes, thread_name_prefix="forward")
        self.forwarding.append((reads, self.forwarder.submit(self.model.predict, stack(reads))))

    def _forwarded(self, beyond: int) -> Iterator[tuple[FileOutcome, Future | None]]:
        """Outcomes of the oldest batches: those done, and others waited for while more than
        ``beyond`` are in the model."""
        submit = self.writers.submit if self.writers is not None else None
        while self.forwarding and (len(self.forwarding) > beyond or self.forwarding[0][1].done()):
            reads, future = self.forwarding.popleft()
            yield from outcomes_of(self.model, reads, future.result(), self.heatmaps_dir, submit)


def _log_recorded_first(exc: IntegrityError) -> None:
    """The daemon or another evaluation recorded the same bytes at the same moment: the chunk is
    written again, and finds their scan."""
    log.info("another process recorded the same scan first (%s); writing the chunk again", type(exc.orig).__name__)
