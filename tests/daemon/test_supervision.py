"""A running daemon, as systemd and Prometheus see it: ``READY=1`` once it watches, ``WATCHDOG=1``
while its loop turns, ``STOPPING=1`` on SIGTERM, and its metrics served over HTTP as it works.

The daemon is the real ``meddaemon start`` subprocess; the notification socket is a real datagram
socket bound here, as systemd binds one. Scans and model are SYNTHETIC (seeded noise PNGs, an
untrained small CNN).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png

from daemon_harness import TASK, Daemons, Layout, one, scrape, wait_until
from model_factory import promote_into, write_model
from ports import free_port

pytestmark = pytest.mark.slow

SCANS = 6


class NotifySocket:
    """What systemd would receive from the daemon on ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


def test_the_daemon_notifies_systemd_and_serves_its_metrics_while_it_works(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    promote_into(f"sqlite:///{layout.db}", layout.state / "models", write_model(tmp_path / "model"))
    rng = np.random.default_rng(5)
    for i in range(SCANS):
        write_png(layout.inbox / TASK / f"synthetic_{i}.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    daemon = daemons.start(
        env={
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "1000000",  # WatchdogSec=1: a keep-alive at least every 0.5 s
            "MEDDAEMON_METRICS_PORT": str(port),
        }
    )
    try:
        wait_until(lambda: any(m.startswith("READY=1") for m in notify.drain()), 60, "READY=1", daemon)
        url = f"http://127.0.0.1:{port}/metrics"

        def all_inferred() -> bool:
            notify.drain()  # as systemd does: a full socket would block the daemon's next keep-alive
            try:
                return scrape(url)["meddaemon_scans_inferred_total"][()] == SCANS
            except (OSError, KeyError):
                return False

        wait_until(all_inferred, 60, f"the metrics to count {SCANS} inferred scans", daemon)
        metrics = scrape(url)
        assert one(metrics, "meddaemon_database_up") == 1
        [(model_labels, served)] = metrics["meddaemon_model_info"].items()
        assert (dict(model_labels)["task"], dict(model_labels)["version"], served) == ("busi", "v1", 1)
        assert one(metrics, "meddaemon_daemons_alive") == 1
        recorded = metrics["meddaemon_files_recorded_total"]
        # routed, or waiting_model when read while the model was still loading in the background
        routed = sum(recorded.get((("outcome", state), ("reason", "")), 0) for state in ("routed", "waiting_model"))
        assert routed == SCANS
        assert metrics["meddaemon_inference_latency_seconds_count"][()] == SCANS

        assert one(metrics, "meddaemon_child_process_restarts_total", process="report") == 0  # none yet, a zero
        # a report process killed (the OOM killer's SIGKILL) is started again, and counted
        started = re.compile(r"report process started \(pid (\d+)")
        wait_until(lambda: notify.drain() is not None and started.search(daemon.log_text()), 60, "a report process",
                   daemon)  # fmt: skip
        os.kill(int(started.findall(daemon.log_text())[0]), signal.SIGKILL)

        def restarted() -> bool:
            notify.drain()
            try:
                return one(scrape(url), "meddaemon_child_process_restarts_total", process="report") == 1
            except KeyError:
                return False

        wait_until(restarted, 60, "the report process to be restarted and counted", daemon)
        assert "the report process exited (code -9); restarting it" in daemon.log_text()

        ready_at = next(t for t, m in notify.messages if m.startswith("READY=1"))
        time.sleep(1.5)
        notify.drain()
        beats = [t for t, m in notify.messages if m == "WATCHDOG=1" and t > ready_at]
        assert len(beats) >= 2, "keep-alives while the loop turns"

        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        assert "STOPPING=1" in notify.drain()
    finally:
        notify.close()
