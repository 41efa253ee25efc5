"""What both command groups share: the config file they find, timestamps in ``--json``, a fast exit."""

from __future__ import annotations

import gc
import json
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from dicom_factory import write_png

from meddaemon.cli import common
from meddaemon.cli.common import json_value
from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.daemon import main as meddaemon_main
from meddaemon.cli.medcli import cli as medcli
from meddaemon.cli.medcli import main as medcli_main


def test_a_naive_timestamp_is_utc_and_an_aware_one_is_given_in_utc():
    assert json_value(datetime(2026, 3, 1, 12, 30)) == "2026-03-01T12:30:00+00:00"
    assert json_value(datetime(2026, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))) == "2026-03-01T12:30:00+00:00"
    assert json_value(datetime(2026, 3, 1, 12, 30, 0, 5, tzinfo=UTC)) == "2026-03-01T12:30:00.000005+00:00"
    assert json_value(date(2026, 3, 1)) == "2026-03-01"
    assert json_value(Path("/a/b")) == "/a/b"


def test_every_timestamp_of_scans_json_carries_its_offset(db_url: str, tmp_path: Path):
    write_png(tmp_path / "inbox" / "busi" / "synthetic_0.png", np.full((8, 8), 7, np.uint8))
    where = ["--state-dir", str(tmp_path / "state"), "--db", db_url]
    started = CliRunner().invoke(
        meddaemon,
        ["start", "--once", "--watch", str(tmp_path / "inbox"), "--stable-seconds", "0", "--workers", "0", *where],
    )
    assert started.exit_code == 0, started.output
    rows = json.loads(CliRunner().invoke(medcli, ["scans", "--json", *where]).stdout)
    stamp = rows[0]["registered_at"]
    assert stamp.endswith("+00:00")
    assert abs(datetime.fromisoformat(stamp) - datetime.now(UTC)) < timedelta(minutes=5)


@pytest.fixture
def default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A default config (instead of /etc/meddaemon/meddaemon.toml) naming a state dir beside it."""
    path = tmp_path / "etc" / "meddaemon.toml"
    path.parent.mkdir()
    path.write_text('state_dir = "state"\nbatch_size = 7\n')
    monkeypatch.setattr(common, "DEFAULT_CONFIG_FILE", path)
    monkeypatch.delenv("MEDDAEMON_CONFIG", raising=False)
    return path


def sources(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    result = CliRunner().invoke(meddaemon, ["config", "show", "--json", *args], env=env)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout)["sources"])


def test_the_default_config_file_is_read_when_none_is_named(default_config: Path):
    assert sources()["batch_size"] == f"file {default_config}"


def test_medcli_finds_the_database_of_the_default_config(default_config: Path):
    upgraded = CliRunner().invoke(medcli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert (default_config.parent / "state" / "meddaemon.db").is_file()
    assert CliRunner().invoke(medcli, ["scans"]).exit_code == 0
    assert CliRunner().invoke(meddaemon, ["status"]).exit_code == 0


def test_config_and_the_environment_come_before_the_default(default_config: Path, tmp_path: Path):
    named = tmp_path / "named.toml"
    named.write_text("batch_size = 9\n")
    assert sources("--config", str(named))["batch_size"] == f"file {named}"
    assert sources(env={"MEDDAEMON_CONFIG": str(named)})["batch_size"] == f"file {named}"


def test_no_default_config_file_means_the_built_in_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(common, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    monkeypatch.delenv("MEDDAEMON_CONFIG", raising=False)
    assert sources()["batch_size"] == "default"


@pytest.mark.parametrize("main", [meddaemon_main, medcli_main])
def test_each_console_script_exits_with_its_heap_frozen(main, monkeypatch: pytest.MonkeyPatch):
    """The interpreter's shutdown then skips walking what torch left (``meddaemon.heap``)."""
    monkeypatch.setattr("sys.argv", ["prog", "--help"])
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_database_error_that_is_a_bug_keeps_its_traceback_while_a_file_that_is_no_database_is_one_line():
    """ "database unusable" (exit 3) is for SQLite's plain DatabaseError (not a database, malformed);
    an IntegrityError or a ProgrammingError is a bug, whose traceback a developer needs."""
    import click
    from sqlalchemy.exc import DatabaseError, IntegrityError, InternalError

    def failing(error: Exception) -> click.Command:
        @click.command()
        @common.handle_errors
        def command() -> None:
            raise error

        return command

    unusable = CliRunner().invoke(failing(DatabaseError("SELECT 1", {}, Exception("file is not a database"))))
    assert unusable.exit_code == 3 and "database unusable: file is not a database" in unusable.stderr
    bug = CliRunner().invoke(failing(IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: t.a"))))
    assert bug.exit_code == 1 and isinstance(bug.exception, IntegrityError)

    class PostgresError(Exception):
        def __init__(self, sqlstate: str, message: str) -> None:
            super().__init__(message)
            self.sqlstate = sqlstate

    read_only = InternalError("UPDATE", {}, PostgresError("25006", "cannot execute UPDATE in a read-only transaction"))
    assert CliRunner().invoke(failing(read_only)).exit_code == 3
    aborted = InternalError("SELECT 1", {}, PostgresError("25P02", "current transaction is aborted"))
    used_on = CliRunner().invoke(failing(aborted))  # an error swallowed inside a transaction: a bug
    assert used_on.exit_code == 1 and isinstance(used_on.exception, InternalError)
