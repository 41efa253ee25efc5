"""A TCP proxy on 127.0.0.1 that can be frozen: a silent network partition for the tests.

Frozen, it stops forwarding in both directions but keeps every socket open, as a switch that drops
packets would: no reset, no FIN, the kernel still acknowledges what fits in its buffers, so the
client only learns something is wrong from its own timeouts (or from the server's, on the other
side). Thawed, it forwards what was held and carries on.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="tcp-proxy-accept", daemon=True).start()

    def freeze(self) -> None:
        """Stop forwarding; every connection stays open."""
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        with self.lock:
            for sock in [self.listener, *self.sockets]:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), name="tcp-proxy-pump", daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                self.flowing.wait()
                readable, _, _ = select.select([source], [], [], 0.2)
                if not readable:
                    continue
                self.flowing.wait()  # frozen after the select: what arrives stays in the kernel's buffers
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                target.sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket closed meanwhile (fd -1)
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


@contextmanager
def tcp_proxy(upstream: tuple[str, int]) -> Iterator[TcpProxy]:
    proxy = TcpProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
