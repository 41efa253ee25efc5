"""`meddaemon health`: exit 0 healthy, 1 degraded, 2 down, a JSON report for machines; it writes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.db.clock import read_db_clock
from meddaemon.db.models import DaemonInstance
from permissions import held_to_file_modes

MEDDAEMON = Path(sys.executable).parent / "meddaemon"


def add_daemon(engine, node: str, age: float, state: str = "running", stopped_ago: float | None = None) -> None:
    with Session(engine) as s, s.begin():
        clock = read_db_clock(s)
        s.add(
            DaemonInstance(
                node=node,
                pid=1234,
                version="0.1.0",
                state=state,
                lease_seconds=30.0,
                started_at=clock - age - 10,
                heartbeat_at=clock - age,
                stopped_at=None if stopped_ago is None else clock - stopped_ago,
            )
        )


def health(runner: CliRunner, db_url: str, tmp_path: Path, *args: str):
    return runner.invoke(
        meddaemon,
        ["health", "--db", db_url, "--state-dir", str(tmp_path / "state"), "--min-free-mb", "0", *args],
        env={"MEDDAEMON_CONFIG": None},
    )


def test_health_is_listed_and_explains_its_exit_codes(runner):
    assert "health" in runner.invoke(meddaemon, ["--help"]).output
    out = runner.invoke(meddaemon, ["health", "--help"]).output
    for text in ("--node", "--this-node", "--stuck-minutes", "--min-free-mb", "--json", "degraded", "down"):
        assert text in out


def test_a_live_daemon_exits_0_with_a_line_per_check(runner, migrated_engine, db_url, tmp_path):
    add_daemon(migrated_engine, "node-a", age=1)
    result = health(runner, db_url, tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["ok", "database"],
        ["ok", "daemons"],
        ["ok", "lost_daemons"],
        ["ok", "queue"],
        ["ok", "models"],
        ["ok", "failures"],
        ["ok", "outbox"],
        ["ok", "moves"],
        ["ok", "disk"],
    ]
    assert lines[-1] == "health: ok"


def test_json_reports_every_check_and_a_recently_lost_daemon_exits_1(runner, migrated_engine, db_url, tmp_path):
    add_daemon(migrated_engine, "node-a", age=1)
    add_daemon(migrated_engine, "node-b", age=120, state="lost", stopped_ago=60)
    result = health(runner, db_url, tmp_path, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert (report["status"], report["exit_code"]) == ("degraded", 1)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["lost_daemons"]["status"] == "degraded"
    assert "node node-b" in checks["lost_daemons"]["message"]
    assert checks["daemons"]["details"]["nodes"] == ["node-a"]


def test_only_stale_heartbeats_exit_2(runner, migrated_engine, db_url, tmp_path):
    add_daemon(migrated_engine, "node-a", age=300)
    result = health(runner, db_url, tmp_path, "--json")
    assert result.exit_code == 2, result.output
    assert json.loads(result.output)["status"] == "down"


def test_node_and_this_node_require_a_daemon_on_that_machine(runner, migrated_engine, db_url, tmp_path):
    add_daemon(migrated_engine, "node-a", age=1)
    assert health(runner, db_url, tmp_path, "--node", "node-a").exit_code == 0
    assert health(runner, db_url, tmp_path, "--node", "node-z").exit_code == 2
    here = socket.gethostname()
    assert health(runner, db_url, tmp_path, "--this-node").exit_code == (0 if here == "node-a" else 2)
    add_daemon(migrated_engine, here, age=1)
    assert health(runner, db_url, tmp_path, "--this-node").exit_code == 0


def test_low_disk_space_exits_1(runner, migrated_engine, db_url, tmp_path):
    add_daemon(migrated_engine, "node-a", age=1)
    result = health(runner, db_url, tmp_path, "--min-free-mb", str(2**40), "--json")
    assert result.exit_code == 1, result.output
    assert {c["name"]: c["status"] for c in json.loads(result.output)["checks"]}["disk"] == "degraded"


def test_a_database_that_is_down_exits_2_without_creating_anything(runner, tmp_path):
    result = runner.invoke(
        meddaemon, ["health", "--state-dir", str(tmp_path / "state"), "--json"], env={"MEDDAEMON_CONFIG": None}
    )
    assert result.exit_code == 2, result.output
    report = json.loads(result.output)
    assert [c["status"] for c in report["checks"][:2]] == ["down", "down"]
    assert not (tmp_path / "state").exists()


def test_a_bad_option_is_a_usage_error(runner, tmp_path):
    result = runner.invoke(meddaemon, ["health", "--max-failure-fraction", "2"])
    assert result.exit_code == 2
    assert "--max-failure-fraction" in result.output


def test_health_while_its_tables_are_locked_on_postgresql_ends_within_a_container_s_healthcheck_timeout(
    runner, migrated_postgres_url: str, tmp_path
):
    """Tables held in ACCESS EXCLUSIVE (a migration, VACUUM FULL) held `meddaemon health` for as long
    as it lasted: the timer's unit never failed, a container's HEALTHCHECK got no verdict. Each check
    then waited its 5 s: 32 s for all six, past the Dockerfile's 20 s timeout, which counts it failed."""
    import time

    from sqlalchemy import text

    from meddaemon.db.engine import create_db_engine

    holder = create_db_engine(migrated_postgres_url)
    add_daemon(holder, socket.gethostname(), age=1)
    try:
        with holder.connect() as connection:
            mine = "schemaname = current_schema() AND tablename != 'alembic_version'"
            tables = connection.execute(text(f"SELECT tablename FROM pg_tables WHERE {mine}")).scalars().all()
            connection.execute(text(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            result = health(runner, migrated_postgres_url, tmp_path, "--json")
            took = time.monotonic() - started
            connection.rollback()
    finally:
        holder.dispose()
    assert took < 20.0
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["status"] == "degraded"
    said = {check["name"]: check["message"] for check in report["checks"]}
    assert said["daemons"].startswith("could not be checked")
    assert said["moves"].startswith("not checked: the checks before it waited 10 s on the database")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_database_on_a_file_system_it_cannot_write_to_is_read_not_called_unreachable(
    migrated_engine, db_url, tmp_path
):
    """Reading a WAL database makes its index file beside it: on a file system remounted read-only
    (here: a folder held to mode 555), health said "the database is unreachable: unable to open
    database file" and status failed (exit 3) with the database intact."""
    add_daemon(migrated_engine, "node-a", age=1)
    migrated_engine.dispose()  # the last connection closes: its -wal and -shm files go with it
    folder = Path(make_url(db_url).database).parent
    assert not list(folder.glob("*-shm")) and not list(folder.glob("*-wal"))
    state = tmp_path / "state"
    state.mkdir()
    where = ["--db", db_url, "--state-dir", str(state)]
    folder.chmod(0o555)
    try:
        checked = subprocess.run(
            held_to_file_modes([str(MEDDAEMON), "health", *where, "--min-free-mb", "0", "--json"]),
            capture_output=True, text=True, timeout=120, env={**os.environ, "MEDDAEMON_CONFIG": ""},
        )  # fmt: skip
        status = subprocess.run(
            held_to_file_modes([str(MEDDAEMON), "status", *where, "--json"]),
            capture_output=True, text=True, timeout=120, env={**os.environ, "MEDDAEMON_CONFIG": ""},
        )  # fmt: skip
    finally:
        folder.chmod(0o755)
    report = json.loads(checked.stdout)
    database = next(check for check in report["checks"] if check["name"] == "database")
    assert database["status"] == "ok", checked.stdout + checked.stderr
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["total"] == 0
