"""Failures by reason, with the sentence; Retry one scan or a whole reason (``retry_failed``, as ``medcli retry``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from meddaemon.db.models import row_id
from meddaemon.failures import FailureReason
from meddaemon.logs import error_line
from meddaemon.web import actions, queries
from meddaemon.web.app import Console, render

if TYPE_CHECKING:
    from meddaemon.daemon.retry import Refused


def failures_page(request: Request) -> Response:
    console: Console = request.app.state.console
    done = request.query_params.get("action", "")

    def read(session):  # type: ignore[no-untyped-def]
        action = queries.action(session, action_id) if (action_id := row_id(done)) is not None else None
        return queries.failures(session), action

    groups, action = console.read(read)
    return render(request, "failures.html", title="Failures", groups=groups, action=action)


async def retry(request: Request) -> Response:
    user, form = await actions.admin_form(request)
    scan, reason = str(form.get("scan", "")).strip(), str(form.get("reason", "")).strip()
    if bool(scan) == bool(reason):
        raise HTTPException(400, "Retry one scan (its id) or one reason, not both.")
    if scan and row_id(scan) is None:
        raise HTTPException(400, "A scan is retried by its id.")
    if reason and reason not in {r.value for r in FailureReason}:
        raise HTTPException(400, f"There is no failure reason {reason!r}.")
    console: Console = request.app.state.console

    def work() -> int:
        from meddaemon.daemon.retry import Selector, retry_failed

        target = f"scan {scan}" if scan else f"reason {reason}"
        try:
            # a person's click sends back every scan of the reason, as naming each would: also those
            # whose bytes failed the same way after a retry, which a schedule leaves alone
            selector = Selector(scan=scan or None, reason=reason or None, again=bool(reason))
            result = retry_failed(
                console.writer(), console.settings, selector, should_stop=actions.lock_wait_over(console)
            )
        except Exception as exc:
            failure = f"{type(exc).__name__}: {error_line(exc)}"  # never the statement, nor its parameters
            return actions.record(request, user, "retry", target, actions.FAILED, failure)
        parts = [f"sent back {len(result.requeued)} scan(s)" + (
            ": " + ", ".join(str(r.scan_id) for r in result.requeued[:50]) if result.requeued else "")]  # fmt: skip
        left = [r for r in result.requeued if r.left_in_failed]
        parts += [f"scan {r.scan_id}: {r.left_in_failed}; the next retry removes it" for r in left[:REFUSALS_NAMED]]
        parts += _refusals(result.refused, result.left_alone)
        if result.without_original:
            parts.append(f"{result.without_original} kept no file (vanished)")
        # a stale page: retried meanwhile, or none left
        if not result.requeued and not result.refused and not result.left_alone:
            parts.append(f"no failed scan of {target} waits for a retry (sent back already, or none kept its file)")
        outcome = actions.DONE if result.ok and result.requeued else actions.REFUSED
        return actions.record(request, user, "retry", target, outcome, "; ".join(parts))

    action_id = await run_in_threadpool(work)
    return RedirectResponse(f"/failures?action={action_id}", status_code=303)


routes = [
    Route("/failures", failures_page),
    Route("/failures/retry", retry, methods=["POST"]),
]


#: of a bulk retry's refusals, the action's record names this many (it holds 4000 characters)
REFUSALS_NAMED = 8


def _refusals(refused: list[Refused], left_alone: list[Refused]) -> list[str]:
    """How many were refused, and left alone (no retry can send them back), and why, then the
    first few, then how many more: the record was cut at 4000 characters mid-sentence and never
    said how many of the reason stayed failed."""
    kinds = [(verb, some) for verb, some in (("refused", refused), ("left alone", left_alone)) if some]
    said = [(verb, r) for verb, some in kinds for r in some]
    counts = [(verb, len(some), Counter(r.code.value for r in some)) for verb, some in kinds]
    summaries = [f"{verb} {n}: " + ", ".join(f"{k} {code}" for code, k in by.most_common()) for verb, n, by in counts]
    named = [f"{verb} ({r.code.value}): {r.message[:300]}" for verb, r in said[:REFUSALS_NAMED]]
    more = [f"and {len(said) - REFUSALS_NAMED} more"] if len(said) > REFUSALS_NAMED else []
    return [*summaries, *named, *more]
