"""tests/ports.py: the ports the tests' servers listen on, unique across the suite's pytest processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def ports_of(worker: str, count: int, n: int = 50) -> list[int]:
    """The first ``n`` ports ``free_port`` hands out in a fresh process that is worker ``worker`` of ``count``."""
    env = {**os.environ, "PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": str(count)}
    code = f"import json, ports; print(json.dumps([ports.free_port() for _ in range({n})]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_two_test_processes_never_hand_out_the_same_port():
    first, second = ports_of("gw0", 2), ports_of("gw1", 2)
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert not set(first) & set(second)


def test_ports_lie_below_the_kernels_ephemeral_range_and_above_rays_worker_ports():
    """So no server binding port 0, and no Ray worker, takes a port a test handed out before its server binds."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for worker, count in [("gw0", 1), ("gw0", 2), ("gw1", 2), ("gw7", 8)]:
        assert all(19999 < port < low for port in ports_of(worker, count))
