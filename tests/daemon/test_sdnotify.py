"""systemd's notification protocol, spoken to a real Unix datagram socket standing in for systemd."""

from __future__ import annotations

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
