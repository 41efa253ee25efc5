"""The console served for real: by ``meddaemon start`` from a thread (``web_port``), and by
``meddaemon web``, which refuses a bind beyond loopback without authentication (exit 2)."""

from __future__ import annotations

import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from daemon_harness import MEDDAEMON, daemon_env, daemons, layout, wait_until  # noqa: F401 (fixtures)
from ports import free_port


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.slow
def test_a_daemon_with_web_port_serves_the_console_and_stops_it_on_sigterm(daemons):  # noqa: F811
    port = free_port()
    daemon = daemons.start(env={"MEDDAEMON_WEB_PORT": str(port)})
    wait_until(lambda: status_of(f"http://127.0.0.1:{port}/") == 200, 60, "the console", daemon)
    assert status_of(f"http://127.0.0.1:{port}/worklist") == 200
    assert status_of(f"http://127.0.0.1:{port}/scans/424242") == 404
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert status_of(f"http://127.0.0.1:{port}/") == 0


def test_meddaemon_web_refuses_an_open_bind_without_users(tmp_path):
    result = subprocess.run(
        [str(MEDDAEMON), "web", "--state-dir", str(tmp_path), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "without authentication" in result.stderr


def test_meddaemon_web_without_a_database_exits_3_as_every_other_command_does(tmp_path):
    """It served a 503 page on every request, trying again every 5 s, for a mistyped --state-dir."""
    result = subprocess.run(
        [str(MEDDAEMON), "web", "--state-dir", str(tmp_path / "mistyped"), "--port", "0"],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert "medcli db upgrade" in result.stderr and not (tmp_path / "mistyped").exists()


def test_meddaemon_web_on_an_older_sqlite_schema_exits_3_while_a_writer_holds_the_database(tmp_path):
    """Its check of the schema took the write lock: a daemon writing meanwhile made it fail, the
    failure was taken for a server not answering yet, and the console served 'no such table' pages."""
    import sqlite3

    from meddaemon.db.engine import create_db_engine
    from meddaemon.db.migrate import upgrade

    state = tmp_path / "state"
    engine = create_db_engine(f"sqlite:///{state / 'meddaemon.db'}")
    upgrade(engine, "0009")
    engine.dispose()
    writer = sqlite3.connect(state / "meddaemon.db", isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        result = subprocess.run(
            [str(MEDDAEMON), "web", "--state-dir", str(state), "--port", "0"],
            capture_output=True, text=True, env={**daemon_env(), "MEDDAEMON_BUSY_TIMEOUT": "1"}, timeout=30,
        )  # fmt: skip
    finally:
        writer.rollback()
        writer.close()
    assert result.returncode == 3, result.stderr
    assert "schema is older than this meddaemon" in result.stderr and "medcli db upgrade" in result.stderr


def test_meddaemon_web_on_a_postgresql_database_that_is_not_there_exits_3(tmp_path):
    """The server answers that there is no such database: as a mistyped SQLite --state-dir, exit 3."""
    result = subprocess.run(
        [str(MEDDAEMON), "web", "--state-dir", str(tmp_path), "--port", "0",
         "--db", "postgresql+psycopg://postgres@127.0.0.1:5432/meddaemon_no_such_database"],
        capture_output=True, text=True, env=daemon_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "does not exist" in result.stderr


def test_meddaemon_web_on_a_database_server_not_answering_yet_serves_its_503_page(tmp_path):
    """The start's check is for a database that is not there: one that does not answer yet (a server
    restarting, not up at boot) gets the page that says so and reloads, as while running."""
    from ports import free_port as closed_port

    web = subprocess.Popen(
        [str(MEDDAEMON), "web", "--state-dir", str(tmp_path), "--port", "0",
         "--db", f"postgresql+psycopg://meddaemon@127.0.0.1:{closed_port()}/nothing_here"],
        stderr=subprocess.PIPE, text=True, env=daemon_env(),
    )  # fmt: skip
    try:
        assert web.stderr is not None
        line = next(line for line in web.stderr if "web console on" in line)
        port = int(line.rsplit(":", 1)[1].strip(" /\n"))
        wait_until(lambda: status_of(f"http://127.0.0.1:{port}/") == 503, 30, "the console's 503 page")
    finally:
        web.send_signal(signal.SIGTERM)
        assert web.wait(30) == 0


def test_meddaemon_web_on_port_0_says_the_port_it_listens_on(tmp_path):
    """It logged http://127.0.0.1:0/."""
    from click.testing import CliRunner

    from meddaemon.cli.medcli import cli as medcli

    state = tmp_path / "state"
    assert CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", str(state)]).exit_code == 0
    web = subprocess.Popen(
        [str(MEDDAEMON), "web", "--state-dir", str(state), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=daemon_env(),
    )
    try:
        assert web.stderr is not None
        line = next(line for line in web.stderr if "web console on" in line)
        port = int(line.rsplit(":", 1)[1].strip(" /\n"))
        assert port > 0
        wait_until(lambda: status_of(f"http://127.0.0.1:{port}/") == 200, 30, "the console on the port it named")
    finally:
        web.send_signal(signal.SIGTERM)
        assert web.wait(30) == 0


def test_meddaemon_web_on_a_taken_port_or_one_that_is_no_port_exits_2_in_one_line(tmp_path):
    """A port taken exited 3 (uvicorn's own code, meddaemon's for "no usable database") after
    uvicorn's log line; --port 70000 was a traceback (OverflowError), exit 1."""
    import socket

    from click.testing import CliRunner

    from meddaemon.cli.medcli import cli as medcli

    state = tmp_path / "state"
    assert CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", str(state)]).exit_code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for given, said in ((str(port), "the web console cannot listen on 127.0.0.1:"), ("70000", "--port")):
            done = subprocess.run(
                [str(MEDDAEMON), "web", "--state-dir", str(state), "--port", given],
                capture_output=True,
                text=True,
                env=daemon_env(),
                timeout=60,
            )
            assert done.returncode == 2, done.stderr
            assert said in done.stderr and "Traceback" not in done.stderr


def test_meddaemon_web_hash_password_prints_a_hash_that_verifies():
    from meddaemon.web.auth import verify_password

    result = subprocess.run(
        [str(MEDDAEMON), "web", "--hash-password"],
        input="synthetic secret\n",
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert verify_password("synthetic secret", result.stdout.strip())


@pytest.mark.slow
def test_a_daemon_whose_web_port_is_taken_exits_2_naming_the_settings(daemons):  # noqa: F811
    """A traceback ("RuntimeError: the web console could not listen"), exit 1, where a setting that
    cannot be used exits 2 naming it (the metrics endpoint's does)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon = daemons.start(env={"MEDDAEMON_WEB_PORT": str(taken.getsockname()[1])})
        assert daemon.wait(60) == 2, daemon.tail()
    log = daemon.log_text()
    assert "settings 'web_host' and 'web_port': the web console cannot listen on 127.0.0.1:" in log
    assert "Traceback" not in log
