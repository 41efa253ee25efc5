"""Free TCP ports on loopback for the servers the tests start (Orthanc, daemons, Ray, torchrun).

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` is free again as soon as the probing
socket closes, and the next probe draws at random from the same range: two ports asked for before
either server binds (a daemon's DICOM and metrics ports, the two ports of each Orthanc) were the same
about once in 14,000 pairs on Linux, and a test starts several such pairs. The suite also runs in
several pytest processes at once (``pytest -n``), which share nothing.

So ports are not drawn from the kernel's ephemeral range at all: each pytest process probes the
ports of its own slice of 20000-32767, below the ephemeral range (32768 and up on Linux) and above
the ports Ray gives its workers (10002-19999), one after the other, and never hands out a port twice.
A port something else holds (a server of another project, a socket in TIME_WAIT) fails the probe and
is passed over."""

from __future__ import annotations

import os
import socket

FIRST, LAST = 20000, 32767


def _slice() -> range:
    """This process's ports: ``pytest -n N`` worker ``gwK`` gets the K-th of N equal slices."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), index + 1)
    size = (LAST - FIRST + 1) // count
    return range(FIRST + index * size, FIRST + (index + 1) * size)


_ports = iter(_slice())


def free_port() -> int:
    """A port of this process's slice that no socket holds now and that it never handed out before."""
    for port in _ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("this test process has handed out every port of its slice")
