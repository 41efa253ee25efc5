"""What an action needs before it runs, and what it leaves behind: the role, the CSRF token, a row
in ``web_actions``.

A request that is not allowed (not an admin, no or a wrong CSRF token) is a 403 before anything is
read from its form into a library call; nothing changes. Allowed actions are recorded, whatever
their outcome, with the user, the role, the action, its target and a line on what came of it.
"""

from __future__ import annotations

import logging

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import WebAction, utcnow
from meddaemon.web import auth

log = logging.getLogger("meddaemon.web")

DONE = "done"
REFUSED = "refused"
FAILED = "failed"


async def admin_form(request: Request) -> tuple[auth.User, FormData]:
    """The form of an admin's action with a valid CSRF token; else 403."""
    form = await request.form()
    session: auth.Session | None = getattr(request.state, "session", None)
    sent = form.get(auth.CSRF_FIELD) or request.headers.get(auth.CSRF_HEADER)
    if not auth.csrf_ok(session, sent if isinstance(sent, str) else None):
        log.warning("refused %s %s: missing or wrong CSRF token", request.method, request.url.path)
        raise HTTPException(403, "This form is out of date or was not sent by the console (CSRF check failed).")
    assert session is not None
    if session.user is None or not session.user.may_act:
        who = session.user.name if session.user else "nobody"
        log.warning("refused %s %s: %s is not an admin", request.method, request.url.path, who)
        raise HTTPException(403, "Only an admin may do this.")
    return session.user, form


def record(request: Request, user: auth.User, action: str, target: str, outcome: str, detail: str) -> int:
    """Write the row of an action (its own transaction); returns its id."""
    from meddaemon.web.app import Console

    console: Console = request.app.state.console
    row = WebAction(
        at=utcnow(), user=user.name, role=user.role, action=action, target=target, outcome=outcome, detail=detail[:4000]
    )

    def write() -> int:
        with transaction(console.writer()) as session:
            session.add(row)
            session.flush()
            return row.id

    action_id = with_lock_retry(write)
    log.info("%s by %s (%s): %s: %s", action, user.name, user.role, target, outcome)
    return action_id
