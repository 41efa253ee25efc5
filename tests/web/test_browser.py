"""The console in a real browser: Selenium drives Debian's headless chromium (``chromium`` and
``chromium-driver``, installed by ``scripts/system-packages.sh``) against a real uvicorn server on
127.0.0.1 over a state a real daemon filled from SYNTHETIC scans.

With ``MEDDAEMON_TEST_SCREENSHOTS=DIR`` each page is also saved as ``DIR/web_<page>.png`` (the
screenshots in docs/ are made this way).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from html_pages import LinkPage
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.models import ModelVersion, Scan
from meddaemon.engine import registry
from meddaemon.web.server import WebServer, start_in_thread
from model_factory import PHI_STRINGS, ReportedStates, write_model
from web_factory import PASSWORD, UNROUTABLE, drop_unroutable, rerun, stored_scans, web_settings, write_card

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = os.environ.get("MEDDAEMON_TEST_SCREENSHOTS")


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra)"
    return None


@pytest.fixture(scope="module")
def browser_root(tmp_path_factory: pytest.TempPathFactory, reported_states: ReportedStates) -> Path:
    reason = _browser_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("browser")
    reported_states.copy(root, inbox=drop_unroutable)  # the web tests' state (made once per session)
    return root


@pytest.fixture(scope="module")
def server(browser_root: Path) -> Iterator[WebServer]:
    web = start_in_thread(web_settings(browser_root), host="127.0.0.1", port=0)
    yield web
    web.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000",
                     "--disable-gpu", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def sign_in(driver, server: WebServer, role: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(server.url + "login")
    driver.find_element(By.ID, "user").send_keys(role)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "sign-in").click()
    wait_for(driver, lambda d: d.current_url == server.url)


def wait_for(driver, condition, timeout: float = 30):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def shoot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        if driver.find_elements("css selector", "object.pdf"):
            time.sleep(3)  # the PDF viewer draws its pages after the page has loaded
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1360, min(max(int(height) + 40, 700), 2000))
        driver.save_screenshot(str(Path(SCREENSHOTS) / f"web_{name}.png"))
        driver.set_window_size(1360, 1000)


def listed_ids(driver) -> list[int]:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return [int(row.get_attribute("data-id")) for row in driver.find_elements(By.CSS_SELECTOR, "tr.scan")]


def test_the_overview_chart_fits_its_card_and_the_worklist_filters_in_the_browser(browser, server, browser_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sign_in(browser, server, "viewer")
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    card = chart.find_element(By.XPATH, "..")
    assert chart.rect["x"] + chart.rect["width"] <= card.rect["x"] + card.rect["width"]  # the latest hours shown
    shoot(browser, "overview")
    browser.get(server.url + "worklist")
    everything = stored_scans(browser_root)
    assert listed_ids(browser) == sorted((s.id for s in everything), reverse=True)
    shoot(browser, "worklist")

    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("failed")
    browser.find_element(By.ID, "f-apply").click()
    wait_for(browser, lambda d: "state=failed" in d.current_url)
    assert set(listed_ids(browser)) == {s.id for s in everything if s.state == "failed"}

    browser.get(server.url + "worklist")
    Select(browser.find_element(By.ID, "f-task")).select_by_visible_text("chestxray14")
    browser.find_element(By.ID, "f-apply").click()
    wait_for(browser, lambda d: "task=chestxray14" in d.current_url)
    assert set(listed_ids(browser)) == {s.id for s in everything if s.task_name == "chestxray14"}

    browser.get(server.url + "worklist")
    browser.find_element(By.ID, "f-q").send_keys("synthetic_study")
    browser.find_element(By.ID, "f-apply").click()
    wait_for(browser, lambda d: "q=synthetic_study" in d.current_url)
    assert set(listed_ids(browser)) == {s.id for s in everything if "synthetic_study" in s.source_name}


def test_the_scan_page_shows_the_overlay_and_the_slider_changes_its_opacity(browser, server, browser_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    scan = next(s for s in stored_scans(browser_root) if s.task_name == "busi" and s.state == "archived")
    sign_in(browser, server, "viewer")
    browser.get(server.url + f"scans/{scan.id}")
    layer = browser.find_element(By.CSS_SELECTOR, ".overlay img.layer")
    base = browser.find_element(By.CSS_SELECTOR, ".overlay img.base")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    wait_for(browser, lambda d: d.execute_script(loaded, layer) and d.execute_script(loaded, base))
    assert layer.rect["width"] == base.rect["width"] and layer.rect["height"] == base.rect["height"]
    assert layer.rect["x"] == base.rect["x"] and layer.rect["y"] == base.rect["y"]  # the map lies over the scan
    assert browser.find_elements(By.CSS_SELECTOR, "#timeline li")
    shoot(browser, "scan")

    slider = browser.find_element(By.ID, "opacity")
    before = float(layer.value_of_css_property("opacity"))
    for _ in range(30):
        slider.send_keys(Keys.ARROW_LEFT)
    after = float(layer.value_of_css_property("opacity"))
    assert before == pytest.approx(0.6) and after == pytest.approx(0.3)


def test_a_viewer_never_sees_a_patient_name_a_clinician_does(browser, server, browser_root):
    study = next(s for s in stored_scans(browser_root) if s.patient_name)
    pages = ("", "worklist", f"scans/{study.id}", "failures", "models", "audits", "worklist?q=synthetic_study")
    sign_in(browser, server, "viewer")
    for page in pages:
        browser.get(server.url + page)
        assert not any(phi in browser.page_source for phi in PHI_STRINGS), page
    browser.delete_all_cookies()
    sign_in(browser, server, "clinician")
    browser.get(server.url + f"scans/{study.id}")
    assert "PHIFAMILY" in browser.page_source


def test_retry_sends_a_failed_scan_back_and_the_next_run_completes_it(browser, server, browser_root):
    from selenium.webdriver.common.by import By

    [failed] = [s for s in stored_scans(browser_root) if s.source_name == UNROUTABLE]
    sign_in(browser, server, "admin")
    browser.get(server.url + "failures")
    shoot(browser, "failures")
    browser.find_element(By.ID, f"retry-{failed.id}").click()
    message = wait_for(browser, lambda d: d.find_elements(By.ID, "action-result"))[0].text
    assert "done" in message and f"sent back 1 scan(s): {failed.id}" in message

    rerun(browser_root, default_task="busi")

    attempts = [s for s in stored_scans(browser_root) if s.sha256 == failed.sha256]
    assert [s.state for s in attempts] == ["failed", "archived"]
    browser.get(server.url + f"scans/{attempts[1].id}")
    assert "archived" in browser.find_element(By.TAG_NAME, "h1").text


def test_a_long_name_or_message_wraps_and_leaves_the_retry_button_on_the_page(
    browser, browser_root: Path, reported_states: ReportedStates, tmp_path: Path
):
    """Names and messages without spaces (a path) were never broken: the failures table grew five
    times wider than the window and its Retry buttons went off to the right."""
    from selenium.webdriver.common.by import By

    root = tmp_path / "root"
    reported_states.copy(root, inbox=drop_unroutable)
    engine = create_db_engine(web_settings(root).db_url)
    with transaction(session_factory(engine)) as session:
        failed = session.scalars(select(Scan).where(Scan.source_name == UNROUTABLE)).one()
        failed.source_name = "synthetic_" + "x" * 300 + ".dcm"
        failed.failure_message = "/synthetic/" + "y" * 400
    engine.dispose()
    web = start_in_thread(web_settings(root), host="127.0.0.1", port=0)
    try:
        sign_in(browser, web, "admin")
        for page in ("failures", f"scans/{failed.id}"):
            browser.get(web.url + page)
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= 1360, f"{page} is {width} px wide"
        browser.get(web.url + "failures")
        button = browser.find_element(By.ID, f"retry-{failed.id}")
        assert button.rect["x"] + button.rect["width"] <= 1360
    finally:
        web.stop()


def test_promote_switches_the_active_model_and_its_card_shows_its_figures(browser, server, browser_root):
    from selenium.webdriver.common.by import By

    settings = web_settings(browser_root)
    source = write_model(browser_root / "model_v2", version="v2")
    figures = write_card(source, drawn=bool(SCREENSHOTS))
    engine = create_db_engine(settings.db_url)
    with transaction(session_factory(engine)) as session:
        registry.import_version(session, source, settings.models_dir)
    sign_in(browser, server, "admin")
    browser.get(server.url + "models")
    browser.find_element(By.CSS_SELECTOR, "#model-busi-v2 summary").click()  # its card opens
    browser.find_element(By.ID, "promote-busi-v2").click()
    browser.find_element(By.ID, "confirm").click()
    message = wait_for(browser, lambda d: d.find_elements(By.ID, "action-result"))[0].text
    assert "busi/v2 is the active model of busi" in message
    with session_factory(engine)() as session:
        status = dict(session.execute(select(ModelVersion.version, ModelVersion.status).where(
            ModelVersion.task_name == "busi")).all())  # fmt: skip
    engine.dispose()
    assert status == {"v1": "registered", "v2": "active"}
    pictures = browser.find_elements(By.CSS_SELECTOR, "#card-busi-v2 img")  # the active version's card is open
    assert [p.get_attribute("alt") for p in pictures] == list(figures.values())
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    for picture in pictures:
        browser.execute_script("arguments[0].scrollIntoView()", picture)  # they load lazily
        wait_for(browser, lambda d, p=picture: d.execute_script(loaded, p))
    browser.execute_script("window.scrollTo(0, 0)")
    shoot(browser, "models")
    browser.get(server.url)
    assert "v2" in browser.find_element(By.ID, "active-models").text


def test_the_audits_page_in_the_browser(browser, server, browser_root):
    from selenium.webdriver.common.by import By

    from web_factory import store_audit

    audit_id = store_audit(browser_root, pdf="drawn" if SCREENSHOTS else "plain")
    sign_in(browser, server, "viewer")
    browser.get(server.url + "audits")
    shoot(browser, "audits")
    browser.find_element(By.LINK_TEXT, str(audit_id)).click()
    assert browser.find_elements(By.CSS_SELECTOR, "#overall tbody tr, #overall tr")
    assert browser.find_element(By.ID, "audit-pdf").get_attribute("data") == server.url + f"audits/{audit_id}.pdf"
    assert browser.find_element(By.ID, "download-pdf").get_attribute("download") == f"audit-{audit_id}.pdf"
    shoot(browser, "audit")


def test_next_page_rows_are_appended_in_place_and_back_from_a_scan_shows_them_all(browser, server, browser_root):
    """The address once said nothing of the appended rows: Back from a scan showed the first 50 alone."""
    from selenium.webdriver.common.by import By

    from daemon_rows import add_scan
    from meddaemon.states import ScanState

    engine = create_db_engine(web_settings(browser_root).db_url)
    with transaction(session_factory(engine)) as session:
        for n in range(60):  # SYNTHETIC rows (no file behind them) to make a second page
            add_scan(session, 10_000 + n, ScanState.ROUTED, stored_path=None)
    engine.dispose()
    total = len(stored_scans(browser_root))
    sign_in(browser, server, "viewer")
    browser.get(server.url + "worklist")
    assert len(listed_ids(browser)) == 50
    browser.find_element(By.ID, "next-page").click()
    wait_for(browser, lambda d: len(listed_ids(d)) == total)
    ids = listed_ids(browser)
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == total
    wait_for(browser, lambda d: d.current_url == server.url + f"worklist?through={ids[-1]}")
    browser.find_element(By.CSS_SELECTOR, f'tr.scan[data-id="{ids[-1]}"] a').click()
    wait_for(browser, lambda d: d.current_url == server.url + f"scans/{ids[-1]}")
    browser.back()
    wait_for(browser, lambda d: d.current_url == server.url + f"worklist?through={ids[-1]}")
    assert listed_ids(browser) == ids
    assert not browser.execute_script("return window.sessionStorage.getItem('htmx-history-cache')")


def test_a_link_from_another_site_opens_the_page_signed_in_and_a_sign_in_returns_to_it(browser, server, browser_root):
    """With SameSite=Strict a link on another site (here a page of localhost, another site than
    127.0.0.1) brought no cookie: the console set a new session over the signed-in one, and every
    tab was signed out; signed in again, the browser landed on the overview, not the scan."""
    from selenium.webdriver.common.by import By

    scan = next(s for s in stored_scans(browser_root) if s.task_name == "busi" and s.state == "archived")
    target = server.url + f"scans/{scan.id}"
    elsewhere = LinkPage(f'<a id="go" href="{target}">scan</a>')
    try:
        sign_in(browser, server, "viewer")
        browser.get(elsewhere.url)
        browser.find_element(By.ID, "go").click()
        wait_for(browser, lambda d: d.current_url == target)
        assert browser.find_elements(By.CSS_SELECTOR, ".overlay img.base"), "the scan page, signed in"
        browser.get(server.url + "worklist")
        assert browser.current_url == server.url + "worklist", "still signed in"

        browser.delete_all_cookies()
        browser.get(elsewhere.url)
        browser.find_element(By.ID, "go").click()
        wait_for(browser, lambda d: d.current_url.startswith(server.url + "login"))
        browser.find_element(By.ID, "user").send_keys("viewer")
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "sign-in").click()
        wait_for(browser, lambda d: d.current_url == target)
    finally:
        elsewhere.stop()


def test_on_a_narrow_screen_no_page_scrolls_sideways(browser, server, browser_root):
    """At 500 px the worklist's table pushed the whole page sideways (its call, state and times off
    screen), and at 360 px the scan's picture did."""
    scan = next(s for s in stored_scans(browser_root) if s.task_name == "busi" and s.state == "archived")
    sign_in(browser, server, "clinician")
    wide = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    try:
        for width, page in ((500, "worklist"), (360, f"scans/{scan.id}"), (360, "worklist")):
            browser.set_window_size(width, 900)
            browser.get(server.url + page)
            assert browser.execute_script(wide) <= 0, (width, page)
    finally:
        browser.set_window_size(1360, 1000)


