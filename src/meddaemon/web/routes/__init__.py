"""The console's pages, one module each; ``all_routes`` gathers them."""

from __future__ import annotations

from starlette.routing import BaseRoute


def all_routes() -> list[BaseRoute]:
    from meddaemon.web.routes import audits, failures, login, models, overview, scans, worklist

    return [
        *login.routes,
        *overview.routes,
        *worklist.routes,
        *scans.routes,
        *failures.routes,
        *models.routes,
        *audits.routes,
    ]
