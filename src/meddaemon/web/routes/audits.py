"""Stored audits (``medcli audit``): their tables, the PDF kept with them (``--pdf``: inline and to
download), and the results as JSON and tidy CSV."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meddaemon.web import queries
from meddaemon.web.app import Console, path_row_id, render

NO_AUDIT = "There is no audit {id}."


def audits_page(request: Request) -> Response:
    console: Console = request.app.state.console
    return render(request, "audits.html", title="Audits", audits=console.read(queries.audits))


def _audit(request: Request) -> queries.AuditRow:
    console: Console = request.app.state.console
    audit_id = path_row_id(request, "audit_id", NO_AUDIT)
    row = console.read(lambda s: queries.audit(s, audit_id))
    if row is None:
        raise HTTPException(404, NO_AUDIT.format(id=audit_id))
    return row


def audit_page(request: Request) -> Response:
    from meddaemon.audit.tidy import stored_rows  # the audit's code, on the first audit asked for

    row = _audit(request)
    rows = stored_rows(row.results)
    return render(request, "audit.html", title=f"Audit {row.id}", audit=row,
                  overall=[r for r in rows if r["scope"] in ("overall", "multiclass")],
                  subgroups=[r for r in rows if r["scope"] == "subgroup"])  # fmt: skip


def audit_json(request: Request) -> Response:
    row = _audit(request)
    body = json.dumps({"id": row.id, "parameters": row.parameters, "results": row.results}, indent=2, sort_keys=True)
    return Response(body, media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="audit-{row.id}.json"'})  # fmt: skip


def audit_csv(request: Request) -> Response:
    """The tidy CSV ``medcli audit --csv`` wrote for it, row for row."""
    from meddaemon.audit.tidy import csv_text, stored_rows

    row = _audit(request)
    return Response(csv_text(stored_rows(row.results)), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="audit-{row.id}.csv"'})  # fmt: skip


def audit_pdf(request: Request) -> Response:
    """The PDF kept with the audit, inline (the page shows it; ``download`` on a link saves it)."""
    console: Console = request.app.state.console
    audit_id = path_row_id(request, "audit_id", NO_AUDIT)
    data = console.read(lambda s: queries.audit_pdf(s, audit_id))
    if data is None:
        _audit(request)  # 404 for an audit that does not exist
        raise HTTPException(404, f"No PDF was kept with audit {audit_id} (medcli audit --pdf FILE keeps one).")
    return Response(data, media_type="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="audit-{audit_id}.pdf"'})  # fmt: skip


routes = [
    Route("/audits", audits_page),
    Route("/audits/{audit_id:row_id}", audit_page),
    Route("/audits/{audit_id:row_id}.json", audit_json),
    Route("/audits/{audit_id:row_id}.csv", audit_csv),
    Route("/audits/{audit_id:row_id}.pdf", audit_pdf),
]
