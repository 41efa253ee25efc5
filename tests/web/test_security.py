"""Who may see and do what: loopback by default, sign-in beyond it, roles, CSRF on every action,
no patient data in URLs or logs, and tampered forms refused with nothing changed."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import ModelVersion, Scan, WebAction
from meddaemon.web import auth
from meddaemon.web.app import create_app
from model_factory import PHI_STRINGS
from web_factory import PASSWORD, csrf_of, signed_in, web_settings


def read(root, query):  # type: ignore[no-untyped-def]
    engine = create_db_engine(web_settings(root).db_url)
    try:
        with session_factory(engine)() as session:
            return list(session.execute(query).all())
    finally:
        engine.dispose()


def test_a_password_hash_verifies_its_password_only():
    stored = auth.hash_password("synthetic secret")
    assert stored.startswith("scrypt$") and "synthetic secret" not in stored
    assert auth.verify_password("synthetic secret", stored)
    assert not auth.verify_password("synthetic secreT", stored)
    assert not auth.verify_password("synthetic secret", "garbage")


def test_an_unknown_user_costs_the_same_one_scrypt_as_a_wrong_password(filled_root):
    """Two scrypts for an unknown name and one for a known one told, by the time taken, which names
    are users (27 ms against 54 ms here)."""
    import hashlib
    from unittest.mock import patch

    policy = create_app(web_settings(filled_root)).state.console.policy
    policy.login("nobody", "synthetic guess")  # whatever is computed once, before the first attempt
    for name in ("nobody", "admin"):
        with patch.object(auth.hashlib, "scrypt", wraps=hashlib.scrypt) as scrypt:
            assert policy.login(name, "synthetic guess") is None
        assert scrypt.call_count == 1, name


def test_tokens_and_cookies_outside_ascii_are_refused_not_a_server_error(filled_root):
    """``hmac.compare_digest`` raises on a ``str`` outside ASCII: a 500 on every page, for a cookie."""
    signer = auth.SessionSigner()
    assert signer.load("abc.\u00e9") is None
    assert not auth.csrf_ok(signer.new(None), "\u00e9")
    client = signed_in(create_app(web_settings(filled_root)), "admin")
    before = read(filled_root, select(Scan.id, Scan.state, Scan.retried_at).order_by(Scan.id))
    for url in ("/failures/retry", "/logout"):
        response = client.post(url, data={"reason": "unroutable", "csrf": "\u00e9"})
        assert response.status_code == 403, url
    assert read(filled_root, select(Scan.id, Scan.state, Scan.retried_at).order_by(Scan.id)) == before
    assert client.get("/worklist").status_code == 200  # still signed in
    client.cookies.clear()
    cookie = f"{auth.COOKIE}=abc.\u00e9".encode()
    assert client.get("/worklist", headers={"cookie": cookie}, follow_redirects=False).status_code == 303


def test_a_bind_beyond_loopback_without_users_or_a_proxy_header_is_refused(tmp_path):
    settings = web_settings(tmp_path).__class__(state_dir=tmp_path)  # no users
    with pytest.raises(auth.AuthError, match="without authentication"):
        create_app(settings, host="0.0.0.0")
    create_app(settings, host="127.0.0.1").state.console.dispose()
    create_app(settings, host="::1").state.console.dispose()


def test_on_loopback_without_users_the_operator_is_admin(filled_root):
    settings = web_settings(filled_root).__class__(state_dir=filled_root / "state")
    client = TestClient(create_app(settings), base_url="http://127.0.0.1")
    html = client.get("/models").text
    assert "local operator" in html and "admin" in html and 'id="retire-busi-v1"' in html


def test_with_users_every_page_needs_a_sign_in(filled_root):
    client = TestClient(create_app(web_settings(filled_root)), base_url="http://127.0.0.1")
    for url, sign_in in (
        ("/", "/login"),
        ("/worklist", "/login?next=/worklist"),
        ("/scans/1", "/login?next=/scans/1"),
        ("/failures", "/login?next=/failures"),
        ("/models", "/login?next=/models"),
        ("/audits", "/login?next=/audits"),
        ("/heatmaps/1.png", "/login?next=/heatmaps/1.png"),
    ):
        response = client.get(url, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == sign_in, url
    login = client.get("/login")
    wrong = client.post("/login", data={"user": "admin", "password": "nope", "csrf": csrf_of(login.text)})
    assert wrong.status_code == 401 and "wrong password" in wrong.text
    no_token = client.post("/login", data={"user": "admin", "password": PASSWORD})
    assert no_token.status_code == 403


def test_a_request_without_the_cookie_leaves_the_session_signed_in_and_sign_in_returns_to_the_page(filled_root):
    """A link from another site brought no cookie (SameSite=Strict): the console set a new session
    over the signed-in one, signing the person out in every tab, and after signing in again showed
    the overview, not the page the link named."""
    app = create_app(web_settings(filled_root))
    client = signed_in(app, "viewer")
    session_cookie = client.cookies[auth.COOKIE]
    from_elsewhere = TestClient(app, base_url="http://127.0.0.1").get("/scans/1?x=1", follow_redirects=False)
    assert from_elsewhere.headers["location"] == "/login?next=/scans/1%3Fx%3D1"
    assert "set-cookie" not in from_elsewhere.headers
    assert (
        client.get("/worklist", follow_redirects=False).status_code == 200
        and client.cookies[auth.COOKIE] == session_cookie
    )
    for url in ("/login", "/logout", "/failures/retry"):  # a form on another site, posted here without the cookie
        posted = TestClient(app, base_url="http://127.0.0.1").post(url, data={"user": "x"}, follow_redirects=False)
        assert posted.status_code in (303, 403) and "set-cookie" not in posted.headers, url

    anonymous = TestClient(app, base_url="http://127.0.0.1")
    assert TestClient(app, base_url="http://127.0.0.1").head("/login").status_code == 200  # it was a form posted: 403
    login = anonymous.get("/login?next=/scans/1%3Fx%3D1")
    assert "samesite=lax" in login.headers["set-cookie"].lower() and 'name="next" value="/scans/1?x=1"' in login.text
    wrong = anonymous.post(
        "/login", data={"user": "viewer", "password": "nope", "next": "/scans/1", "csrf": csrf_of(login.text)}
    )
    assert 'value="viewer"' in wrong.text and 'name="next" value="/scans/1"' in wrong.text  # the name typed stays
    signed = anonymous.post(
        "/login",
        data={"user": "viewer", "password": PASSWORD, "next": "/scans/1?x=1", "csrf": csrf_of(login.text)},
        follow_redirects=False,
    )
    assert signed.status_code == 303 and signed.headers["location"] == "/scans/1?x=1"
    assert "samesite=lax" in signed.headers["set-cookie"].lower()
    for elsewhere in ("//evil.example/", "/\\evil.example", "https://evil.example/", "/login", "/\nx", ""):
        assert auth.page_after_sign_in(elsewhere) == "/", elsewhere


def test_a_part_of_a_page_asked_for_without_a_sign_in_sends_the_whole_page_to_sign_in(filled_root):
    """The overview's refresh after the session ended followed the redirect unseen, and htmx put the
    whole sign-in page inside the overview."""
    client = TestClient(create_app(web_settings(filled_root)), base_url="http://127.0.0.1")
    for url in ("/", "/worklist?after=5"):
        response = client.get(url, headers={"HX-Request": "true"}, follow_redirects=False)
        assert response.status_code == 204 and response.headers["HX-Redirect"] == "/login", url
        assert response.content == b""


def test_a_forged_or_expired_session_cookie_is_not_a_sign_in():
    signer = auth.SessionSigner(max_age=60)
    cookie = signer.dump(signer.new(auth.User("viewer", "viewer")))
    assert signer.load(cookie).user == auth.User("viewer", "viewer")
    _, signature = cookie.rsplit(".", 1)
    promoted = signer.dump(signer.new(auth.User("viewer", "admin"))).rsplit(".", 1)[0]
    assert signer.load(f"{promoted}.{signature}") is None  # a payload made an admin, the old signature
    assert auth.SessionSigner().load(cookie) is None  # another key
    assert auth.SessionSigner(signer.key, max_age=-1).load(cookie) is None


def test_a_trusted_proxy_header_names_the_user_only_from_a_loopback_peer(filled_root, tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('web_proxy_header = "X-Remote-User"\n[web_users.clinician]\nrole = "clinician"\n', "utf-8")
    from meddaemon.config import load_settings

    settings = load_settings(config, env={}, flags={"state_dir": filled_root / "state"})
    app = create_app(settings, host="0.0.0.0")
    local = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000))
    assert local.get("/", headers={"X-Remote-User": "clinician"}).status_code == 200
    assert local.get("/").status_code == 401
    assert local.get("/", headers={"X-Remote-User": "mallory"}).status_code == 401
    remote = TestClient(app, base_url="http://127.0.0.1", client=("203.0.113.9", 50000))
    assert remote.get("/", headers={"X-Remote-User": "clinician"}).status_code == 401


def test_a_local_proxy_that_forwards_the_clients_address_still_names_its_user(filled_root, tmp_path):
    """Served by uvicorn, whose default put a loopback peer's X-Forwarded-For address in the peer's
    place: every user behind nginx's usual ``proxy_set_header X-Forwarded-For`` was refused."""
    import urllib.error
    import urllib.request

    from meddaemon.config import load_settings
    from meddaemon.web.server import start_in_thread

    config = tmp_path / "proxy.toml"
    config.write_text('web_proxy_header = "X-Remote-User"\n[web_users.clinician]\nrole = "clinician"\n', "utf-8")
    settings = load_settings(config, env={}, flags={"state_dir": filled_root / "state"})
    server = start_in_thread(settings, host="127.0.0.1", port=0)

    def status(headers: dict[str, str]) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(server.url, headers=headers), timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert status({"X-Remote-User": "clinician", "X-Forwarded-For": "203.0.113.7"}) == 200
        assert status({"X-Remote-User": "mallory", "X-Forwarded-For": "203.0.113.7"}) == 401
    finally:
        server.stop()


