"""Free TCP ports on loopback for the servers the tests start (Orthanc, daemons, Ray, torchrun).

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` is free again as soon as the probing
socket closes, and the next probe draws at random from the same range: two ports asked for before
either server binds (a daemon's DICOM and metrics ports, the two ports of each Orthanc) were the same
about once in 14,000 pairs on Linux, and a test starts several such pairs. No port is handed out twice
in one process here, so every server of a test run gets a port of its own."""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A port no socket holds now and that this process has never handed out before."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
