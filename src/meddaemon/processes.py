"""Processes of this host: whether one is still running (the one test behind the lease, a daemon
killed on this node is released at once, and the sweep of temporaries, what a killed writer left),
the forkserver that the package's process pools start from, and the signals their children leave
to their parent."""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import os
import signal
import threading
from collections.abc import Sequence
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
