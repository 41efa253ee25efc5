"""Keyset pagination of the worklist: every matching scan exactly once, newest first, however many
arrive while someone pages; on SQLite and PostgreSQL, on the indexes of migration 0009."""

from __future__ import annotations

from sqlalchemy import text
from starlette.testclient import TestClient

from daemon_rows import add_scan
from meddaemon.config import load_settings
from meddaemon.daemon import bookkeeper
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import utcnow
from meddaemon.db.readonly import read_only_engine
from meddaemon.engine.tasks import all_tasks
from meddaemon.states import ScanState
from meddaemon.web import queries
from meddaemon.web.app import create_app
from sql_statements import sqlite_query_plan

STATES = (ScanState.ARCHIVED, ScanState.FAILED, ScanState.ROUTED, ScanState.INFERRED)


def fill(engine, n: int, start: int = 0) -> None:  # type: ignore[no-untyped-def]
    """``n`` SYNTHETIC scan rows, states and tasks in turn."""
    with transaction(session_factory(engine)) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(session_factory(engine)) as session:
        for i in range(start, start + n):
            add_scan(session, i, STATES[i % 4], task_name="busi" if i % 3 else "covid", stored_path=None)


def flat(pages: list[list[int]]) -> list[int]:
    return [scan_id for page in pages for scan_id in page]


def pages(session_maker, f: queries.WorklistFilter, limit: int, between=None) -> list[list[int]]:  # type: ignore[no-untyped-def]
    out: list[list[int]] = []
    after = None
    while True:
        with session_maker() as session:
            page = queries.worklist(session, f, after, limit=limit)
        out.append([r.id for r in page.rows])
        if between:
            between()
        if page.next_after is None:
            return out
        after = page.next_after


def test_paging_visits_every_matching_scan_once_newest_first(migrated_engine):
    fill(migrated_engine, 237)
    sessions = session_factory(migrated_engine)
    with sessions() as session:
        everything = [r[0] for r in session.execute(text("SELECT id FROM scans ORDER BY id DESC"))]
        failed_busi = [
            r[0]
            for r in session.execute(
                text("SELECT id FROM scans WHERE state = 'failed' AND task_name = 'busi' ORDER BY id DESC")
            )
        ]
    all_pages = pages(sessions, queries.WorklistFilter(), 20)
    assert [len(p) for p in all_pages] == [20] * 11 + [17]
    assert flat(all_pages) == everything
    assert flat(pages(sessions, queries.WorklistFilter(state="failed", task="busi"), 7)) == failed_busi
    assert pages(sessions, queries.WorklistFilter(state="failed", task="nothing"), 7) == [[]]


def test_scans_that_arrive_while_paging_neither_repeat_nor_hide_a_row(migrated_engine):
    fill(migrated_engine, 100)
    sessions = session_factory(migrated_engine)
    with sessions() as session:
        before = [r[0] for r in session.execute(text("SELECT id FROM scans ORDER BY id DESC"))]
    arrivals = iter(range(1000, 1100, 10))

    def arrive() -> None:
        start = next(arrivals, None)
        if start is not None:
            fill(migrated_engine, 10, start)

    seen = flat(pages(sessions, queries.WorklistFilter(), 15, between=arrive))
    assert seen == before  # the newcomers are above page one: the next visit of page one shows them


def test_the_pages_link_to_the_next_one_through_http(migrated_engine, db_url, tmp_path):
    fill(migrated_engine, 120)
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    app = create_app(settings, reader=read_only_engine(db_url))
    client = TestClient(app, base_url="http://127.0.0.1")
    url, seen = "/worklist?state=archived", []
    while url:
        html = client.get(url).text
        seen += [int(part.split('"')[0]) for part in html.split('<tr class="scan" data-id="')[1:]]
        url = (
            html.split('id="next-page" hx-get="')[1].split('"')[0].replace("&amp;", "&") if "next-page" in html else ""
        )
    assert len(seen) == 30 and seen == sorted(seen, reverse=True) and len(set(seen)) == 30
    app.state.console.dispose()


def test_appended_rows_give_the_address_that_shows_them_all_again(migrated_engine, db_url, tmp_path):
    fill(migrated_engine, 440)  # 110 archived: pages of 50, 50 and 10
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    app = create_app(settings, reader=read_only_engine(db_url))
    client = TestClient(app, base_url="http://127.0.0.1")
    first = client.get("/worklist?state=archived&q=")
    next_url = first.text.split('id="next-page" hx-get="')[1].split('"')[0].replace("&amp;", "&")
    appended = client.get(next_url, headers={"HX-Request": "true"})
    last = [int(part.split('"')[0]) for part in appended.text.split('<tr class="scan" data-id="')[1:]][-1]
    assert appended.headers["HX-Replace-Url"] == f"/worklist?state=archived&through={last}"
    shown = client.get(appended.headers["HX-Replace-Url"]).text
    ids = [int(part.split('"')[0]) for part in shown.split('<tr class="scan" data-id="')[1:]]
    assert len(ids) == 100 and ids[-1] == last and ids == sorted(ids, reverse=True)
    assert 'id="next-page"' in shown and 'id="newest"' not in shown  # the third page is still to come
    assert ">Next 50</a>" in shown  # the next page's size, not the 100 rows shown (it said "Next 100")
    assert client.get("/worklist?through=x").status_code == 400
    assert client.get(f"/worklist?through={'9' * 5000}").status_code == 400
    app.state.console.dispose()