@pytest.mark.parametrize("role", ["viewer", "clinician"])
def test_a_non_admin_posting_an_admin_action_gets_403_and_nothing_changes(filled_root, role):
    client = signed_in(create_app(web_settings(filled_root)), role)
    csrf = csrf_of(client.get("/worklist").text)
    before = read(filled_root, select(Scan.id, Scan.state, Scan.retried_at, Scan.stored_path).order_by(Scan.id))
    models_before = read(filled_root, select(ModelVersion.id, ModelVersion.status).order_by(ModelVersion.id))
    actions_before = read(filled_root, select(WebAction.id))
    for url, data in (
        ("/failures/retry", {"reason": "unroutable"}),
        ("/failures/retry", {"scan": "1"}),
        ("/models/busi/v1/retire", {"confirm": "busi/v1"}),
        ("/models/busi/v1/promote", {"confirm": "busi/v1"}),
    ):
        response = client.post(url, data={**data, "csrf": csrf})
        assert response.status_code == 403, url
        assert "Traceback" not in response.text
    assert client.get("/models/busi/v1/retire").status_code == 403
    assert read(filled_root, select(Scan.id, Scan.state, Scan.retried_at, Scan.stored_path).order_by(Scan.id)) == before
    assert read(filled_root, select(ModelVersion.id, ModelVersion.status).order_by(ModelVersion.id)) == models_before
    assert read(filled_root, select(WebAction.id)) == actions_before


