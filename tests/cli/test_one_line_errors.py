"""A setting the daemon cannot use is one line, ``error: ...``, and exit code 2: never a traceback.
The real CLI: click's CliRunner (exceptions not caught, so a traceback fails the test) and, where
what is printed before logging is set up matters, a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from meddaemon.cli.daemon import cli as meddaemon
from permissions import held_to_file_modes

BIN = Path(sys.executable).parent


def start(tmp_path: Path, state_dir: Path, env: dict[str, str] | None = None) -> Result:
    """``meddaemon start --once`` on an inbox that exists (a missing one is said first)."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    args = ["start", "--once", "--watch", str(tmp_path / "inbox"), "--state-dir", str(state_dir), "--workers", "0"]
    return CliRunner().invoke(meddaemon, args, env=env, catch_exceptions=False)


def assert_one_line_error(result: Result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0]


def test_a_state_dir_under_proc(tmp_path: Path):
    assert_one_line_error(start(tmp_path, Path("/proc/meddaemon")), "'state_dir'", "/proc/meddaemon cannot be used")


def test_a_state_dir_below_a_file(tmp_path: Path):
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(start(tmp_path, tmp_path / "a_file" / "state"), "'state_dir'", "Not a directory")


def test_an_unwritable_state_dir(tmp_path: Path):
    """A subprocess held to file modes (under root too, as in CI: ``permissions``)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    (tmp_path / "inbox").mkdir()
    args = ["start", "--once", "--watch", str(tmp_path / "inbox"), "--state-dir", str(locked), "--workers", "0"]
    done = subprocess.run(held_to_file_modes([str(BIN / "meddaemon"), *args]), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "'state_dir'" in lines[0] and "Permission denied" in lines[0]


def test_an_unknown_log_level_from_the_environment_at_start_and_in_config_show(tmp_path: Path):
    env = {"MEDDAEMON_LOG_LEVEL": "verbose"}
    assert_one_line_error(start(tmp_path, tmp_path / "state", env), "MEDDAEMON_LOG_LEVEL", "'VERBOSE'")
    shown = CliRunner().invoke(meddaemon, ["config", "show"], env=env, catch_exceptions=False)
    assert_one_line_error(shown, "MEDDAEMON_LOG_LEVEL")


def test_a_boolean_that_is_not_one_names_the_variable():
    result = CliRunner().invoke(meddaemon, ["config", "show"], env={"MEDDAEMON_HEATMAPS": "maybe"})
    assert_one_line_error(result, "MEDDAEMON_HEATMAPS", "'maybe' is not a boolean")


def test_an_unknown_key_in_the_config_file_suggests_the_closest(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("stable_second = 1\n")
    result = CliRunner().invoke(meddaemon, ["config", "show", "--config", str(config)], catch_exceptions=False)
    assert_one_line_error(result, "unknown keys ['stable_second']", "did you mean stable_seconds?")


def test_an_unknown_environment_variable_is_a_warning_with_the_closest_name(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_") or k.startswith("MEDDAEMON_TEST_")}
    env["MEDDAEMON_WROKERS"] = "1"
    done = subprocess.run(
        [BIN / "meddaemon", "config", "show", "--state-dir", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "environment variable MEDDAEMON_WROKERS is not a setting and is ignored (did you mean MEDDAEMON_WORKERS?)\n"
    )