def test_a_session_that_ends_under_an_open_overview_takes_the_browser_to_sign_in(browser, server):
    from selenium.webdriver.common.by import By

    sign_in(browser, server, "admin")
    assert browser.find_element(By.ID, "overview")
    browser.delete_all_cookies()  # signed out in another tab, or the session's time is up
    wait_for(browser, lambda d: d.current_url == server.url + "login")  # at the overview's next refresh
    assert len(browser.find_elements(By.TAG_NAME, "header")) == 1  # not the sign-in page inside the overview
    assert browser.find_element(By.ID, "sign-in")


@pytest.mark.postgres
def test_an_open_overview_shows_the_database_outage_at_its_next_refresh_and_comes_back_after_it(
    browser, postgres_url, postgres_admin, tmp_path
):
    from selenium.webdriver.common.by import By
    from sqlalchemy import text

    from meddaemon.db.migrate import upgrade

    engine = create_db_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    web = start_in_thread(web_settings(tmp_path, db=postgres_url), host="127.0.0.1", port=0)
    name = postgres_url.rsplit("/", 1)[1]
    try:
        sign_in(browser, web, "viewer")
        assert browser.find_element(By.ID, "states")
        with postgres_admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        try:
            # the figures of before the outage are no longer shown as if they were current
            wait_for(browser, lambda d: d.find_elements(By.ID, "database-down"))
            assert not browser.find_elements(By.ID, "states") and browser.current_url == web.url
        finally:
            with postgres_admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        wait_for(browser, lambda d: d.find_elements(By.ID, "states"))  # the outage page tries again by itself
        assert browser.current_url == web.url
    finally:
        web.stop()
