"""Serving the console with uvicorn: in the foreground (``meddaemon web``) or from a daemon's thread (``web_port``)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import uvicorn

from meddaemon.config import ConfigError, Settings
from meddaemon.web.app import create_app

log = logging.getLogger("meddaemon.web")


def _server(settings: Settings, host: str, port: int) -> uvicorn.Server:
    app = create_app(settings, host)
    # no access log: request lines would carry the worklist's search text. No proxy headers: the peer
    # must stay the TCP peer, which web_proxy_header believes only on loopback (uvicorn would put a
    # local proxy's X-Forwarded-For address in its place, and every user behind it be refused).
    config = uvicorn.Config(
        app, host=host, port=port, access_log=False, log_config=None, lifespan="off", proxy_headers=False
    )
    return uvicorn.Server(config)


def serve(settings: Settings, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C, saying the address bound (``port`` 0: one the system picks)."""
    server = _server(settings, host, port)
    try:
        listening = server.config.bind_socket()
    except (OSError, OverflowError, SystemExit) as exc:  # uvicorn logs a bind's error, then exits 3
        raise ConfigError(
            f"settings 'web_host' and 'web_port': the web console cannot listen on {host or '*'}:{port}"
        ) from exc
    log.info("web console on http://%s:%d/", host, listening.getsockname()[1])
    # uvicorn raises the SIGTERM it stopped on again once shut down: heard here, the stop is a return
    # (exit 0, as for `meddaemon start`), not a death by signal
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[listening])
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class WebServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(settings: Settings, host: str | None = None, port: int | None = None) -> WebServer:
    """The console served from a daemon thread (the daemon's own ``web_host``/``web_port`` by default)."""
    host = host or settings.web_host
    port = settings.web_port if port is None else port
    server = _server(settings, host, port)
    thread = threading.Thread(target=server.run, name="web-console", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:  # the port taken, a host that is not this machine's: exit 2, not a traceback
        raise ConfigError(f"settings 'web_host' and 'web_port': the web console cannot listen on {host or '*'}:{port}")
    bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
    return WebServer(server, thread, f"http://{host}:{bound}/")