@pytest.mark.parametrize("token", [None, "", "forged-token"])
def test_an_admin_action_without_the_session_csrf_token_gets_403_and_nothing_changes(filled_root, token):
    client = signed_in(create_app(web_settings(filled_root)), "admin")
    before = read(filled_root, select(ModelVersion.id, ModelVersion.status).order_by(ModelVersion.id))
    data = {"confirm": "busi/v1"} | ({} if token is None else {"csrf": token})
    response = client.post("/models/busi/v1/retire", data=data)
    assert response.status_code == 403 and "CSRF" in response.text
    assert read(filled_root, select(ModelVersion.id, ModelVersion.status).order_by(ModelVersion.id)) == before


def test_the_csrf_token_of_another_session_is_refused(filled_root):
    app = create_app(web_settings(filled_root))
    mine, theirs = signed_in(app, "admin"), signed_in(app, "admin")
    response = mine.post("/models/busi/v1/retire", data={"confirm": "busi/v1", "csrf": csrf_of(theirs.get("/").text)})
    assert response.status_code == 403


def test_pages_carry_no_patient_data_in_urls_and_the_console_logs_none(filled_root, caplog):
    client = signed_in(create_app(web_settings(filled_root)), "clinician")
    caplog.set_level(logging.DEBUG)
    [(study_scan,)] = read(filled_root, select(Scan.id).where(Scan.patient_name.is_not(None)).limit(1))
    html = client.get(f"/scans/{study_scan}").text + client.get("/worklist").text
    assert "PHIFAMILY" in html  # a clinician sees the name...
    links = [part.split('"')[0] for part in html.replace("src=", "href=").split('href="')[1:]]
    assert links and not any(phi in link for link in links for phi in PHI_STRINGS)  # ...never in a link
    assert not any(phi in record.getMessage() for record in caplog.records for phi in PHI_STRINGS)


