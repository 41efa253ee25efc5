"""systemd's notification protocol, spoken to a real Unix datagram socket standing in for systemd."""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_clock import FakeClock
from meddaemon.daemon.sdnotify import Watchdog, notify, watchdog_interval


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: collects the datagrams a service sends."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def received(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    folder = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="sd"))
    path = folder / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield FakeSystemd(sock, str(path))
    sock.close()


def test_notify_sends_the_message_as_one_datagram(systemd):
    assert notify("READY=1", systemd.env) is True
    assert notify("STATUS=watching /inbox", systemd.env) is True
    assert systemd.received() == ["READY=1", "STATUS=watching /inbox"]


def test_notify_reads_the_socket_from_the_process_environment(systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.env["NOTIFY_SOCKET"])
    assert notify("READY=1") is True
    assert systemd.received() == ["READY=1"]


def test_an_at_sign_names_a_socket_in_the_abstract_namespace():
    name = f"meddaemon-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(100) == b"READY=1"


def test_outside_systemd_notify_is_a_no_op_that_says_so(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert notify("READY=1", {}) is False


def test_a_socket_nobody_listens_on_is_reported_not_raised(tmp_path):
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_comes_from_watchdog_usec_for_this_process_only():
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_watchdog_pings_at_most_every_half_interval(systemd):
    clock = FakeClock(1000.0)
    dog = Watchdog({**systemd.env, "WATCHDOG_USEC": "10000000"}, clock=clock)
    assert dog.interval == 10.0
    assert dog.ready() is True
    assert dog.tick() is False  # just said READY: the first ping is due 5 s later
    clock.now += 4.9
    assert dog.tick() is False
    clock.now += 0.2
    assert dog.tick() is True
    assert dog.tick() is False
    clock.now += 5.0
    assert dog.tick() is True
    assert systemd.received() == ["READY=1", "WATCHDOG=1", "WATCHDOG=1"]


def test_watchdog_reports_ready_with_status_status_lines_and_stopping(systemd):
    dog = Watchdog(systemd.env)
    dog.ready("watching /inbox")
    dog.status("batch of 16\nscans")
    dog.extend_timeout(90)
    dog.stopping()
    assert systemd.received() == [
        "READY=1\nSTATUS=watching /inbox",
        "STATUS=batch of 16 scans",
        "EXTEND_TIMEOUT_USEC=90000000",
        "STOPPING=1",
    ]


def test_without_a_watchdog_interval_tick_never_sends(systemd):
    clock = FakeClock(1000.0)
    dog = Watchdog(systemd.env, clock=clock)
    for _ in range(3):
        clock.now += 100
        assert dog.tick() is False
    assert systemd.received() == []


def test_outside_systemd_the_watchdog_does_nothing():
    dog = Watchdog({"WATCHDOG_USEC": "1000000"})
    assert (dog.ready(), dog.tick(), dog.status("x"), dog.stopping()) == (False, False, False, False)


def test_the_daemon_keeps_pinging_the_watchdog_while_it_moves_a_batch_of_slow_files(
    systemd, make_settings, tmp_path: Path, monkeypatch
):
    """Moves to another file system are copies, and a batch of large ones outlasted the watchdog's
    interval without a ping (8.6 s against 2 s): systemd would have killed the daemon mid-batch.
    Each move here takes 0.3 s (as a copy over NFS may), the interval is 1 s."""
    import time

    import numpy as np
    from dicom_factory import write_png

    from meddaemon.daemon import filing
    from meddaemon.daemon.service import Daemon

    pings: list[float] = []
    real_notify = Watchdog.send

    def recorded(self, message):  # type: ignore[no-untyped-def]
        if message == "WATCHDOG=1":
            pings.append(time.monotonic())
        return real_notify(self, message)

    real_move = filing.finish_move

    def slow_move(source, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return real_move(source, target, *args, **kwargs)

    monkeypatch.setattr(Watchdog, "send", recorded)
    monkeypatch.setattr(filing, "finish_move", slow_move)
    for key, value in {**systemd.env, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}.items():
        monkeypatch.setenv(key, value)
    settings = make_settings(batch_size=16)
    for i in range(8):
        write_png(settings.watch / "busi" / f"synthetic_{i}.png", np.full((40, 40), i * 20, np.uint8))
    Daemon(settings).run(once=True)
    assert len(pings) >= 3  # the 2.4 s of moves are inside the pings
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0


def test_the_status_line_says_when_the_database_is_away_and_when_it_is_back(systemd, make_settings, monkeypatch):
    """`systemctl status` showed "watching ..." all through an outage: the status line follows the
    outage guard (the same transitions the log and the metrics' database_up record)."""
    from sqlalchemy.exc import OperationalError

    from meddaemon.daemon.service import Daemon

    for key, value in systemd.env.items():
        monkeypatch.setenv(key, value)
    settings = make_settings()
    daemon = Daemon(settings)
    tries = iter(range(2))

    def away_twice() -> int:
        if next(tries, None) is not None:
            raise OperationalError("SELECT 1", {}, Exception("SYNTHETIC: connection refused"))
        return 42

    assert daemon.outage.run(away_twice) == 42
    statuses = [m for m in systemd.received() if m.startswith("STATUS=")]
    assert len(statuses) == 2, statuses
    assert statuses[0].startswith("STATUS=database unreachable since ")
    assert "SYNTHETIC: connection refused" in statuses[0]
    assert statuses[1] == f"STATUS=watching {settings.watch}"