def test_a_state_filter_pages_on_its_index_on_sqlite(tmp_path):
    plan = sqlite_query_plan(
        tmp_path / "m.db", "SELECT id FROM scans WHERE state = 'failed' AND id < 500 ORDER BY id DESC LIMIT 51"
    )
    assert "ix_scans_state_id" in plan and "TEMP B-TREE" not in plan


def test_numbers_past_an_integer_key_are_refused_or_ignored_not_a_server_error(migrated_engine, db_url, tmp_path):
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    app = create_app(settings, reader=read_only_engine(db_url))
    client = TestClient(app, base_url="http://127.0.0.1")
    huge = "99999999999"  # PostgreSQL refused it in a comparison with an INTEGER key: a 500
    assert client.get(f"/worklist?after={huge}").status_code == 400
    assert client.get(f"/failures?action={huge}").status_code == 200
    assert client.get(f"/models?action={huge}").status_code == 200
    app.state.console.dispose()


def test_an_id_of_thousands_of_digits_is_refused_or_not_found_not_a_server_error(migrated_engine, db_url, tmp_path):
    """``int`` refuses a string of over 4,300 digits (a ValueError): every route taking an id gave a 500."""
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    app = create_app(settings, reader=read_only_engine(db_url))
    client = TestClient(app, base_url="http://127.0.0.1")
    endless = "9" * 5000
    for number in (endless, "0" * 5000 + "7"):  # leading zeros count towards int's limit too
        assert client.get(f"/worklist?after={number}").status_code in (200, 400)
        assert client.get(f"/failures?action={number}").status_code == 200
        assert client.get(f"/models?action={number}").status_code == 200
    assert client.get(f"/worklist?after={endless}").status_code == 400
    assert client.get(f"/scans/1/image.png?map={endless}").status_code == 404  # no scan 1: but not a 500
    for url in (
        f"/scans/{endless}",
        f"/scans/{endless}/image.png",
        f"/scans/{endless}/thumb.jpg",
        f"/heatmaps/{endless}.png",
        f"/heatmaps/{endless}/thumb.jpg",
        f"/reports/{endless}.pdf",
        f"/audits/{endless}",
        f"/audits/{endless}.json",
        f"/audits/{endless}.csv",
        f"/audits/{endless}.pdf",
    ):
        assert client.get(url).status_code == 404, url
    assert "There is no scan 7." in client.get("/scans/00000000000000000000007").text  # leading zeros: looked up
    app.state.console.dispose()


def test_query_values_no_scan_could_match_are_refused_or_ignored_not_a_server_error(migrated_engine, db_url, tmp_path):
    """Digits outside ASCII (``str.isdigit`` took them, ``int`` refused them), the last day there is,
    and a NUL, which PostgreSQL refuses in text: that was a "database unavailable" page."""
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    app = create_app(settings, reader=read_only_engine(db_url))
    client = TestClient(app, base_url="http://127.0.0.1")
    assert client.get("/worklist?after=\u00b2").status_code == 400
    assert client.get("/failures?action=\u00b2").status_code == 200
    assert client.get("/models?action=\u00b2").status_code == 200
    assert client.get("/worklist?until=9999-12-31").status_code == 200
    for query in ("q=a%00b", "task=busi%00", "label=x%00&call=positive"):
        response = client.get(f"/worklist?{query}")
        assert response.status_code == 400 and "NUL" in response.text, query
    app.state.console.dispose()


def test_a_reason_filter_lists_the_failed_scans_of_that_reason_not_yet_sent_for_retry(migrated_engine):
    """The failures page's "all N in the worklist" opened every failed scan, of every reason, those
    already sent for retry included: a larger set than the N it counted."""
    with transaction(session_factory(migrated_engine)) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(session_factory(migrated_engine)) as session:
        for i, (reason, retried) in enumerate(
            [("corrupt_image", False)] * 3 + [("empty_file", False), ("corrupt_image", True)]
        ):
            scan = add_scan(session, i, ScanState.FAILED, failure_reason=reason, stored_path=None)
            scan.retried_at = utcnow() if retried else None
    sessions = session_factory(migrated_engine)
    assert flat(pages(sessions, queries.WorklistFilter(reason="corrupt_image"), 10)) == [3, 2, 1]
