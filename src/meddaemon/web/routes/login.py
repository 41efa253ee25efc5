"""Signing in and out (only when the console uses passwords: ``[web_users]`` without a proxy header)."""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from meddaemon.web import auth
from meddaemon.web.app import Console, render

log = logging.getLogger("meddaemon.web")


async def login_page(request: Request) -> Response:
    console: Console = request.app.state.console
    if not console.policy.uses_login:
        return RedirectResponse("/", status_code=303)
    if request.method in ("GET", "HEAD"):  # a HEAD was taken for a form posted: a 403
        after = auth.page_after_sign_in(request.query_params.get("next"))
        return render(request, "login.html", title="Sign in", error="", after=after, typed_user="")
    form = await request.form()
    session: auth.Session | None = request.state.session
    sent = form.get(auth.CSRF_FIELD)
    if not auth.csrf_ok(session, sent if isinstance(sent, str) else None):
        raise HTTPException(403, "This form is out of date (CSRF check failed): load the sign-in page again.")
    name, password = str(form.get("user", "")), str(form.get("password", ""))
    after = auth.page_after_sign_in(str(form.get("next", "")))
    # by the name, and by the address unless it is loopback: behind a proxy on this host every
    # client has the proxy's address, and one guesser would lock everyone out
    peer = request.client.host if request.client else ""
    keys = (auth.throttle_key_of_name(name), *((f"from:{peer}",) if peer and not auth.is_loopback(peer) else ()))
    wait = console.throttle.begin(*keys)
    if wait > 0:
        log.warning("a sign-in refused: too many failed ones")
        error = f"Too many failed sign-ins: try again in {max(1, round(wait))} s."
        return render(request, "login.html", 429, title="Sign in", error=error, after=after, typed_user=name)
    user = await run_in_threadpool(console.policy.login, name, password)
    if user is None:  # counted as failed when it began
        log.warning("a sign-in failed")  # the name typed may be anything: not logged
        error = "Unknown user or wrong password."
        return render(request, "login.html", 401, title="Sign in", error=error, after=after, typed_user=name)
    console.throttle.succeeded(*keys)
    log.info("%s signed in (%s)", user.name, user.role)
    response = RedirectResponse(after, status_code=303)
    auth.set_session_cookie(response, console.signer.dump(console.signer.new(user)), console.settings.web_secure_cookie)
    return response


async def logout(request: Request) -> Response:
    console: Console = request.app.state.console
    form = await request.form()
    sent = form.get(auth.CSRF_FIELD)
    if not auth.csrf_ok(request.state.session, sent if isinstance(sent, str) else None):
        raise HTTPException(403, "This form is out of date (CSRF check failed).")
    console.signer.end(request.state.session)
    response = RedirectResponse("/login" if console.policy.uses_login else "/", status_code=303)
    auth.delete_session_cookie(response, console.settings.web_secure_cookie)
    return response


routes = [
    Route("/login", login_page, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
]
