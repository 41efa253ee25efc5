"""One scan: its picture with each heatmap over it, calls, history, report and metadata; and the pictures."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from meddaemon.db.models import row_id
from meddaemon.engine.tasks import InputContract
from meddaemon.web import images, queries
from meddaemon.web.app import Console, path_row_id, render

NOT_FOUND = "There is no scan {id}."
NO_HEATMAP = "There is no heatmap {id}."
NO_REPORT = "There is no report {id}."


def _sees_phi(request: Request) -> bool:
    user = request.state.session.user
    return bool(user and user.sees_patient_data)


def scan_page(request: Request) -> Response:
    console: Console = request.app.state.console
    scan_id = path_row_id(request, "scan_id", NOT_FOUND)
    detail = console.read(lambda s: queries.scan_detail(s, scan_id, with_phi=_sees_phi(request)))
    if detail is None:
        raise HTTPException(404, NOT_FOUND.format(id=scan_id))
    reports = [r for r in detail.reports if _sees_phi(request) or not r.with_phi]
    report = next((r for r in reports if r.with_phi), None) or (reports[0] if reports else None)
    return render(request, "scan.html", title=f"Scan {scan_id}", scan=detail, report=report)


#: a patient's pictures are not kept by the browser: kept for 5 minutes, the next person at a shared
#: workstation opened them after the clinician had signed out, as the pages already are not
NO_STORE = {"Cache-Control": "no-store"}


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers=NO_STORE)


def _jpeg(data: bytes) -> Response:
    return Response(data, media_type="image/jpeg", headers=NO_STORE)


def scan_image(request: Request) -> Response:
    """The stored scan; with ``?map=ID`` resized to that heatmap's size, so the layer lies over it exactly."""
    console: Console = request.app.state.console
    scan_id, found = _picture_of(request)
    size, contract = None, None
    map_id = request.query_params.get("map", "")
    heatmap_id = row_id(map_id)
    if heatmap_id is not None:
        files = console.read(lambda s: queries.heatmap_files(s, heatmap_id))
        if files is not None and files.scan_id == scan_id and files.map_size is not None:
            size = (files.map_size[1], files.map_size[0])
            contract = InputContract.from_dict(files.contract) if files.contract else None
    try:
        path = console.settings.stored_file(found.path)
        options = console.settings.decode_options
        return _png(images.scan_png(path, options, size, sha256=found.sha256, contract=contract))
    except images.NoPicture as exc:
        raise HTTPException(404, str(exc)) from None


def _picture_of(request: Request) -> tuple[int, queries.ScanPicture]:
    """The scan of the request's path and its kept file; a 404 saying why it has no picture (the
    thumbnail said "There is no scan N." of a scan whose file was not kept)."""
    console: Console = request.app.state.console
    scan_id = path_row_id(request, "scan_id", NOT_FOUND)
    found = console.read(lambda s: queries.scan_picture(s, scan_id))
    if found is None:
        raise HTTPException(404, NOT_FOUND.format(id=scan_id))
    if found.crashed_a_decoder:
        raise HTTPException(404, f"Scan {scan_id} is not shown: its file crashed a decoding worker.")
    if found.never_decoded:
        raise HTTPException(404, f"Scan {scan_id} has no picture: the daemon could not decode its file.")
    if found.path is None:
        raise HTTPException(404, f"No file of scan {scan_id} was kept.")
    return scan_id, found


def scan_thumbnail(request: Request) -> Response:
    console: Console = request.app.state.console
    _, found = _picture_of(request)
    try:
        path = console.settings.stored_file(found.path)
        return _jpeg(images.thumbnail_jpeg(path, console.settings.decode_options, sha256=found.sha256))
    except images.NoPicture as exc:
        raise HTTPException(404, str(exc)) from None


def _heatmap(request: Request) -> queries.HeatmapFiles:
    console: Console = request.app.state.console
    heatmap_id = path_row_id(request, "heatmap_id", NO_HEATMAP)
    files = console.read(lambda s: queries.heatmap_files(s, heatmap_id))
    if files is None:
        raise HTTPException(404, NO_HEATMAP.format(id=heatmap_id))
    return files


def heatmap_layer(request: Request) -> Response:
    console: Console = request.app.state.console
    try:
        return _png(images.heatmap_png(console.settings, _heatmap(request)))
    except images.NoPicture as exc:
        raise HTTPException(404, str(exc)) from None


def heatmap_thumbnail(request: Request) -> Response:
    """The heatmap's overlay JPEG (the report's; drawn and kept here if nothing drew it yet), made small."""
    console: Console = request.app.state.console
    try:
        return _jpeg(images.thumbnail_of(images.heatmap_overlay(console.settings, _heatmap(request))))
    except images.NoPicture as exc:
        raise HTTPException(404, str(exc)) from None


def report_pdf(request: Request) -> Response:
    """A scan's PDF, inline; one with patient data only for those who may see it."""
    console: Console = request.app.state.console
    report_id = path_row_id(request, "report_id", NO_REPORT)
    found = console.read(lambda s: queries.report_file(s, report_id))
    if found is None:
        raise HTTPException(404, NO_REPORT.format(id=report_id))
    _, stored, with_phi = found
    if with_phi and not _sees_phi(request):
        raise HTTPException(403, "This report holds patient data, which your role does not show.")
    path = console.settings.stored_file(stored)
    if not path.is_file():
        raise HTTPException(404, f"The file of report {report_id} is gone.")
    return FileResponse(
        path,
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="report-{report_id}.pdf"', "Cache-Control": "no-store"},
    )


routes = [
    Route("/scans/{scan_id:row_id}", scan_page),
    Route("/scans/{scan_id:row_id}/image.png", scan_image),
    Route("/scans/{scan_id:row_id}/thumb.jpg", scan_thumbnail),
    Route("/heatmaps/{heatmap_id:row_id}.png", heatmap_layer),
    Route("/heatmaps/{heatmap_id:row_id}/thumb.jpg", heatmap_thumbnail),
    Route("/reports/{report_id:row_id}.pdf", report_pdf),
]
