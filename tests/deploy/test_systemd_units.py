"""The systemd units in deploy/: the directives the daemon's design relies on, and real commands."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meddaemon.cli.common import EXIT_SCHEMA_AHEAD, EXIT_USAGE

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("meddaemon.service", "meddaemon-health.service", "meddaemon-health.timer")


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_the_daemon_unit_notifies_systemd_and_is_restarted_on_failure():
    service = read_unit("meddaemon.service")["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "60"
    assert service["Restart"] == "on-failure"
    assert float(service["RestartSec"]) > 0
    # bad configuration, a database a newer meddaemon upgraded: a restart cannot help
    assert service["RestartPreventExitStatus"].split() == [str(EXIT_USAGE), str(EXIT_SCHEMA_AHEAD)]


def test_the_daemon_unit_stops_gracefully():
    service = read_unit("meddaemon.service")["Service"]
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 120  # long enough to finish and commit a batch


def test_the_daemon_runs_unprivileged_on_a_read_only_system_with_writable_inbox_and_state():
    service = read_unit("meddaemon.service")["Service"]
    assert service["User"] == "meddaemon"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    writable = service["ReadWritePaths"].split()
    assert "/srv/meddaemon/inbox" in writable and "/var/lib/meddaemon" in writable
    assert service["CapabilityBoundingSet"] == ""
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()  # the notify socket
    unit = read_unit("meddaemon.service")["Unit"]
    assert set(unit["RequiresMountsFor"].split()) == {"/srv/meddaemon/inbox", "/var/lib/meddaemon"}


def test_the_daemon_unit_leaves_the_gpus_open_to_cuda():
    """No directive that sets a device policy: PrivateDevices= hides /dev/nvidia*, and before systemd
    252 ProtectClock= implied DeviceAllow=char-rtc, which closed every other device."""
    service = read_unit("meddaemon.service")["Service"]
    closing = {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"}
    assert closing.isdisjoint(service), sorted(closing & set(service))
    assert service["SystemCallFilter"] == "~@clock"


def test_exec_start_is_meddaemon_start_with_the_config_file(real_command):
    argv = shlex.split(read_unit("meddaemon.service")["Service"]["ExecStart"])
    assert argv[1:] == ["start", "--config", "/etc/meddaemon/meddaemon.toml"]
    assert real_command(argv).name == "start"


def test_the_health_units_run_the_health_command_every_minute(real_command):
    health = read_unit("meddaemon-health.service")["Service"]
    assert health["Type"] == "oneshot"
    command = real_command(health["ExecStart"])
    assert command.name == "health"
    timer = read_unit("meddaemon-health.timer")["Timer"]
    assert timer["OnUnitActiveSec"] == "1min"


def test_the_health_check_reads_the_settings_the_daemon_runs_with():
    """Run from / (no working directory), the check looked for a state directory the config leaves
    out (``./.meddaemon``) in /.meddaemon, the daemon's in /var/lib/meddaemon: "down" every minute."""
    daemon, health = read_unit("meddaemon.service")["Service"], read_unit("meddaemon-health.service")["Service"]
    for key in ("WorkingDirectory", "EnvironmentFile", "User", "Group"):
        assert health[key] == daemon[key], key
    config = shlex.split(daemon["ExecStart"])[2:]
    assert shlex.split(health["ExecStart"])[2:4] == config


def test_the_executable_is_the_console_script_pyproject_installs():
    scripts = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("meddaemon.service", "meddaemon-health.service"):
        executable = shlex.split(read_unit(name)["Service"]["ExecStart"])[0]
        assert Path(executable).name in scripts


def installed_files() -> dict[str, Path]:
    """What the install steps of deploy/README.md put in place: ``install -D -m MODE SOURCE DEST`` lines."""
    readme = (DEPLOY / "README.md").read_text()
    placed: dict[str, Path] = {}
    for line in readme.splitlines():
        if not line.lstrip().startswith(("sudo install ", "install ")):
            continue
        words = shlex.split(line, comments=True)
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:2] == ["install", "-D"]:
            source, destination = words[-2:]
            placed[destination] = DEPLOY.parent / source
    return placed


@pytest.mark.parametrize("name", ["meddaemon.service", "meddaemon-health.service"])
def test_the_documentation_the_units_name_is_installed_by_the_documented_steps(name: str):
    documentation = read_unit(name)["Unit"]["Documentation"].split()
    placed = installed_files()
    assert documentation
    for uri in documentation:
        assert uri.startswith("file:///"), f"{uri}: not a local file (unreachable offline)"
        path = uri.removeprefix("file://")
        assert path in placed, f"{path}: no step of deploy/README.md installs it"
        assert placed[path].is_file(), f"{placed[path]}: the source of {path} is not in the repository"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path):
    # verify insists that ExecStart's program exists: point it at this environment's meddaemon
    installed = str(Path(sys.executable).parent / "meddaemon")
    assert Path(installed).exists()
    for name in UNITS:
        text = (DEPLOY / name).read_text().replace("/opt/meddaemon/.venv/bin/meddaemon", installed)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{name}" for name in UNITS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # unknown keys and bad values are only warnings to verify: there must be none
    assert result.stderr.strip() == "", result.stderr
