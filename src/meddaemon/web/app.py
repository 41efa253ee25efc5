"""The web console's application: ``create_app(settings, host)`` builds it (``meddaemon web`` serves it).

Pages read the database through a read-only engine (``db.readonly``), one short session each; the
actions (retry, promote, retire) open a writing engine on first use and call the same library
functions as ``medcli`` (``daemon.retry.retry_failed``, ``engine.registry.promote``/``retire``),
and record who did what in ``web_actions``. A database that cannot be read gives a 503 page that
says so and reloads itself every few seconds, so it comes back on its own when the database does.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.convertors import IntegerConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from meddaemon import __version__
from meddaemon.config import Settings
from meddaemon.db.models import MAX_ROW_ID
from meddaemon.db.readonly import read_only_engine
from meddaemon.names import escape_controls
from meddaemon.web import auth

log = logging.getLogger("meddaemon.web")
T = TypeVar("T")

#: seconds between the reloads of the "database unavailable" page
DOWN_RETRY_SECONDS = 5
#: pages anyone may open before signing in
PUBLIC_PATHS = ("/login", "/static/")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "frame-src 'self'; object-src 'self'; frame-ancestors 'self'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "SAMEORIGIN",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class DatabaseDown(Exception):
    """The database could not be read or written; ``reason`` is one line, without SQL or its parameters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Console:
    """What every request needs: the settings, how people sign in, the database engines, the templates."""

    settings: Settings
    policy: auth.AuthPolicy
    signer: auth.SessionSigner
    reader: Engine
    templates: Jinja2Templates
    throttle: auth.SignInThrottle = field(default_factory=auth.SignInThrottle)
    _writer: Engine | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session in one transaction (one snapshot); any database error is ``DatabaseDown``."""
        try:
            with Session(self.reader) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseDown(_one_line(exc)) from None

    def read(self, work: Callable[[Session], T]) -> T:
        with self.reading() as session:
            return work(session)

    def writer(self) -> sessionmaker[Session]:
        """Sessions that may write, for the actions only (the daemon's engine, with its lock handling)."""
        from meddaemon.daemon.lease import connection_limits
        from meddaemon.db.engine import create_db_engine, session_factory

        with self._lock:
            if self._writer is None:
                # a frozen link held a click's thread for ever: bounded as the daemon's, but for its lock
                # waits, which an action times itself (``actions.lock_wait_over``)
                limits = dataclasses.replace(connection_limits(self.settings), lock_timeout=0.0)
                self._writer = create_db_engine(self.settings.db_url, self.settings.busy_timeout, limits)
            return session_factory(self._writer)

    def dispose(self) -> None:
        self.reader.dispose()
        if self._writer is not None:
            self._writer.dispose()


def _one_line(exc: BaseException) -> str:
    """The driver's message, never the statement or its parameters (which may hold a search or a name)."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else type(exc).__name__
    return " ".join(text.split())[:300]


def templates() -> Jinja2Templates:
    folder = Path(str(resources.files("meddaemon.web").joinpath("templates")))
    t = Jinja2Templates(directory=str(folder))
    t.env.filters["when"] = _when
    # a file's name as a sender chose it, or a text quoting one: no control character obeyed
    t.env.filters["name"] = lambda v: "" if v is None else escape_controls(str(v))
    t.env.filters["ago"] = _ago
    t.env.filters["pct"] = lambda v: "" if v is None else f"{100 * float(v):.1f}%"
    t.env.filters["num"] = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    t.env.globals["version"] = __version__
    return t


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    console: Console = request.app.state.console
    session: auth.Session | None = getattr(request.state, "session", None)
    return console.templates.TemplateResponse(
        request,
        name,
        {
            "user": session.user if session else None,
            "csrf": session.csrf if session else "",
            "uses_login": console.policy.uses_login,
            "path": request.url.path,
            **context,
        },
        status_code=status_code,
    )


class RowIdConvertor(IntegerConvertor):
    """``{name:row_id}``: a row id in a path, of at most 32 digits; a longer one matches no route (a
    404), where ``int`` refused one of over 4,300 digits with a ValueError: a 500."""

    regex = "[0-9]{1,32}"


register_url_convertor("row_id", RowIdConvertor())


def path_row_id(request: Request, name: str, missing: str) -> int:
    """The path's integer ``name`` (a ``{name:row_id}`` route), or a 404 saying ``missing`` (``{id}`` in it
    is the number) for one past any row's id: the database would refuse to compare an INTEGER key
    with it (PostgreSQL: out of range), which is a 500 otherwise."""
    value: int = request.path_params[name]
    if value > MAX_ROW_ID:
        raise HTTPException(404, missing.format(id=value))
    return value


class SessionMiddleware(BaseHTTPMiddleware):
    """Recognises the person (``request.state.session``), sends the signed cookie, adds security headers."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        console: Console = request.app.state.console
        policy, signer = console.policy, console.signer
        path = request.url.path
        if "\x00" in path or any("\x00" in value for value in request.query_params.values()):
            # no name, search or id holds one, and PostgreSQL refuses it in text: a "database down" page
            request.state.session = None
            return _headers(
                request, render(request, "error.html", 400, title="Error", message="The address holds a NUL character.")
            )
        if policy.open_local and not auth.names_loopback(request.headers.get("host")):
            # DNS rebinding: a page of evil.example whose name then points at 127.0.0.1 is
            # same-origin with the console, and anyone here is the operator
            request.state.session = None
            message = "Without users this console answers to loopback names only (localhost, 127.0.0.1, [::1])."
            return _headers(request, render(request, "error.html", 421, title="Wrong host", message=message))
        session = signer.load(request.cookies.get(auth.cookie_name(console.settings.web_secure_cookie)))
        fresh = False
        if policy.open_local:
            operator = auth.User(auth.LOCAL_OPERATOR, "admin")
            if session is None or session.user != operator:
                session, fresh = signer.new(operator), True
        elif policy.proxy_header:
            peer = request.client.host if request.client else None
            user = policy.from_proxy(request.headers.get(policy.proxy_header), peer)
            if user is None and not path.startswith("/static/"):
                request.state.session = None
                return _headers(request, render(request, "error.html", 401, title="Not signed in", message=(
                    "The reverse proxy did not name a known user.")))  # fmt: skip
            if session is None or session.user != user:
                session, fresh = signer.new(user), True
        else:
            if session is None:
                session, fresh = signer.new(None), True
            if session.user is None and not path.startswith(PUBLIC_PATHS):
                # no cookie set here: the sign-in page sets its own, and one set over a session the
                # browser did not send (a request from another site) signed the person out
                asked = path + (f"?{request.url.query}" if request.url.query else "")
                after = f"/login?next={quote(asked, safe='/')}" if request.method == "GET" and path != "/" else "/login"
                response: Response = RedirectResponse(after, status_code=303)
                if _from_htmx(request):  # its request follows a redirect unseen: the sign-in page went into this one
                    response = Response(status_code=204, headers={"HX-Redirect": "/login"})
                return _headers(request, response)
        request.state.session = session
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # Starlette's handler of last resort answers outside this middleware
            response = await _server_error(request, exc)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
        if fresh and request.method in ("GET", "HEAD"):
            # a POST without the cookie is one from another site (SameSite=Lax sends none): its CSRF
            # check fails, and a new session set on its answer signed the person out
            auth.set_session_cookie(response, signer.dump(session), console.settings.web_secure_cookie)
        return _headers(request, response)


