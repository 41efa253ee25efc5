"""Model versions per task with their cards (the manifest, and the model card with its figures that
``medcli retrain`` wrote and the registry keeps beside the weights); promote and retire after a
confirmation (``engine.registry``)."""

from __future__ import annotations

from urllib.parse import quote

from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from meddaemon.db.models import row_id
from meddaemon.engine.card import figure_type, read_card
from meddaemon.logs import error_line
from meddaemon.web import actions, queries
from meddaemon.web.app import Console, render
from meddaemon.web.cards import card_html

VERBS = {"promote": "Promote", "retire": "Retire"}


def figure_url(row: queries.ModelRow, name: str) -> str:
    return f"/models/{quote(row.task)}/{quote(row.version)}/card/{quote(name)}"


def models_page(request: Request) -> Response:
    console: Console = request.app.state.console
    done = request.query_params.get("action", "")

    def read(session):  # type: ignore[no-untyped-def]
        action = queries.action(session, action_id) if (action_id := row_id(done)) is not None else None
        return queries.model_versions(session), action

    versions, action = console.read(read)
    cards: dict[int, Markup] = {}
    for row in (r for rows in versions.values() for r in rows):
        card = read_card(console.settings.stored_file(row.path)) if row.path else None
        if card is not None:
            cards[row.id] = card_html(card, lambda name, row=row: figure_url(row, name))  # type: ignore[misc]
    return render(request, "models.html", title="Models", versions=versions, cards=cards, action=action)


def _version(request: Request) -> queries.ModelRow:
    console: Console = request.app.state.console
    task, version = request.path_params["task"], request.path_params["version"]
    row = console.read(lambda s: queries.model_version(s, task, version))
    if row is None:
        raise HTTPException(404, f"There is no model version {task}/{version}.")
    return row


def card_figure(request: Request) -> Response:
    """A figure of a version's model card, from its folder in the registry."""
    console: Console = request.app.state.console
    row, name = _version(request), request.path_params["name"]
    folder = console.settings.stored_file(row.path)
    card = read_card(folder)
    media = figure_type(name)
    if card is None or media is None or name not in card.figures:
        raise HTTPException(404, f"The card of {row.task}/{row.version} has no figure {name!r}.")
    return FileResponse(folder / name, media_type=media, headers={"Cache-Control": "private, max-age=300"})


def confirm_page(request: Request) -> Response:
    """What the action will do, and the form that does it."""
    verb = request.path_params["verb"]
    if verb not in VERBS:
        raise HTTPException(404, "No such action.")
    user = request.state.session.user
    if user is None or not user.may_act:
        raise HTTPException(403, "Only an admin may promote or retire a model.")
    row = _version(request)
    console: Console = request.app.state.console
    active = console.read(queries.overview).active_models.get(row.task)
    return render(request, "confirm.html", title=f"{VERBS[verb]} {row.task}/{row.version}", verb=verb, row=row,
                  active=active)  # fmt: skip


async def act(request: Request) -> Response:
    verb = request.path_params["verb"]
    if verb not in VERBS:
        raise HTTPException(404, "No such action.")
    user, form = await actions.admin_form(request)
    task, version = request.path_params["task"], request.path_params["version"]
    if form.get("confirm") != f"{task}/{version}":
        raise HTTPException(400, "The action was not confirmed.")
    console: Console = request.app.state.console

    def work() -> int:
        from meddaemon.db.engine import session_factory, transaction
        from meddaemon.engine import registry

        target = f"{task}/{version}"
        verified: registry.Registered | None = None

        def transact() -> tuple[str, str]:
            """(what it did, or "" and why it did nothing), in one transaction, tried again past a lock."""
            with transaction(console.writer()) as session:
                # the task's row before the version's, as medcli and the registry lock them: the other
                # order deadlocked with a medcli promote or retire of the same version
                registry.lock_task(session, task)
                # a stale page, a second tab, a double submit: recorded as what it did, nothing
                row = registry.get_version(session, task, version, for_update=True)
                status = row.status
                refused = verb == "promote" and row.refusal is not None  # promoted again: its refusal cleared
                if status == {"promote": "active", "retire": "retired"}[verb] and not refused:
                    return "", f"{target} is {status} already: nothing done"
                if verb == "promote":
                    registry.promote(session, task, version, verified=verified)
                    cleared = "; a daemon's refusal of it is cleared: the daemons try it again" if refused else ""
                    return f"{target} is the active model of {task}{cleared}", ""
                registry.retire(session, task, version)
                return f"{target} is retired", ""

        try:
            if verb == "promote":  # before its transaction (the self-test takes seconds), read as the pages read
                settings = console.settings
                verified = registry.verify_registered_copy(
                    session_factory(console.reader), task, version, settings.state_dir, settings.task_specs
                )
            detail, done_before = actions.past_other_writers(console, transact)
        except registry.RegistryError as exc:  # ModelRefused too: verification failed
            return actions.record(
                request, user, verb, target, actions.REFUSED, f"refused ({exc.reason}): {exc.message}"
            )
        except Exception as exc:
            return actions.record(
                request, user, verb, target, actions.FAILED, f"{type(exc).__name__}: {error_line(exc)}"
            )
        if done_before:
            return actions.record(request, user, verb, target, actions.REFUSED, done_before)
        return actions.record(request, user, verb, target, actions.DONE, detail)

    action_id = await run_in_threadpool(work)
    return RedirectResponse(f"/models?action={action_id}", status_code=303)


routes = [
    Route("/models", models_page),
    Route("/models/{task}/{version}/card/{name}", card_figure),
    Route("/models/{task}/{version}/{verb}", confirm_page, methods=["GET"]),
    Route("/models/{task}/{version}/{verb}", act, methods=["POST"]),
]
