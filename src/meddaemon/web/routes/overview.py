"""The overview: scans per state, scans registered and inferred per hour (the throughput), failures by reason,
daemons, models, the queue."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meddaemon.states import ScanState
from meddaemon.web import queries
from meddaemon.web.app import Console, render
from meddaemon.web.charts import bar_chart


def overview(request: Request) -> Response:
    console: Console = request.app.state.console
    data, actions = console.read(lambda s: (queries.overview(s), queries.recent_actions(s, 10)))
    registered = [h.count for h in data.registered_per_hour]
    inferred = [h.count for h in data.inferred_per_hour]
    chart = bar_chart(
        [f"{h.start:%H}h" for h in data.registered_per_hour],
        [("registered", registered), ("inferred", inferred)],
        title="scans registered and inferred per hour",
    )
    template = "overview_body.html" if request.headers.get("hx-request") else "overview.html"
    return render(
        request,
        template,
        title="Overview",
        data=data,
        actions=actions,
        chart=chart,
        states=[s.value for s in ScanState],
    )


routes = [Route("/", overview)]