def _from_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def _headers(request: Request, response: Response) -> Response:
    """``response`` with the security headers. An error answering a part of a page that htmx
    fetches (the overview's refresh, the worklist's next rows) reloads the whole page, which then
    shows the error as any page load does: htmx drops an error's body, and the overview went on
    showing old figures through a database outage."""
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    if response.status_code >= 400 and _from_htmx(request):
        response.headers["HX-Refresh"] = "true"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    titles = {401: "Not signed in", 403: "Forbidden", 404: "Not found", 405: "Not allowed"}
    title = titles.get(exc.status_code, "Error")
    return render(request, "error.html", exc.status_code, title=title, message=exc.detail or title)


async def _database_down(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DatabaseDown)
    log.warning("the database cannot be used: %s", exc.reason)
    reload = request.method == "GET"  # reloading an action's answer would GET its address: a 405
    response = render(request, "down.html", 503, reason=exc.reason, retry=DOWN_RETRY_SECONDS if reload else None)
    response.headers["Retry-After"] = str(DOWN_RETRY_SECONDS)
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return render(request, "error.html", 500, title="Something went wrong", message=(
        "The console could not show this page; the error is in its log."))  # fmt: skip


def create_app(settings: Settings, host: str = "127.0.0.1", reader: Engine | None = None) -> Starlette:
    """The console for the database of ``settings``, as served on ``host`` (which decides how people sign in).

    Raises ``auth.AuthError`` for a bind beyond loopback without users or a proxy header.
    """
    from meddaemon.web.routes import all_routes

    policy = auth.AuthPolicy.from_settings(settings, host)
    console = Console(
        settings=settings,
        policy=policy,
        signer=auth.SessionSigner(),
        reader=reader or read_only_engine(settings.db_url, settings.busy_timeout),
        templates=templates(),
    )
    static = StaticFiles(directory=str(resources.files("meddaemon.web").joinpath("static")))
    app = Starlette(
        routes=[*all_routes(), Mount("/static", static, name="static")],
        middleware=[Middleware(SessionMiddleware)],
        exception_handlers={HTTPException: _http_error, DatabaseDown: _database_down, Exception: _server_error},
    )
    app.state.console = console
    return app