def test_responses_forbid_caching_and_framing_elsewhere(console):
    response = console("viewer").get("/")
    assert response.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'self'" in response.headers["content-security-policy"]
    cookie = response.headers.get("set-cookie", "") or ""
    assert "password" not in cookie


def test_a_report_with_patient_data_is_refused_to_a_viewer_and_served_to_a_clinician(filled_root):
    from meddaemon.db.engine import transaction
    from meddaemon.db.models import Report

    settings = web_settings(filled_root)
    engine = create_db_engine(settings.db_url)
    with transaction(session_factory(engine)) as session:
        plain = session.scalars(select(Report).where(Report.kind == "scan").limit(1)).one()
        phi_path = settings.stored_file(plain.path).with_suffix(".phi.pdf")
        # SYNTHETIC: a copy standing for a --with-phi PDF
        phi_path.write_bytes(settings.stored_file(plain.path).read_bytes())
        row = Report(kind="scan", scan_id=plain.scan_id, path=str(phi_path), sha256=plain.sha256,
                     size_bytes=plain.size_bytes, pages=plain.pages, with_phi=True)  # fmt: skip
        session.add(row)
        session.flush()
        phi_id, scan_id = row.id, plain.scan_id
    engine.dispose()
    app = create_app(web_settings(filled_root))
    viewer, clinician = signed_in(app, "viewer"), signed_in(app, "clinician")
    assert viewer.get(f"/reports/{phi_id}.pdf").status_code == 403
    assert f"/reports/{phi_id}.pdf" not in viewer.get(f"/scans/{scan_id}").text
    assert clinician.get(f"/reports/{phi_id}.pdf").status_code == 200
    assert f'data="/reports/{phi_id}.pdf"' in clinician.get(f"/scans/{scan_id}").text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.5:8080"])
def test_on_loopback_without_users_a_request_for_another_host_name_is_refused(filled_root, host: str):
    """DNS rebinding: a page of evil.example whose name then points at 127.0.0.1 is same-origin with
    the console. It got an admin session, read the patient's name and retired a model."""
    settings = web_settings(filled_root).__class__(state_dir=filled_root / "state")
    client = TestClient(create_app(settings), base_url="http://127.0.0.1")
    page = client.get("/scans/1", headers={"host": host})
    assert page.status_code == 421 and "loopback" in page.text
    assert auth.COOKIE not in page.cookies
    for name in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "localhost"):
        assert client.get("/scans/1", headers={"host": name}).status_code == 200, name


