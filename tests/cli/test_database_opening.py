"""Only ``meddaemon start`` and ``medcli db upgrade`` create or migrate the database; every other
command opens it as it is and exits 3 when it is missing or its schema is behind (SQLite and
PostgreSQL, the real CLI through click's CliRunner)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import inspect, text

from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.medcli import cli as medcli
from meddaemon.db.engine import create_db_engine, is_sqlite, shown_url
from meddaemon.db.migrate import current_revision, database_location, head_revision, upgrade

#: the commands that read (or add rows to) an existing database, with their arguments
READING_COMMANDS: list[tuple[click.Group, list[str]]] = [
    (meddaemon, ["status"]),
    (medcli, ["scans"]),
    (medcli, ["models", "list"]),
    (medcli, ["models", "show", "busi", "v1"]),
    (medcli, ["report", "1"]),
    (medcli, ["report", "summary", "--json"]),
    (medcli, ["audit", "--labels", "LABELS"]),
]


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("file,label\nsynthetic_1.png,benign\n")
    return path


def invoke(group: click.Group, args: list[str], db_url: str, tmp_path: Path, labels: Path) -> Result:
    args = [str(labels) if a == "LABELS" else a for a in args]
    where = ["--state-dir", str(tmp_path / "state"), "--db", db_url]
    return CliRunner().invoke(group, [*args, *where], catch_exceptions=False)


def tables(db_url: str) -> set[str]:
    engine = create_db_engine(db_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize(("group", "args"), READING_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_no_database_exits_3_and_creates_nothing(group, args, db_url: str, tmp_path: Path, labels: Path):
    result = invoke(group, args, db_url, tmp_path, labels)
    assert result.exit_code == 3, result.output
    assert "no meddaemon database at" in result.stderr
    assert "run `medcli db upgrade` or start the daemon" in result.stderr
    assert "Traceback" not in result.output
    if is_sqlite(db_url):
        assert not Path(db_url.removeprefix("sqlite:///")).exists()
    else:
        assert tables(db_url) == set()


def test_a_mistyped_state_dir_leaves_nothing_behind(tmp_path: Path):
    typo = tmp_path / "stat"
    for group, args in ((meddaemon, ["status"]), (medcli, ["scans"]), (medcli, ["models", "list"])):
        result = CliRunner().invoke(group, [*args, "--state-dir", str(typo)])
        assert result.exit_code == 3, result.output
        assert f"no meddaemon database at {typo / 'meddaemon.db'}" in result.stderr
    assert not typo.exists()


@pytest.mark.parametrize(("group", "args"), READING_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_an_older_schema_exits_3_and_is_not_upgraded(group, args, db_url: str, tmp_path: Path, labels: Path):
    engine = create_db_engine(db_url)
    upgrade(engine, "0004")
    result = invoke(group, args, db_url, tmp_path, labels)
    assert result.exit_code == 3, result.output
    assert "schema is older than this meddaemon" in result.stderr
    # the file itself: the commands that only read named "sqlite://"
    assert f"the database at {database_location(db_url)} is at revision 0004" in result.stderr
    assert current_revision(engine) == "0004"
    engine.dispose()


@pytest.mark.parametrize(
    ("group", "args"),
    [*READING_COMMANDS, (medcli, ["db", "upgrade"]), (meddaemon, ["start", "--once", "--watch", "INBOX"])],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_file_that_is_no_database_exits_3_in_one_line(group, args, tmp_path: Path, labels: Path):
    """SQLite's "file is not a database" is no OperationalError: it was a traceback, exit 1."""
    (tmp_path / "inbox").mkdir()
    args = [str(tmp_path / "inbox") if a == "INBOX" else a for a in args]
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"SYNTHETIC: not a database\n" * 200)
    result = invoke(group, args, f"sqlite:///{junk}", tmp_path, labels)
    assert result.exit_code == 3, result.output
    assert f"database unusable at {junk}: file is not a database" in result.stderr  # it named no file
    assert junk.read_bytes() == b"SYNTHETIC: not a database\n" * 200


