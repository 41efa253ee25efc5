"""Processes of this host: whether one is still running (the one test behind the lease, a daemon
killed on this node is released at once, and the sweep of temporaries, what a killed writer left),
the forkserver that the package's process pools start from, the signals their children leave
to their parent, and how the daemon starts and stops its long-lived children."""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path

#: how much later than ``since`` a process must have started to be judged a later holder of its pid:
#: start times are whole-second exact at best (the boot time ``/proc/stat`` gives), and a file's
#: time on a shared folder comes from its server's clock, which may be behind this host's
START_SLACK_SECONDS = 30.0


def leave_stopping_to_the_parent(*, sigterm: bool = False) -> None:
    """In a child process: ignore what a terminal sends the whole process group (Ctrl-C, a hang-up),
    and with ``sigterm`` SIGTERM too, so that a child is never cut off half-way through its work:
    the parent, asked to stop, stops its children itself, in order."""
    for signum in (signal.SIGINT, signal.SIGHUP, *((signal.SIGTERM,) if sigterm else ())):
        signal.signal(signum, signal.SIG_IGN)


def end_with_the_parent() -> None:
    """In a pool's worker process: end the moment the process that started the pool is gone (killed
    with -9). The pool's workers each hold both ends of its task queue, so none ever reads the end
    of it: they lived on for good, with the forkserver that waits for them, after every such kill."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(0)  # a reader only: nothing of its own is half-written

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def process_alive(pid: int, since: float | None = None) -> bool:
    """Whether process ``pid`` of this host runs.

    A zombie is not: a process killed and not yet reaped still answers ``kill(pid, 0)``, and an init
    that reaps orphans late (a container's) keeps one for seconds. With ``since`` (a ``time.time()``
    moment the process asked about existed, such as the last write to a file it wrote), a process that
    started after it is a later one given the same pid, so not alive either. Where the answer cannot
    be told (a pid of another user's process, one too large for this system), it is alive: callers
    act only on processes known to be gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    status = _proc_status(pid)
    if status is None:
        return not Path("/proc/self/stat").exists()  # gone meanwhile; without /proc, kill's answer stands
    state, started = status
    if state in ("Z", "X"):
        return False
    return since is None or started <= since + START_SLACK_SECONDS


def _proc_status(pid: int) -> tuple[str, float] | None:
    """The state letter of ``pid`` and when it started (``time.time()`` scale), from ``/proc``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name before it may hold spaces
    ticks_after_boot = int(fields[19])  # field 22, ``starttime``
    return fields[0], _boot_time() + ticks_after_boot / os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def forkserver_context(preload: Sequence[str] = ()) -> multiprocessing.context.ForkServerContext:
    """The forkserver start method, which the package's process pools use (a plain fork would copy a
    process that holds threads, database connections or a CUDA context). ``preload``: modules the
    forkserver imports once, before its first fork, beside ``__main__`` (multiprocessing's default),
    so that every child starts with them in memory, shared, rather than importing them itself:
    torch and the decoders cost 2 to 3 s of CPU a process on a small machine, and 15 decoding
    processes importing them at once held a 16-core machine for about 10 s (benchmarks/README.md,
    the GPU section). Heard only by a forkserver not yet started: the first pool of a process decides,
    and a child forked from it waits for its imports."""
    context = multiprocessing.get_context("forkserver")
    if preload:
        context.set_forkserver_preload(["__main__", *preload])
    return context


@contextlib.contextmanager
def forkserver_deaf_to_ctrl_c() -> Iterator[None]:
    """Around what may start the forkserver (a pool's submit, which spawns its workers): SIGINT
    blocked in this thread, which the forkserver keeps across its exec. Python's forkserver ignores
    Ctrl-C only once its preload imports are done, and a Ctrl-C in their 2 to 4 s printed its
    ``KeyboardInterrupt`` traceback, and the daemon's thread waiting for it a second one. Blocked,
    not ignored, here: a Ctrl-C meanwhile is this thread's once the mask is back. The resource
    tracker, which the forkserver starts first, unblocks SIGINT whatever the mask: started before."""
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


#: when each child started with ``start_child`` started (``/proc``): its pid names it while that holds
_child_starts: weakref.WeakKeyDictionary[BaseProcess, float] = weakref.WeakKeyDictionary()


def start_child(process: BaseProcess) -> None:
    """Start a long-lived child of the daemon (the report process, the outbox sender, the DICOM
    receiver), noting when it started, for ``child_runs``."""
    process.start()
    status = _proc_status(process.pid) if process.pid is not None else None
    if status is not None:
        _child_starts[process] = status[1]


def child_runs(process: BaseProcess) -> bool:
    """Whether ``process``, started with ``start_child`` from the forkserver, still runs.

    ``is_alive`` asks the forkserver, which a SIGTERM to the whole process group ends (``timeout``,
    ``kill -- -PGID``, a unit's ``KillMode=control-group``): then it answers at once, exit code 255,
    while the child, which ignores SIGTERM to finish the work in hand, runs on (a DICOM receiver went
    on answering C-STOREs for 10 s after its daemon had said it stopped). The child is then looked
    for by its pid and when it started (not a later process given the same pid)."""
    if process.is_alive():
        return True
    if process.pid is None or process.exitcode != 255:
        return False
    status = _proc_status(process.pid)
    return status is not None and status[0] not in ("Z", "X") and status[1] == _child_starts.get(process)


def stop_child(process: BaseProcess, stop: Event, timeout: float, label: str, logger: logging.Logger) -> None:
    """Ask ``process`` (started with ``start_child``) to finish the work in hand and exit, by setting
    ``stop``; kill it if it still runs after ``timeout`` seconds (a killed writer leaves at most a
    temporary file, removed at the next start). ``label`` names it in the log ("the report process")."""
    if process.pid is None:
        return
    stop.set()
    deadline = time.monotonic() + timeout
    process.join(timeout)
    while child_runs(process) and time.monotonic() < deadline:
        time.sleep(0.05)
    if child_runs(process):
        logger.warning("%s did not stop within %.0f s; killing it", label, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.join()
