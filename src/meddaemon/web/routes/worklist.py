"""The worklist: scans newest first with their top call, filtered, searched, paged by keyset."""

from __future__ import annotations

from datetime import date
from urllib.parse import urlencode

from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meddaemon.db.models import row_id
from meddaemon.failures import FailureReason
from meddaemon.states import PERSISTED
from meddaemon.web import queries
from meddaemon.web.app import Console, render


def parse_filter(request: Request) -> tuple[queries.WorklistFilter, int | None, int | None]:
    """The filters, the keyset position (``after``) and how far down the rows were loaded (``through``)
    of the query string; a value that makes no sense is a 400."""
    params = request.query_params

    def day(name: str) -> date | None:
        value = params.get(name, "").strip()
        if not value:
            return None
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise HTTPException(400, f"{name} must be a date as YYYY-MM-DD") from None

    state = params.get("state", "").strip()
    if state and state not in {s.value for s in PERSISTED}:
        raise HTTPException(400, f"there is no state {state!r}")
    call = params.get("call", "").strip()
    if call and call not in queries.CALLS:
        raise HTTPException(400, "call must be positive or negative")
    reason = params.get("reason", "").strip()
    if reason and reason not in {r.value for r in FailureReason}:
        raise HTTPException(400, f"there is no failure reason {reason!r}")
    after, through = scan_id_param(params, "after"), scan_id_param(params, "through")
    f = queries.WorklistFilter(
        state=state,
        task=params.get("task", "").strip()[:64],
        label=params.get("label", "").strip()[:64],
        call=call,
        since=day("since"),
        until=day("until"),
        q=params.get("q", "").strip()[:200],
        reason=reason,
    )
    return f, after, through


def scan_id_param(params: QueryParams, name: str) -> int | None:
    text = params.get(name, "").strip()
    value = row_id(text) if text else None
    if text and value is None:
        raise HTTPException(400, f"{name} must be a scan id")
    return value


def worklist(request: Request) -> Response:
    console: Console = request.app.state.console
    f, after, through = parse_filter(request)
    user = request.state.session.user
    with_phi = bool(user and user.sees_patient_data)

    def read(session):  # type: ignore[no-untyped-def]
        page = queries.worklist(session, f, after, with_phi=with_phi, through=through)
        return page, queries.overview_choices(session)

    page, choices = console.read(read)
    base = f.query_params()
    next_url = f"/worklist?{urlencode({**base, 'after': page.next_after})}" if page.next_after else None
    if request.headers.get("hx-request") and after:
        # rows appended below the loaded ones: the address then says how far down they go, so that
        # Back from a scan, or a reload, shows them all again (not the first page alone)
        response = render(
            request, "worklist_rows.html", page=page, next_url=next_url, with_phi=with_phi, page_size=queries.PAGE_SIZE
        )
        if page.rows:
            response.headers["HX-Replace-Url"] = f"/worklist?{urlencode({**base, 'through': page.rows[-1].id})}"
        return response
    return render(
        request,
        "worklist.html",
        title="Worklist",
        page=page,
        f=f,
        choices=choices,
        states=sorted(s.value for s in PERSISTED),
        first_url=f"/worklist?{urlencode(base)}" if after else None,
        next_url=next_url,
        with_phi=with_phi,
        page_size=queries.PAGE_SIZE,
    )


routes = [Route("/worklist", worklist)]
