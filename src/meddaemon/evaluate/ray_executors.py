"""The Ray Data executors of a Ray engine run, kept so that a run given up shuts its own down
before the driver leaves Ray (``ray_engine``).

Ray Data shuts an executor down when its output is exhausted or when it is garbage-collected. A run
given up after a node's loss has had neither: its scheduling thread still waits in ``ray.wait`` and
its iterator's threads on objects Ray is recovering, and ``ray.shutdown()`` while a thread is inside
Ray's core worker can end the process with SIGSEGV (``CoreWorkerMemoryStore::GetImpl``). Shut down
by force, the executor kills its actors and cancels its tasks, and those threads return.

The callback class travels to Ray's workers inside the run's ``DataContext``: this module imports
nothing of meddaemon's, so it costs them nothing to import.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, ClassVar

from ray.data._internal.execution.execution_callback import ExecutionCallback


class RecordExecutors(ExecutionCallback):
    """A Ray Data execution callback (``DataContext.custom_execution_callback_classes``) that keeps,
    weakly, every executor started in this process from a context that names it."""

    started: ClassVar[weakref.WeakSet[Any]] = weakref.WeakSet()
    #: executors start on the thread that iterates a run, and are listed from the driver's
    lock: ClassVar[threading.Lock] = threading.Lock()

    def before_execution_starts(self, executor: Any) -> None:
        with self.lock:
            self.started.add(executor)

    @classmethod
    def now(cls) -> set[Any]:
        with cls.lock:
            return set(cls.started)


class StartedFromNow:
    """The executors started after this object was made: one run's, as a process runs one Ray
    Data run at a time."""

    def __init__(self) -> None:
        self._before = weakref.WeakSet(RecordExecutors.now())

    def shut_down(self) -> None:
        """Shuts them down by force: their actors killed, their tasks cancelled."""
        for executor in RecordExecutors.now() - set(self._before):
            executor.shutdown(force=True)
