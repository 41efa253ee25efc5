"""The Ray engine (``pip install meddaemon[ray]``; docs/design.md section 14): Ray Data reads the
file list, decodes in CPU tasks, runs the model in an actor pool (``map_batches`` with a callable
class, one GPU per actor on GPU nodes) and streams the outcomes back to the driver, which writes
them to the database in bulk like the local engine. With heatmaps, each actor computes them with the
served model as the local engine does (eager PyTorch when they need the gradient) and returns the
key frame's maps; the driver writes their files beside the daemon's.

The model travels to the actors as its version folder's path: each actor loads it with the
registry's verification (the weights' SHA-256, safetensors only, the self-test), so a node whose
copy differs refuses it by name; nothing of it is pickled. Files must be readable at the same path
on every node (a shared mount). A lost worker's tasks are retried by Ray, and when Ray gives up on
a run (an actor lost with its node before it could start), or waits ``ray_stall_seconds`` without
results after a node's loss (Ray Data can wait forever then), the driver shuts the run's executors
down (``ray_executors``), ends the job and runs the files not yet returned again in a new one; it
writes each file once whatever comes back twice, and bytes already scored are reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddaemon.engine.decode.types import ScanMetadata
from meddaemon.evaluate.pipeline import EvaluationStopped, Prepared, relative_names
from meddaemon.evaluate.ray_workers import REFUSED, ModelActor, decode_batch, unpack_maps
from meddaemon.evaluate.reading import FileRead
from meddaemon.evaluate.scoring import with_heatmaps
from meddaemon.evaluate.store import EvaluationError, FileOutcome
from meddaemon.failures import FailureReason, ScanFailure

if TYPE_CHECKING:
    from meddaemon.evaluate import ray_executors

log = logging.getLogger("meddaemon.evaluate")

#: files per decoding task: on a busy 2-core machine Ray Data started a task every 0.2 s while one
#: decoded 16 PNGs in 30 ms, so fewer, larger tasks keep the model fed
DECODE_BATCH = 64
#: Ray runs over the files not yet returned, when one fails (an actor lost with its node before
#: Ray Data could restart it): the files already written are not run again
RAY_ATTEMPTS = 3
#: memory a decoding task reserves (bytes): one decoded image at a time and 64 model inputs, with room
DECODE_MEMORY = 768 * 2**20
#: how long a run given up waits for Ray Data's iteration to end once its executors are shut down
STOP_SECONDS = 30.0
#: Ray's authentication mode, an environment variable of the process (``ray_session``)
AUTH_MODE = "RAY_AUTH_MODE"


def ray_outcomes(prepared: Prepared) -> Iterator[tuple[FileOutcome, Future | None] | None]:
    """Each file's outcome as Ray returns it, and None while nothing comes (about once a second), so
    that what came back is written meanwhile."""
    try:
        import ray
    except ImportError:
        raise EvaluationStopped("the Ray engine needs Ray: pip install 'meddaemon[ray]'") from None
    seen: set[str] = set()
    writers = ThreadPoolExecutor(2, thread_name_prefix="heatmap-writer") if prepared.request.heatmaps else None
    try:
        for attempt in range(1, RAY_ATTEMPTS + 1):
            remaining = [str(p) for p in prepared.cohort.files if str(p) not in seen]
            if not remaining:
                return
            try:
                # a session per attempt: leaving it ends the job, and with it a stalled run's actors and tasks
                with ray_session(ray, prepared.request.ray_address):
                    yield from _run(ray, prepared, remaining, seen, writers)
                return
            except (ray.exceptions.RayError, RunStalled) as exc:
                if attempt == RAY_ATTEMPTS:
                    raise
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                left = len(prepared.cohort.files) - len(seen)
                log.warning("the Ray run failed (%s: %s); running the %d files not yet returned again",
                            type(exc).__name__, first_line, left)  # fmt: skip
    finally:
        if writers is not None:
            writers.shutdown(wait=True)


@contextlib.contextmanager
def ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """Ray for one run, left as it was found: the cluster at ``address``, else a new local Ray on
    this machine's cores (``address="local"``: never a cluster that ``RAY_ADDRESS`` or the last
    ``ray start`` here names); a process already connected keeps its own Ray.

    A local start turns Ray's token authentication on for the whole process (``RAY_AUTH_MODE``);
    left on, a later run in the same process could not start its actors on a cluster without
    tokens, so the mode is put back when the run leaves."""
    if ray.is_initialized():
        yield
        return
    auth_mode = os.environ.get(AUTH_MODE)
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    local = None if address else local_ray_folder()
    try:
        if local is None:
            _join(ray, address, quiet)
        else:
            ray.init(address="local", include_dashboard=False, _temp_dir=str(local), **quiet)
        yield
    except (EvaluationStopped, EvaluationError):
        raise  # the run's own refusal (too many unreadable files, no GPU): not Ray's to explain
    except Exception:
        if local is not None:
            log.warning("the local Ray's logs of this run are kept in %s", local)
            local = None
        raise
    finally:
        ray.shutdown()
        _restore_auth_mode(auth_mode)
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)


def _join(ray: Any, address: str | None, quiet: dict[str, Any]) -> None:
    """Join the cluster at ``address``; one Ray cannot join ('auto' with none running, a head whose
    token this process lacks) is refused (``EvaluationError``, exit 2), not Ray's traceback."""
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:
        first_line = next(iter(str(exc).splitlines()), "")
        raise EvaluationError(
            f"--ray-address {address}: Ray could not join the cluster ({type(exc).__name__}: {first_line}); start "
            "it (ray start --head), give its head's address, or, where the head asks for a token, give its token "
            "(RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH names, by default ~/.ray/auth_token)"
        ) from None


