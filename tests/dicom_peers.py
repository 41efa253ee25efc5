"""Peers that misbehave on purpose, for the delivery tests: a pynetdicom C-STORE SCP whose answers
are scripted (a status per request, or a dropped association), and a STOW-RS endpoint whose HTTP
statuses are scripted. Both are real servers on loopback; every request they receive is recorded."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from html_pages import send_html

#: an answer of the scripted SCP that aborts the association instead of answering
DROP = -1


@dataclass
class ScriptedScp:
    """Answers the C-STORE requests with ``script`` in turn, then with 0x0000 (stored) for ever."""

    script: list[int] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    #: associations accepted so far
    associations: int = 0
    #: the transfer syntax each C-STORE request came in
    syntaxes: list[str] = field(default_factory=list)
    #: the data set of each request stored, as it came (file meta: the context's syntax)
    datasets: list[Dataset] = field(default_factory=list)
    port: int = 0
    ae_title: str = "SCRIPTED"
    #: the transfer syntaxes it accepts (None: pynetdicom's default four)
    accepts: list[str] | None = None
    #: seconds each C-STORE request takes before its answer: a slow archive
    delay: float = 0.0
    #: called as each C-STORE request arrives, before it is answered
    on_store: Callable[[], object] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, self.accepts or context.transfer_syntax)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._established)],
        )
        self.port = self.server.server_address[1]

    def _established(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def open_associations(self) -> int:
        return len(self.server.active_associations)

    def abort_all(self) -> None:
        """Abort every open association, as a peer does when it times out an idle one."""
        for assoc in self.server.active_associations:
            assoc.abort()

    def release_all(self) -> None:
        """Ask to release every open association (blocks until each is answered or aborted)."""
        for assoc in self.server.active_associations:
            assoc.release()

    def awaiting_release(self) -> bool:
        """A release request of ``release_all`` has gone out and waits for its answer (DUL state 7)."""
        return any(a.dul.state_machine.current_state == "Sta7" for a in self.server.active_associations)

    def _store(self, event: evt.Event) -> int | Dataset:
        uid = str(event.request.AffectedSOPInstanceUID)
        if self.on_store is not None:
            self.on_store()
        time.sleep(self.delay)
        with self._lock:
            self.received.append(uid)
            self.syntaxes.append(str(event.context.transfer_syntax))
            answer = self.script.pop(0) if self.script else 0x0000
            if answer == 0x0000:
                self.stored.append(uid)
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                self.datasets.append(dataset)
        if answer == DROP:
            event.assoc.abort()
            return 0xC000
        return answer

    def destination(self, name: str = "scripted") -> dict[str, object]:
        return {"name": name, "kind": "dicom", "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


class _StowHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        stow: ScriptedStow = self.server.stow  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with stow.lock:
            stow.requests += 1
            stow.paths.append(self.path)
            answer = stow.script.pop(0) if stow.script else 200
            content_type, headers = "application/dicom+json", {}
            if isinstance(answer, bytes):  # stored, with that body
                status, reason, body = 200, None, answer
            elif isinstance(answer, HttpAnswer):  # whatever it says, nothing stored
                status, reason, body, content_type, headers = (
                    answer.status,
                    None,
                    answer.body,
                    answer.content_type,
                    answer.headers,
                )
            else:
                status, reason = answer if isinstance(answer, tuple) else (answer, None)
                failed = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [reason]}}]}}
                body = json.dumps(failed).encode() if reason is not None else b"{}"
            if status == 200 and not isinstance(answer, HttpAnswer):
                stow.stored += 1
        if isinstance(answer, HttpAnswer) and answer.delay and stow.stopping.wait(answer.delay):
            return
        if isinstance(answer, HttpAnswer) and answer.trickle:
            self._trickle(stow, status, content_type, body, answer.trickle)
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, stow: ScriptedStow, status: int, content_type: str, body: bytes, every: float) -> None:
        """The whole answer, its status line first, a byte each ``every`` seconds until it is out,
        the client gone or the server stopped."""
        head = f"HTTP/1.1 {status} Whatever\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        for byte in head.encode() + body:
            if stow.stopping.wait(every):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return

    def do_GET(self) -> None:
        """Any page, as a web server at a redirect's target answers: nothing is stored by a GET."""
        stow: ScriptedStow = self.server.stow  # type: ignore[attr-defined]
        with stow.lock:
            stow.gets += 1
        send_html(self, b"<html><body>SYNTHETIC page</body></html>")

    def log_message(self, *args: object) -> None:
        pass


@dataclass(frozen=True)
class HttpAnswer:
    """An answer of ``ScriptedStow`` that stores nothing, whatever its status: a redirect, a proxy's page."""

    status: int
    content_type: str = "text/html"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds between the answer's bytes (0: all at once): each read of the client's is answered
    #: within its timeout, the whole answer takes as long as this makes it
    trickle: float = 0.0
    #: seconds of silence before the answer (a server that hangs, past the client's timeout)
    delay: float = 0.0


@dataclass
class ScriptedStow:
    """A STOW-RS endpoint answering ``script``'s HTTP statuses in turn, then 200; a (status, failure
    reason) pair answers with a Failed SOP Sequence naming that reason, as a 409 does; bytes are a
    200 with that body (stored, whatever the body says); an ``HttpAnswer`` is answered as it is,
    storing nothing. A GET (a redirect followed) gets a page."""

    script: list[int | tuple[int, int] | bytes | HttpAnswer] = field(default_factory=list)
    requests: int = 0
    stored: int = 0
    #: GET requests heard: a POST's redirect followed
    gets: int = 0
    #: each request's path and query, as the server heard it
    paths: list[str] = field(default_factory=list)
    #: (certificate, key) PEM files: the server speaks https with them
    tls: tuple[Path, Path] | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StowHandler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.stow = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"

    def destination(self, name: str = "stow") -> dict[str, object]:
        return {"name": name, "kind": "dicomweb", "url": self.url}

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
