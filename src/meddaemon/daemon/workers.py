"""The decoding workers the stages share: processes that read and decode inbox files for intake and
prepare stored scans' inputs again for inference. With ``workers = 0`` (or before the daemon runs)
that work is done in the daemon's process, at once."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from meddaemon.daemon.intake import init_worker
from meddaemon.processes import forkserver_context, forkserver_deaf_to_ctrl_c

log = logging.getLogger("meddaemon.daemon")

#: the capacity asked for the pipe the workers send their results through (Linux's default is 64 KiB):
#: a model input (196 KiB for a 224 x 224 image) then goes in one write and comes out in one read, so a
#: worker does not wait for the daemon at every 64 KiB, and the daemon's thread that receives the
#: results takes the GIL back once a result instead of once a 64 KiB; 1 MiB is the most an
#: unprivileged process may ask (``/proc/sys/fs/pipe-max-size``)
RESULT_PIPE_BYTES = 1 << 20
#: what the daemon's forkserver imports once, before it forks the first worker (``DecodingPool``'s ``preload``):
#: the workers then start with torch, the decoders and preprocessing already in memory, shared,
#: rather than each importing them (2 to 3 s of CPU a worker on a small machine, beside the daemon's
#: own import of torch)
FORKSERVER_PRELOAD = ("meddaemon.daemon.intake", "meddaemon.engine.preprocess")


class DecodingPool:
    def __init__(
        self,
        workers: int,
        preload: Sequence[str] = (),
        initializer: Callable[..., None] = init_worker,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        """``preload``: the modules the process's forkserver imports before its first fork, when this
        pool is the first to start it (the daemon's ``FORKSERVER_PRELOAD``). Every child forked from
        it waits for that, which the pool's own start does in a thread (``warm_up``); a process that
        starts other children at once (the DICOM receiver, the outbox sender) should not ask for it.
        ``initializer(*initargs)`` runs in each worker first (every fresh pool's too)."""
        self.workers = workers
        self.preload = tuple(preload)
        self.initializer, self.initargs = initializer, initargs
        self.executor: Executor | None = None
        #: whether the current pool's workers are started: they answered ``warm_up``, or a read came back
        self.warm = False

    def start(self, warm_up: bool = False) -> None:
        """Make the pool; with ``warm_up``, start its processes now rather than at the first read."""
        self.executor = self._make()
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Start every worker process now rather than at the first read, so that their start overlaps
        the daemon's own (its torch import, the model's load, the files' stability window) instead of
        following it. From a thread: the forkserver imports torch before it forks the first worker
        (``FORKSERVER_PRELOAD``), and the submits wait for that (2 to 3 s on a small machine) while
        the daemon's thread imports its own. The pool counts as warm once every worker has answered."""
        if self.executor is None:
            return
        threading.Thread(target=self._start_workers, args=(self.executor,), name="workers-start", daemon=True).start()

    def _start_workers(self, executor: Executor) -> None:
        try:
            with forkserver_deaf_to_ctrl_c():
                started = [executor.submit(_started) for _ in range(self.workers)]
        except (RuntimeError, OSError, EOFError):  # shut down or broken meanwhile (its forkserver gone): cold
            return

        def answered(_: Future) -> None:
            """In the pool's thread; a pool replaced meanwhile cancels these, and stays cold."""
            if self.executor is executor and all(f.done() and not f.cancelled() for f in started):
                self.warm = True

        for future in started:
            future.add_done_callback(answered)

    def _spawning(self) -> contextlib.AbstractContextManager[None]:
        """Around a submit: ``forkserver_deaf_to_ctrl_c`` while the pool may still start workers (a
        submit spawns them, and the first the forkserver); once warm, nothing (a submit a file)."""
        return contextlib.nullcontext() if self.warm else forkserver_deaf_to_ctrl_c()

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        """Run ``fn`` in a worker, or right here (as a finished future) without workers. A pool a
        worker left while it was idle (the kernel's OOM killer, a kill by hand) is replaced first:
        its submit raised, and the daemon stopped."""
        if self.executor is not None:
            try:
                with self._spawning():
                    return self.executor.submit(fn, *args)
            except BrokenProcessPool:
                log.error("a decoding worker died while idle; starting the workers again")
                self.replace()
                assert self.executor is not None
                with self._spawning():
                    return self.executor.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def started(self) -> Future | None:
        """A task that ends once a worker has started (None without workers): waited for before a
        file is read alone, so that a fresh worker's start (its imports: seconds on a busy machine)
        does not count against the file's ``read_timeout_seconds``."""
        return self.submit(_started) if self.executor is not None else None

    def replace(self, kill: bool = False) -> None:
        """A fresh pool (after a worker died); the work queued in the old one is cancelled. ``kill``:
        its processes are killed first (a read that does not end), and the work in hand there fails."""
        if self.executor is not None:
            if kill:
                self._kill_processes()
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._make()
        self.warm = False

    def shutdown(self, kill: bool = False) -> None:
        """``kill``: the processes are killed first, so that a read that does not end is not waited for."""
        if self.executor is not None:
            if kill:
                self._kill_processes()
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _kill_processes(self) -> None:
        for process in list(getattr(self.executor, "_processes", {}).values()):
            with contextlib.suppress(OSError):
                process.kill()

    def _make(self) -> Executor | None:
        if self.workers == 0:
            return None
        executor = ProcessPoolExecutor(
            # no max_tasks_per_child: on Python 3.11 a retired worker is not replaced while work is
            # queued (CPython gh-115634), and the pool stalls after workers x limit files
            self.workers,
            mp_context=forkserver_context(self.preload),
            initializer=self.initializer,
            initargs=self.initargs,
        )
        widen_result_pipe(executor)
        return executor


class StopWaiting(Exception):
    """A stop was asked for while the daemon waited for a decoding worker (``wait_for``)."""


#: how often a wait for a worker lets the daemon tell it is alive and look for a stop
WAIT_SLICE_SECONDS = 1.0


def wait_for(
    future: Future,
    timeout: float,
    *,
    keep_alive: Callable[[], None] = lambda: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Any:
    """``future``'s result, waited for at most ``timeout`` seconds (``TimeoutError`` then), in slices
    between which the daemon tells systemd's watchdog and its lease it is alive and a stop ends the
    wait (``StopWaiting``): a read of one file at a time, after a worker died or a read did not end,
    waits in the daemon's loop (the shipped unit's watchdog allows 60 s; the timeout is 300)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(timeout=max(0.0, min(WAIT_SLICE_SECONDS, deadline - time.monotonic())))
        except TimeoutError:
            if future.done() or time.monotonic() >= deadline:  # done: the task's own TimeoutError (ETIMEDOUT)
                raise
        keep_alive()
        if should_stop():
            raise StopWaiting


class RunningSince:
    """When each task of a pool began to run, as far as the daemon can tell: when it was first seen
    ``running()``, that is handed to the pool's queue of calls, which holds one task more than the
    workers run (so a task's time may include one other task's). A read's timeout counts from there,
    not from its submission: a batch queued behind others' reads was declared timed out, and the
    workers killed under healthy reads."""

    def __init__(self) -> None:
        self._since: dict[Future, float] = {}

    def overdue(self, futures: Iterable[Future], timeout: float) -> bool:
        """Whether one of ``futures`` has run for longer than ``timeout`` without ending (each looked
        at now: call it at every turn)."""
        now = time.monotonic()
        late = False
        for future in futures:
            if future.done():
                self._since.pop(future, None)
            elif future.running():
                late = late or now - self._since.setdefault(future, now) > timeout
        return late

    def forget(self, futures: Iterable[Future]) -> None:
        for future in futures:
            self._since.pop(future, None)


def widen_result_pipe(executor: ProcessPoolExecutor) -> None:
    """Ask for a ``RESULT_PIPE_BYTES`` result pipe, where there is one to change (Linux, and the pipe
    CPython's executor has had since 3.3). A refusal (a lower ``pipe-max-size``) leaves the default:
    slower, never wrong."""
    reader = getattr(getattr(executor, "_result_queue", None), "_reader", None)
    if reader is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(reader.fileno(), fcntl.F_SETPIPE_SZ, RESULT_PIPE_BYTES)


def _started() -> None:
    """A worker's first task (``DecodingPool.warm_up``): nothing, once its initialiser has run."""
