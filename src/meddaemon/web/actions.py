"""What an action needs before it runs, and what it leaves behind: the role, the CSRF token, a row
in ``web_actions``.

A request that is not allowed (not an admin, no or a wrong CSRF token) is a 403 before anything is
read from its form into a library call; nothing changes. Allowed actions are recorded, whatever
their outcome, with the user, the role, the action, its target and a line on what came of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import WebAction, utcnow
from meddaemon.logs import error_line
from meddaemon.web import auth

if TYPE_CHECKING:
    from meddaemon.web.app import Console

log = logging.getLogger("meddaemon.web")
T = TypeVar("T")

#: the longest an action waits for another writer's lock (``busy_timeout`` where longer): a click
#: held a server thread for as long as a writer held the database, and the pages share those threads
LOCK_WAIT_SECONDS = 10.0

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


def lock_wait_over(console: Console) -> Callable[[], bool]:
    """Whether an action begun now has waited long enough for other writers' locks: ``LOCK_WAIT_SECONDS``
    (or ``busy_timeout``, where longer)."""
    deadline = time.monotonic() + max(LOCK_WAIT_SECONDS, console.settings.busy_timeout)
    return lambda: time.monotonic() >= deadline


def past_other_writers(console: Console, work: Callable[[], T]) -> T:
    """``work`` (one whole transaction) tried again while another writer holds the database, for at
    most ``LOCK_WAIT_SECONDS`` (or ``busy_timeout``); then its lock error is raised."""
    return with_lock_retry(work, should_stop=lock_wait_over(console))


def record(request: Request, user: auth.User, action: str, target: str, outcome: str, detail: str) -> int:
    """Write the row of an action (its own transaction); returns its id. A database that cannot take
    it is ``DatabaseDown`` (a 503 page saying why); the server's log says what came of the action."""
    from meddaemon.web.app import DatabaseDown

    console: Console = request.app.state.console
    row = WebAction(
        at=utcnow(), user=user.name, role=user.role, action=action, target=target, outcome=outcome, detail=detail[:4000]
    )

    def write() -> int:
        with transaction(console.writer()) as session:
            session.add(row)
            session.flush()
            return row.id

    try:
        action_id = past_other_writers(console, write)
    except SQLAlchemyError as exc:
        log.warning("%s by %s (%s): %s: %s, not recorded: %s", action, user.name, user.role, target, outcome,
                    error_line(exc))  # fmt: skip
        raise DatabaseDown(f"the {action} of {target} ({outcome}) could not be recorded: {error_line(exc)}") from None
    log.info("%s by %s (%s): %s: %s", action, user.name, user.role, target, outcome)
    return action_id
