"""The decoding workers the stages share: processes that read and decode inbox files for intake and
prepare stored scans' inputs again for inference. With ``workers = 0`` (or before the daemon runs)
that work is done in the daemon's process, at once."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor

from meddaemon.daemon.intake import init_worker


class DecodingPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor: Executor | None = None
        #: whether a read came back from the current pool (its workers are started)
        self.warm = False

    def start(self) -> None:
        self.executor = self._make()

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        """Run ``fn`` in a worker, or right here (as a finished future) without workers."""
        if self.executor is not None:
            return self.executor.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def replace(self) -> None:
        """A fresh pool (after a worker died); the work queued in the old one is cancelled."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._make()
        self.warm = False

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _make(self) -> Executor | None:
        if self.workers == 0:
            return None
        context = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(
            # no max_tasks_per_child: on Python 3.11 a retired worker is not replaced while work is
            # queued (CPython gh-115634), and the pool stalls after workers x limit files
            self.workers,
            mp_context=context,
            initializer=init_worker,
        )