def test_a_sqlite_database_whose_folder_cannot_be_made_exits_2_naming_the_setting(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("SYNTHETIC: not a folder")
    result = CliRunner().invoke(medcli, ["db", "upgrade", "--db", f"sqlite:///{blocker}/x.db"])
    assert result.exit_code == 2, result.output
    assert f"setting 'db': cannot make the folder of the SQLite database {blocker}/x.db" in result.stderr


def test_db_upgrade_creates_and_upgrades_and_then_the_commands_work(db_url: str, tmp_path: Path, labels: Path):
    engine = create_db_engine(db_url)
    upgrade(engine, "0004")
    upgraded = CliRunner().invoke(medcli, ["db", "upgrade", "--db", db_url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"schema at revision {head_revision()} (was 0004)" in upgraded.output
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert invoke(medcli, ["scans"], db_url, tmp_path, labels).exit_code == 0
    assert invoke(meddaemon, ["status"], db_url, tmp_path, labels).exit_code == 0


def test_db_upgrade_and_start_refuse_another_application_s_database_and_add_nothing_to_it(db_url: str, tmp_path: Path):
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE customers (id INTEGER)"))
    (tmp_path / "inbox").mkdir()
    start = ["start", "--once", "--watch", str(tmp_path / "inbox"), "--state-dir", str(tmp_path / "state")]
    for group, args in ((medcli, ["db", "upgrade"]), (meddaemon, start)):
        result = CliRunner().invoke(group, [*args, "--db", db_url])
        assert result.exit_code == 2, result.output  # a bad setting: a supervisor does not restart it
        assert f"the database at {database_location(db_url)} holds tables of another application" in result.stderr
    assert set(inspect(engine).get_table_names()) == {"customers"}
    engine.dispose()


def test_a_daemon_that_creates_or_upgrades_the_schema_logs_it(db_url: str, tmp_path: Path):
    """The schema moved under the daemons of an older meddaemon (they refuse it from their next
    start) and no log said when, nor which daemon did it."""
    (tmp_path / "inbox").mkdir()
    start = ["start", "--once", "--watch", str(tmp_path / "inbox"), "--state-dir", str(tmp_path / "state")]
    start += ["--db", db_url]
    engine = create_db_engine(db_url)
    upgrade(engine, "0015")
    upgraded = CliRunner().invoke(meddaemon, start)
    assert upgraded.exit_code == 0, upgraded.output
    assert f"database schema upgraded from revision 0015 to {head_revision()}" in upgraded.stderr
    again = CliRunner().invoke(meddaemon, start)
    assert again.exit_code == 0 and "database schema" not in again.stderr
    engine.dispose()


def test_db_upgrade_creates_a_new_sqlite_database(tmp_path: Path):
    result = CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    assert "(was empty)" in result.output
    assert (tmp_path / "new" / "meddaemon.db").is_file()


def test_db_upgrade_of_a_database_named_elsewhere_makes_no_state_folder(tmp_path: Path, monkeypatch):
    """`--db sqlite:///ELSEWHERE` made the database there and an empty .meddaemon/ where it ran."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(medcli, ["db", "upgrade", "--db", f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_start_with_a_mistyped_watch_folder_exits_2_and_makes_no_state_folder(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(meddaemon, ["start", "--once", "--watch", str(tmp_path / "inbx")])
    assert result.exit_code == 2, result.output
    assert "inbx" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_db_upgrade_with_a_state_directory_it_cannot_make_exits_2_naming_it(tmp_path: Path):
    """As `meddaemon start` does (README, exit codes: a state directory that cannot be written is
    usage, 2); it was a FileNotFoundError traceback, exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("SYNTHETIC: not a folder")
    result = CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", str(blocker / "state")])
    assert result.exit_code == 2, result.output
    assert "setting 'state_dir' from flag" in result.stderr and "cannot be used" in result.stderr
    assert "Traceback" not in result.output


def test_commands_that_only_read_answer_while_another_process_holds_sqlite_s_write_lock(tmp_path: Path):
    """They took the write lock like a writer (BEGIN IMMEDIATE): a daemon holding it past the busy
    timeout made `medcli scans` and `meddaemon status` fail, "database unavailable: database is
    locked", exit 3. A writer that waits past it is told the database is busy, not unavailable."""
    import sqlite3
    import time

    state = tmp_path / "state"
    assert CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", str(state)]).exit_code == 0
    holder = sqlite3.connect(state / "meddaemon.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        env = {"MEDDAEMON_BUSY_TIMEOUT": "0.5"}
        for group, args in ((medcli, ["scans", "--json"]), (meddaemon, ["status", "--json"]),
                            (medcli, ["outbox", "list", "--json"])):  # fmt: skip
            started = time.monotonic()
            result = CliRunner().invoke(group, [*args, "--state-dir", str(state)], env=env)
            assert result.exit_code == 0, result.output
            assert time.monotonic() - started < 5
        writer = CliRunner().invoke(medcli, ["retry", "--all-failed", "--state-dir", str(state)], env=env)
        assert writer.exit_code == 3 and "database busy: another process held its lock" in writer.output
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.postgres
def test_a_read_only_postgresql_server_is_a_database_unusable_not_a_traceback(postgres_url: str):
    """A standby, or a role with default_transaction_read_only: the operator's to cure. Taken for
    a bug once only plain DatabaseErrors were "database unusable": a traceback, exit 1."""
    from sqlalchemy.engine import make_url

    engine = create_db_engine(postgres_url)
    upgrade(engine)
    engine.dispose()
    read_only = make_url(postgres_url).update_query_dict({"options": "-c default_transaction_read_only=on"})
    url = read_only.render_as_string(hide_password=False)
    result = CliRunner().invoke(medcli, ["outbox", "retry", "--all-dead", "--db", url])
    assert result.exit_code == 3, result.output
    assert f"database unusable at {shown_url(url)}: cannot execute UPDATE in a read-only transaction" in result.stderr


def test_a_postgresql_server_that_refuses_the_connection_is_said_on_one_line():
    """psycopg's message holds a line break and a tab ("Is the server running on that host..."):
    the error came out on two lines, as `meddaemon health` does not print it."""
    from ports import free_port

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/synthetic"
    result = CliRunner().invoke(medcli, ["scans", "--db", url])
    assert result.exit_code == 3, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: database unavailable at "), result.stderr
    assert "Connection refused Is the server running" in lines[0]