#: the longest folder a local Ray's session may be made in: its socket paths must fit in 107 bytes
RAY_FOLDER_LIMIT = 48


def local_ray_folder() -> Path:
    """The folder of a local Ray's session (its sockets, logs, spilled objects): one of the run's own,
    removed after a run that ended well, where Ray's default, ``<temp>/ray``, gains a session folder
    at every start. Where Ray's own would be (``RAY_TMPDIR``, else ``TMPDIR``, else ``/tmp``), made
    if missing as Ray makes it; ``/tmp`` where that path is too long for Ray's sockets."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    if len(base) > RAY_FOLDER_LIMIT:
        base = "/tmp"
    os.makedirs(base, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="mdray-", dir=base))


def _restore_auth_mode(mode: str | None) -> None:
    if os.environ.get(AUTH_MODE) == mode:
        return
    if mode is None:
        os.environ.pop(AUTH_MODE, None)
    else:
        os.environ[AUTH_MODE] = mode
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    # as Ray's own tests reset it: the configuration read again, then the cached token dropped
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _run(
    ray: Any, prepared: Prepared, paths: list[str], seen: set[str], writers: ThreadPoolExecutor | None
) -> Iterator[tuple[FileOutcome, Future | None] | None]:
    """One Ray Data run over ``paths``; what comes back is added to ``seen`` (absolute paths). With
    ``writers``, the heatmaps the actors return are written in them. A retry takes the cluster's size
    as it is at its start (its actors start again, the model loaded anew: longer than a stall);
    another node lost still stalls it."""
    request = prepared.request
    contract = prepared.model.contract
    nodes = _alive_nodes(ray)
    plan = plan_actors(ray.cluster_resources(), nodes, request.device)
    if not plan.gpu:  # the actors serve the graph kept with the version, exported and recorded here once
        prepared.model.keep_graph()
    executors = new_data_context(ray)
    items = [{"path": p} for p in paths]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // DECODE_BATCH))
    decoded = dataset.map_batches(
        decode_batch,
        batch_size=DECODE_BATCH,
        batch_format="numpy",
        fn_kwargs={
            "contract": contract.as_dict(),
            "options": asdict(prepared.decode_options),
            "scored": prepared.scored,
        },
        num_cpus=plan.task_cpus,
        # resources of their own keep decoding in CPU tasks, not fused into the model's actors (which
        # would then decode one batch at a time beside the forward)
        memory=DECODE_MEMORY,
    )
    scored = decoded.map_batches(
        ModelActor,
        batch_size=request.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "folder": str(prepared.model_folder),
            "version_id": prepared.version.id,
            "sha256": prepared.version.sha256,
            "manifest": dict(prepared.version.manifest or {}),
            # the graphs the driver's database vouches for: an actor serves one kept on the shared mount
            "graphs": dict(prepared.model.graphs.recorded) if prepared.model.graphs is not None else {},
            "device": "cuda" if plan.gpu else "cpu",
            "threads": plan.threads,
            "batch": request.batch_size,
            "heatmaps": request.heatmaps,
            "concurrent_batches": prepared.settings.concurrent_batches,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
        num_gpus=1 if plan.gpu else 0,
        num_cpus=0 if plan.gpu else plan.task_cpus,
    )
    root, model, heatmaps_dir = prepared.cohort.root, prepared.model, prepared.settings.heatmaps_dir
    stall_seconds = prepared.settings.ray_stall_seconds
    try:
        for batch in _blocks(ray, scored, nodes, stall_seconds, stop=executors.shut_down):
            if batch is None:
                yield None
                continue
            for outcome, maps in _outcomes(batch):
                if outcome.read.path in seen:
                    continue
                seen.add(outcome.read.path)
                relative_names(root, [outcome.read])
                write = None
                if maps and writers is not None:
                    heatmaps, model_input = unpack_maps(maps)
                    write = with_heatmaps(model, heatmaps_dir, writers.submit, outcome, heatmaps, model_input)
                yield outcome, write
    except Exception as exc:
        text = str(exc)
        if REFUSED in text:
            line = next((part for part in text.splitlines() if REFUSED in part), text)
            raise EvaluationStopped(line.split(REFUSED + ": ", 1)[-1].strip()) from None
        raise


def new_data_context(ray: Any) -> ray_executors.StartedFromNow:
    """Makes a Ray Data context of the run's own current (Ray Data keeps one per process, with state
    of the cluster it last ran on), quiet, and returns the executors started in it."""
    from meddaemon.evaluate import ray_executors

    context = ray.data.DataContext()
    ray.data.DataContext._set_current(context)
    context.enable_progress_bars = False
    context.verbose_stats_logs = False
    if hasattr(context, "custom_execution_callback_classes"):  # an older Ray Data: none recorded, none shut down
        context.custom_execution_callback_classes = [ray_executors.RecordExecutors]
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray_executors.StartedFromNow()


class RunStalled(RuntimeError):
    """Nothing came back for ``ray_stall_seconds`` after a node of the cluster was lost."""


def _blocks(
    ray: Any, scored: Any, nodes: int, stall_seconds: float, stop: Callable[[], None]
) -> Iterator[dict[str, np.ndarray] | None]:
    """Ray Data's output, block by block as the actors return it (batches of a fixed size, prefetched,
    held the first results back until about 768 were done). Ray Data can wait forever once a node is
    lost ("Cluster resources are not enough to run any task from ActorPoolMapOperator"): when nothing
    came for ``stall_seconds`` (the setting ``ray_stall_seconds``; 60 s by default, as long as Ray
    Data waits before it warns of such a hang) and fewer nodes are alive than at the start, raises
    RunStalled.

    Given up (stalled, failed, or left by the caller) while Ray Data still iterates, it calls
    ``stop`` (the run's executors shut down: ``ray_executors``) and waits for the iteration to end,
    so that no thread is inside Ray when the driver leaves it."""
    blocks: queue.Queue[Any] = queue.Queue(maxsize=4)
    given_up = threading.Event()
    finished = object()

    def pump() -> None:
        try:
            for block in scored.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                _put(block)
            _put(finished)
        except BaseException as exc:  # handed to the driver, which raises it
            _put(exc)

    def _put(item: Any) -> None:
        while not given_up.is_set():
            with contextlib.suppress(queue.Full):
                blocks.put(item, timeout=0.5)
                return

    pumping = threading.Thread(target=pump, name="ray-results", daemon=True)
    pumping.start()
    last = time.monotonic()
    try:
        while True:
            try:
                item = blocks.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - last > stall_seconds and _alive_nodes(ray) < nodes:
                    raise RunStalled(
                        f"no results for {stall_seconds:g} s since a node of the cluster was lost"
                    ) from None
                yield None
                continue
            last = time.monotonic()
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        given_up.set()
        if pumping.is_alive():
            stop()
            pumping.join(STOP_SECONDS)
            if pumping.is_alive():
                log.warning("Ray Data's iteration still waits %g s after its executor was shut down", STOP_SECONDS)


def _alive_nodes(ray: Any) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


@dataclass(frozen=True)
class ActorPlan:
    gpu: bool
    #: the most model actors at once: one per GPU, else one per two CPUs (the rest decode)
    actors: int
    #: torch threads of an actor's forward: its share of a node's cores, as the local engine's uses them all
    threads: int
    #: the CPUs a decoding task and a CPU model actor each ask Ray for: one, or half of one on a
    #: cluster of one CPU, where an actor holding the only CPU left the decoding waiting for ever
    task_cpus: float = 1.0


def plan_actors(resources: Mapping[str, float], nodes: int, device: str) -> ActorPlan:
    """The model actors for a cluster of ``resources`` over ``nodes`` live nodes. ``--device cuda``
    on a cluster without a GPU, and a cluster without a CPU (the head's alone, started with
    ``--num-cpus 0``, once its worker nodes are gone), are refused: Ray would wait for them forever."""
    gpus, cpus, nodes = int(resources.get("GPU", 0)), int(resources.get("CPU", 0)), max(1, nodes)
    if device == "cuda" and not gpus:
        raise EvaluationError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
    if resources.get("CPU", 0) < 0.5:  # the decoding tasks ask for half a CPU at least: Ray would wait for ever
        raise EvaluationError(
            "the Ray cluster has no CPU to decode on: a head started with --num-cpus 0 and no worker node, "
            "or its last worker node lost; add one (ray start --address HEAD) and run the same command again"
        )
    gpu = device == "cuda" or (device == "auto" and gpus > 0)
    actors = max(1, gpus) if gpu else max(1, cpus // 2)
    task_cpus = 1.0 if cpus >= 2 else 0.5
    return ActorPlan(gpu, actors, max(1, cpus // nodes // max(1, -(-actors // nodes))), task_cpus)


def _outcomes(batch: dict[str, np.ndarray]) -> Iterator[tuple[FileOutcome, bytes]]:
    """Each file's outcome, with its packed heatmaps (empty without)."""
    for i, path in enumerate(batch["path"]):
        read = FileRead(str(path), sha256=str(batch["sha256"][i]) or None, size=int(batch["size"][i]))
        read.known = bool(batch["known"][i])
        if batch["reason"][i]:
            read.failure = ScanFailure(FailureReason(str(batch["reason"][i])), str(batch["message"][i]))
            yield FileOutcome(read), b""
            continue
        if batch["metadata"][i]:
            read.metadata = ScanMetadata(**json.loads(str(batch["metadata"][i])))
        probs = batch["probabilities"][i]
        if read.known or np.isnan(probs).any():
            yield FileOutcome(read), b""
            continue
        yield FileOutcome(read, probs.tolist(), batch["positive"][i].tolist()), batch["maps"][i]