def test_a_session_signed_out_is_refused_even_from_a_copy_of_its_cookie(filled_root):
    """Sign-out only deleted the cookie in the browser: a copy kept served the patient's pages for
    the session's 12 hours."""
    app = create_app(web_settings(filled_root))
    client = signed_in(app, "admin")
    copied = client.cookies.get(auth.COOKIE)
    page = client.get("/worklist")
    assert page.status_code == 200
    signed_out = client.post("/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert signed_out.status_code == 303
    replay = TestClient(app, base_url="http://127.0.0.1")
    replay.cookies.set(auth.COOKIE, copied)
    response = replay.get("/scans/1", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/scans/1"
    assert signed_in(app, "admin").get("/scans/1").status_code == 200  # a new sign-in works
    app.state.console.dispose()


def test_failed_sign_ins_make_the_next_wait_longer_each_time_and_a_success_clears_them():
    """Nothing slowed a guesser: 22 passwords a second, each an unauthenticated scrypt."""
    now = [1000.0]
    throttle = auth.SignInThrottle(allowed=3, longest=60.0, clock=lambda: now[0])
    keys = ("user:admin", "from:192.0.2.7")
    for _ in range(3):
        assert throttle.begin(*keys) == 0
    waits = []
    for _ in range(8):
        waits.append(throttle.begin(*keys))
        assert throttle.begin(*keys) == waits[-1]  # refused while it waits, and not counted
        now[0] += waits[-1]
        assert throttle.begin(*keys) == 0
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert throttle.wait("user:admin", "from:198.51.100.1") == 60.0  # the name, from anywhere
    assert throttle.wait("user:viewer", "from:192.0.2.7") == 60.0  # the address, for any name
    assert throttle.wait("user:viewer", "from:198.51.100.1") == 0
    throttle.succeeded(*keys)
    assert throttle.wait(*keys) == 0


def test_a_guesser_who_never_stops_waits_the_longest_and_breaks_no_one_s_sign_in():
    """The wait was 2.0 ** (failures - allowed) before its cap: past 1,029 failures (three and a
    half days of a guesser retrying as each wait ended) it overflowed, and every sign-in for that
    name was a 500 until the console restarted."""
    now = [1000.0]
    throttle = auth.SignInThrottle(allowed=5, longest=300.0, clock=lambda: now[0])
    for _ in range(1100):
        assert throttle.begin("user:admin", "from:192.0.2.7") == 0
        now[0] += throttle.wait("user:admin")
    assert throttle.begin("user:admin") == 0  # its wait over: checked, and counted
    assert throttle.wait("user:admin") == 300.0 and throttle.begin("user:admin") == 300.0


def test_wrong_passwords_sent_at_once_are_checked_no_more_than_the_throttle_allows(filled_root):
    """Each attempt was counted only after its password had been checked: 200 sent at once to a
    real console had 29 passwords checked where 5 are allowed."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(web_settings(filled_root))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        token = csrf_of(client.get("/login").text)

        def sign_in(attempt: int) -> int:
            form = {"user": "admin", "password": f"wrong-{attempt}", "csrf": token}
            return client.post("/login", data=form, follow_redirects=False).status_code

        with ThreadPoolExecutor(20) as pool:
            codes = Counter(pool.map(sign_in, range(20)))
    assert codes == {401: 5, 429: 15}
    app.state.console.dispose()


def test_a_name_typed_at_sign_in_is_kept_by_the_throttle_as_its_hash_whatever_its_length(filled_root):
    """The throttle kept each typed name as it came (up to the form's 1 MB a field), names of no user
    included, 10,000 of them before forgetting any: a way to fill the console's memory without a
    sign-in."""
    app = create_app(web_settings(filled_root))
    client = TestClient(app, base_url="http://127.0.0.1")
    token = csrf_of(client.get("/login").text)
    for i in range(3):
        client.post("/login", data={"user": f"{i}" + "A" * 100_000, "password": "nope", "csrf": token})
    kept = [key for key in app.state.console.throttle._failures if key.startswith("user:")]
    assert len(kept) == 3 and all(len(key) == len("user:") + 64 for key in kept)
    app.state.console.dispose()


def test_the_session_cookie_is_secure_when_the_console_is_reached_through_https(filled_root):
    """Behind a TLS proxy the browser sent the session cookie over plain http:// too: the console,
    speaking HTTP on its own port, cannot tell; ``web_secure_cookie`` says so."""
    for secure in (False, True):
        app = create_app(web_settings(filled_root, web_secure_cookie=secure))
        client = TestClient(app, base_url="https://127.0.0.1")  # as the TLS proxy's clients see it
        page = client.get("/login")
        response = client.post("/login", data={"user": "admin", "password": PASSWORD, "csrf": csrf_of(page.text)},
                               follow_redirects=False)  # fmt: skip
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and ("; Secure" in cookie) is secure, cookie
        # __Host-: kept to this host and scheme; a page on another port of the host cannot set it
        assert cookie.startswith("__Host-meddaemon_session=" if secure else "meddaemon_session="), cookie
        assert "Path=/" in cookie and "Domain" not in cookie, cookie
        assert client.get("/models").url.path == "/models"  # signed in by it
        signed_out = client.post("/logout", data={"csrf": csrf_of(client.get("/models").text)}, follow_redirects=False)
        assert signed_out.headers["set-cookie"].startswith(cookie.split("=", 1)[0] + '=""'), signed_out.headers
        app.state.console.dispose()


def test_the_sign_in_page_refuses_to_try_a_password_while_its_name_waits(filled_root):
    app = create_app(web_settings(filled_root))
    client = TestClient(app, base_url="http://127.0.0.1")
    token = csrf_of(client.get("/login").text)
    codes = [
        client.post("/login", data={"user": "admin", "password": "nope", "csrf": token}).status_code for _ in range(6)
    ]
    assert codes == [401] * 5 + [429]
    right = client.post("/login", data={"user": "admin", "password": PASSWORD, "csrf": token}, follow_redirects=False)
    assert right.status_code == 429 and "try again in" in right.text  # not tried: no scrypt, no answer
    # behind a proxy on this host every client is a loopback peer: the address alone locks nobody out
    proxied = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000))
    token = csrf_of(proxied.get("/login").text)
    for _ in range(6):
        proxied.post("/login", data={"user": "nobody", "password": "nope", "csrf": token})
    viewer = proxied.post(
        "/login", data={"user": "viewer", "password": PASSWORD, "csrf": token}, follow_redirects=False
    )
    assert viewer.status_code == 303
    app.state.console.dispose()
