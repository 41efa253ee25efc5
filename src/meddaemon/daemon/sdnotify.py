"""The systemd notification protocol (``sd_notify(3)``), without a dependency.

Under a unit with ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket (a name
starting with ``@`` lives in the abstract namespace), and waits for ``READY=1`` before it calls the
service started. With ``WatchdogSec=`` it also passes ``$WATCHDOG_USEC`` and kills and restarts the
service when no ``WATCHDOG=1`` arrives within that interval: a daemon whose loop hangs (a stuck
mount, a deadlock) is restarted instead of sitting there alive and useless. Outside systemd every
call is a cheap no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("meddaemon.sdnotify")


def _socket_address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd; False when not under systemd or it failed.

    A failure is logged, never raised: losing a notification must not stop the daemon.
    """
    address = _socket_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", message.split("=", 1)[0], exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog interval systemd expects pings within, in seconds; None when there is none.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child that inherited
    the environment (a worker) must not ping on its parent's behalf.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Watchdog:
    """What the daemon tells systemd over its life: ready, alive (every loop), status, stopping.

    ``tick()`` is meant to be called on every iteration of the main loop: it sends ``WATCHDOG=1`` at
    most once every half interval (the margin ``sd_watchdog_enabled(3)`` recommends), and otherwise
    costs one clock read.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._clock = clock
        self.interval = watchdog_interval(self._environ)
        self.enabled = _socket_address(self._environ) is not None
        self._last_ping: float | None = None

    def send(self, message: str) -> bool:
        return self.enabled and notify(message, self._environ)

    def ready(self, status: str | None = None) -> bool:
        """Start-up is done: systemd calls the unit started (and ``Type=notify`` dependants may start)."""
        sent = self.send("READY=1" if status is None else f"READY=1\nSTATUS={status}")
        self._last_ping = self._clock()
        return sent

    def tick(self) -> bool:
        """Ping the watchdog when half its interval has passed since the last ping; True when sent."""
        if self.interval is None or not self.enabled:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.interval / 2:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status`` (no newlines: they would end the message)."""
        return self.send("STATUS=" + " ".join(text.split()))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on a start or stop in progress."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def stopping(self) -> bool:
        """The daemon is shutting down (finishing the batch in hand): no more watchdog pings follow."""
        return self.send("STOPPING=1")
