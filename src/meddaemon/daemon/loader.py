"""Loading model versions off the main loop.

Verifying a version (hash, architecture, safetensors, self-test) and choosing its CPU backend
(exporting the ONNX graph, timing both) took over 100 s for a DenseNet-121 on a busy machine: done
in the main loop, it stalled ingest for every task and the systemd watchdog. One loader thread does
it instead, a request per version; the main loop collects finished loads when it next turns
(:meth:`ModelLoader.finished`) and swaps them in, serving the old version until then.

The thread is a daemon thread: a stop does not wait for a load in progress beyond a short join
(the half-loaded model is simply dropped with the process). A process that leaves one running must
end with ``os._exit`` (``meddaemon start`` does): on Python's normal shutdown a daemon thread inside
torch is unwound through C++ frames and the process aborts (exit 134).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch and the engine are imported by the first load, not by the daemon's start
    import torch

    from meddaemon.engine.inference import ServedModel
    from meddaemon.engine.registry import ModelRefused

log = logging.getLogger("meddaemon.loader")

#: how long a stop waits for the loader thread before leaving it behind (s)
CLOSE_JOIN_SECONDS = 1.0


@dataclass(frozen=True)
class LoadRequest:
    task: str
    version: str
    version_id: int
    path: Path
    #: what the database registered (the row's hash and manifest): the folder must still hold it
    sha256: str | None = None
    manifest: dict | None = None
    #: the promotion the load was asked for (a refusal is recorded against it, not a later one)
    promoted_at: datetime | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.version}"


@dataclass
class LoadResult:
    request: LoadRequest
    model: ServedModel | None = None
    #: the verification failed: never retried by this daemon
    refusal: ModelRefused | None = None
    #: anything else that went wrong ("ExceptionType: message"): retried after a pause
    error: str | None = None
    seconds: float = 0.0


class LoadFunction(Protocol):
    def __call__(self, request: LoadRequest) -> ServedModel: ...


def load_and_time(
    request: LoadRequest,
    *,
    device: torch.device,
    heatmaps: bool,
    batch: int,
    lanes: int = 1,
    graphs: Mapping[str, str] | None = None,
    record_graph: Callable[[str, str], None] | None = None,
) -> ServedModel:
    """Verify the version, place it on ``device`` and choose its backend (``engine.serving``);
    ``lanes``: batches it may run at once (``engine.inference.forward_lanes``); ``graphs``: the
    hashes the database recorded of the ONNX graphs kept with it, ``record_graph`` records a new one."""
    from meddaemon.engine.registry import Registered
    from meddaemon.engine.serving import serve_version

    registered = Registered(request.sha256, request.manifest or {}, graphs or {}) if request.sha256 else None
    return serve_version(
        request.path,
        request.version_id,
        device,
        heatmaps=heatmaps,
        batch=batch,
        lanes=lanes,
        registered=registered,
        record_graph=record_graph,
    )


class ModelLoader:
    """One background thread loading the versions asked for, one at a time, in order."""

    def __init__(self, load: LoadFunction) -> None:
        self._load = load
        # queue.Queue, not SimpleQueue: the main thread waits on results, and a SimpleQueue.get(timeout)
        # interrupted by a signal near its deadline blocks until the next put (CPython 3.11)
        self._requests: queue.Queue[LoadRequest | None] = queue.Queue()
        self._results: queue.Queue[LoadResult] = queue.Queue()
        #: version ids asked for and not yet collected (used by the main loop only)
        self._pending: set[int] = set()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self, request: LoadRequest) -> bool:
        """Ask for ``request`` to be loaded; False when it is already asked for."""
        if request.version_id in self._pending:
            return False
        self._pending.add(request.version_id)
        self._requests.put(request)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="model-loader", daemon=True)
            self._thread.start()
        log.info("loading model %s in the background", request.name)
        return True

    def pending(self) -> set[int]:
        return set(self._pending)

    def busy(self) -> bool:
        return bool(self._pending)

    def alive(self) -> bool:
        """Whether the thread is still at work (after :meth:`close`: a load was left running)."""
        return self._thread is not None and self._thread.is_alive()

    def finished(self, timeout: float = 0.0) -> list[LoadResult]:
        """The loads that finished since the last call; waits up to ``timeout`` for the first one."""
        results: list[LoadResult] = []
        try:
            results.append(self._results.get(timeout=timeout) if timeout > 0 else self._results.get_nowait())
            while True:
                results.append(self._results.get_nowait())
        except queue.Empty:
            pass
        for result in results:
            self._pending.discard(result.request.version_id)
        return results

    def close(self, join_seconds: float = CLOSE_JOIN_SECONDS) -> None:
        """Stop after the load in progress; wait for it ``join_seconds`` at most."""
        self._closing.set()
        self._requests.put(None)
        if self._thread is None:
            return
        self._thread.join(join_seconds)
        if self._thread.is_alive():
            log.info("not waiting for the model load in progress")

    def _work(self) -> None:
        while not self._closing.is_set():
            request = self._requests.get()
            if request is None or self._closing.is_set():
                return
            self._results.put(self._run(request))

    def _run(self, request: LoadRequest) -> LoadResult:
        from meddaemon.engine.registry import ModelRefused

        started = time.monotonic()
        try:
            model = self._load(request)
        except ModelRefused as refusal:
            return LoadResult(request, refusal=refusal, seconds=time.monotonic() - started)
        except Exception as exc:  # reported to the main loop, which logs it and retries later
            log.debug("loading %s failed", request.name, exc_info=True)
            return LoadResult(request, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        return LoadResult(request, model=model, seconds=time.monotonic() - started)
