"""Plain web pages served on loopback for the tests: a page of another site (``LinkPage``), and the
answer a web server gives a GET (``send_html``)."""

from __future__ import annotations

import http.server
import threading


def send_html(handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
    """Answer ``handler``'s request with ``body`` as an HTML page."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class LinkPage:
    """A page of another site (``localhost``, where the console is at 127.0.0.1) holding ``html``."""

    def __init__(self, html: str) -> None:
        body = f"<!doctype html><title>elsewhere</title>{html}".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                send_html(self, body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://localhost:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
