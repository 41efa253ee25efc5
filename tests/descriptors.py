"""A process held to the file descriptors it has open, as on a host out of them: its soft
RLIMIT_NOFILE lowered to its lowest free descriptor, so that every open() it makes fails with EMFILE
(ENFILE, a whole host out of them, takes the same paths), until the block ends."""

from __future__ import annotations

import itertools
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def out_of_descriptors(pid: int) -> Iterator[None]:
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    if pid == os.getpid():  # listing its own descriptors takes one: the lowest free is what open() gives
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
    else:
        held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = next(n for n in itertools.count() if n not in held)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
