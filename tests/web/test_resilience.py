"""A database that is missing or down: the page says so (503, no traceback) and the console comes
back by itself once the database does."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from meddaemon.config import load_settings
from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import upgrade
from meddaemon.web.app import DOWN_RETRY_SECONDS, create_app


def client_for(db_url: str, tmp_path) -> TestClient:  # type: ignore[no-untyped-def]
    settings = load_settings(env={}, flags={"db": db_url, "state_dir": tmp_path, "watch": tmp_path / "inbox"})
    return TestClient(create_app(settings), base_url="http://127.0.0.1", raise_server_exceptions=False)


def assert_down(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 503
    assert 'id="database-down"' in response.text and "Traceback" not in response.text
    assert f'http-equiv="refresh" content="{DOWN_RETRY_SECONDS}"' in response.text  # it tries again by itself
    assert response.headers["retry-after"] == str(DOWN_RETRY_SECONDS)


def test_a_missing_sqlite_database_is_reported_and_the_console_recovers_when_it_appears(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'meddaemon.db'}"
    client = client_for(db_url, tmp_path)
    for url in ("/", "/worklist", "/scans/1", "/failures", "/models", "/audits"):
        assert_down(client.get(url))
    assert not (tmp_path / "meddaemon.db").exists()  # the console never creates it

    engine = create_db_engine(db_url)
    upgrade(engine)
    engine.dispose()

    assert client.get("/").status_code == 200
    assert client.get("/scans/1").status_code == 404


@pytest.mark.postgres
def test_a_postgresql_server_that_refuses_connections_is_reported_and_the_console_recovers(
    postgres_url, postgres_admin, tmp_path
):
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    name = postgres_url.rsplit("/", 1)[1]
    client = client_for(postgres_url, tmp_path)
    assert client.get("/").status_code == 200

    with postgres_admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
    try:
        assert_down(client.get("/"))
        assert_down(client.get("/worklist"))
        refresh = client.get("/", headers={"HX-Request": "true"})  # the overview's own refresh, every 10 s
        assert refresh.status_code == 503 and refresh.headers["HX-Refresh"] == "true"  # htmx drops an error's body
    finally:
        with postgres_admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))

    assert client.get("/").status_code == 200
    assert client.get("/worklist").status_code == 200
    assert "HX-Refresh" not in client.get("/", headers={"HX-Request": "true"}).headers


@pytest.mark.postgres
def test_an_id_past_any_integer_key_is_a_404_on_postgresql_not_a_database_error(postgres_url, tmp_path):
    engine = create_db_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    client = client_for(postgres_url, tmp_path)
    past = 2**31  # one past PostgreSQL's INTEGER, which would refuse to compare a key with it
    for url in (
        f"/scans/{past}",
        f"/scans/{past}/image.png",
        f"/scans/{past}/thumb.jpg",
        f"/heatmaps/{past}.png",
        f"/heatmaps/{past}/thumb.jpg",
        f"/reports/{past}.pdf",
        f"/audits/{past}",
        f"/audits/{past}.json",
        f"/audits/{past}.csv",
        f"/audits/{past}.pdf",
    ):
        page = client.get(url)
        assert page.status_code == 404, url
        assert "Traceback" not in page.text
    assert f"There is no scan {past}." in client.get(f"/scans/{past}").text
    assert client.get(f"/scans/{past - 1}").status_code == 404  # the largest key is still looked up


def test_a_page_that_fails_unexpectedly_is_the_error_page_with_its_headers_and_reloads_an_htmx_part(
    tmp_path, monkeypatch
):
    """Starlette answers an exception outside the middleware: the 500 went out without the
    security headers, and the overview's refresh kept old figures on screen as current."""
    db_url = f"sqlite:///{tmp_path / 'meddaemon.db'}"
    engine = create_db_engine(db_url)
    upgrade(engine)
    engine.dispose()
    client = client_for(db_url, tmp_path)

    def fails(session):  # type: ignore[no-untyped-def]
        raise RuntimeError("a fault in the query")

    monkeypatch.setattr("meddaemon.web.queries.overview", fails)
    page = client.get("/")
    assert page.status_code == 500 and "Something went wrong" in page.text and "Traceback" not in page.text
    assert page.headers["Cache-Control"] == "no-store" and "Content-Security-Policy" in page.headers
    refresh = client.get("/", headers={"HX-Request": "true"})
    assert refresh.status_code == 500 and refresh.headers["HX-Refresh"] == "true"


@pytest.mark.postgres
def test_an_action_when_the_database_is_gone_is_a_503_not_a_server_error(postgres_url, postgres_admin, tmp_path):
    """Pages said 503 'cannot read the database'; Retry, Promote and Retire were a 500 and a traceback."""
    from meddaemon.web import auth

    engine = create_db_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    name = postgres_url.rsplit("/", 1)[1]
    client = client_for(postgres_url, tmp_path)
    client.get("/failures")  # an empty database: no form on the page to read the CSRF token from
    csrf = client.app.state.console.signer.load(client.cookies[auth.COOKIE]).csrf
    with postgres_admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
    try:
        for url, form in (
            ("/failures/retry", {"scan": "1"}),
            ("/models/busi/v2/promote", {"confirm": "busi/v2"}),
            ("/models/busi/v2/retire", {"confirm": "busi/v2"}),
        ):
            response = client.post(url, data={**form, "csrf": csrf})
            assert response.status_code == 503, (url, response.text)
            assert 'id="database-down"' in response.text and "could not be recorded" in response.text
    finally:
        with postgres_admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))


@pytest.mark.postgres
def test_an_action_over_a_link_that_stops_answering_is_a_503_in_bounded_time(postgres_url, tmp_path):
    """The actions' engine had none of the daemon's bounds: over a link that acknowledges and never
    answers (a paused server, a hung pooler), a Retry held its thread for as long as it lasted."""
    import threading
    import time

    from sqlalchemy.engine import make_url

    from meddaemon.web import auth
    from tcp_proxy import tcp_proxy

    engine = create_db_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    where = make_url(postgres_url)
    with tcp_proxy((where.host or "127.0.0.1", where.port or 5432)) as frozen:
        through = where.set(host="127.0.0.1", port=frozen.port).render_as_string(hide_password=False)
        settings = load_settings(
            env={}, flags={"db": through, "state_dir": tmp_path, "watch": tmp_path / "inbox", "db_keepalive_seconds": 1}
        )
        client = TestClient(create_app(settings), base_url="http://127.0.0.1", raise_server_exceptions=False)
        client.get("/failures")
        csrf = client.app.state.console.signer.load(client.cookies[auth.COOKIE]).csrf
        assert client.post("/failures/retry", data={"scan": "1", "csrf": csrf}).status_code == 200  # the writer made
        frozen.freeze()
        answered: list[int] = []
        began = time.monotonic()

        def retry() -> None:
            answered.append(client.post("/failures/retry", data={"scan": "1", "csrf": csrf}).status_code)

        action = threading.Thread(target=retry, daemon=True)
        action.start()
        action.join(60)
        took = time.monotonic() - began
        frozen.thaw()
    assert answered == [503], f"no answer within {took:.0f} s"
