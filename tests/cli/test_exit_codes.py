"""Exit codes mean one thing each, the same for every command (the README's "Exit codes" table):
0 done, 1 failed, 2 bad usage/configuration/input, 3 no usable database, 5 an audit criterion fails.
(4, a daemon declared lost by the others, is covered by the lease tests.)"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine

from audit_factory import SyntheticCohort, synthetic_cohort
from meddaemon.cli import common
from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.medcli import cli as medcli


@pytest.fixture
def cohort(migrated_engine: Engine) -> SyntheticCohort:
    """SYNTHETIC stored predictions of busi/v1 for 60 scans."""
    return synthetic_cohort(migrated_engine, "busi", 60, seed=3)


@pytest.fixture
def labels(tmp_path: Path, cohort: SyntheticCohort) -> Path:
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        for name, truth in zip(cohort.names, cohort.truth, strict=True):
            writer.writerow([name.split("/")[-1], cohort.labels[truth]])
    return path


def run(group: click.Group, *args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(group, list(args), env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def test_the_constants_are_the_documented_codes():
    codes = (common.EXIT_OK, common.EXIT_FAILURE, common.EXIT_USAGE, common.EXIT_DATABASE)
    assert codes == (0, 1, 2, 3)
    assert (common.EXIT_LEASE_LOST, common.EXIT_CRITERIA_FAILED, common.EXIT_SCHEMA_AHEAD) == (4, 5, 6)
    assert (common.EXIT_INTERRUPTED, common.EXIT_TERMINATED) == (130, 143)
    section = (Path(__file__).parents[2] / "README.md").read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    cells = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    documented = [int(cell) for cell in cells if cell.isdigit()]
    assert documented == [0, 1, 2, 3, 4, 5, 6, 130, 143]


def test_0_done(db_url: str, migrated_engine: Engine):
    assert run(medcli, "scans", "--db", db_url).exit_code == 0


def test_1_a_model_the_registry_refuses(db_url: str, migrated_engine: Engine, tmp_path: Path):
    (tmp_path / "not_a_model").mkdir()
    result = run(medcli, "models", "import", str(tmp_path / "not_a_model"), "--db", db_url)
    assert result.exit_code == 1 and "refused (missing_file)" in result.stderr


@pytest.mark.parametrize("command", ["show", "promote", "retire"])
def test_2_an_unknown_model_version(db_url: str, cohort: SyntheticCohort, command: str):
    result = run(medcli, "models", command, "busi", "nosuch", "--db", db_url)
    assert result.exit_code == 2 and "no model version busi/nosuch" in result.stderr


def test_2_an_unknown_scan(db_url: str, migrated_engine: Engine):
    result = run(medcli, "report", "999999", "--db", db_url)
    assert result.exit_code == 2 and "no scan '999999'" in result.stderr


def test_2_an_unknown_version_to_compare_with(db_url: str, labels: Path):
    result = run(medcli, "audit", "--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--compare", "nosuch")
    assert result.exit_code == 2 and "no model version 'nosuch'" in result.stderr


def test_2_an_unknown_scan_state(db_url: str, migrated_engine: Engine):
    result = run(medcli, "scans", "--state", "bogus", "--db", db_url)
    assert result.exit_code == 2
    assert "'bogus' is not one of" in result.output and "waiting_model" in result.output


def test_2_a_bad_setting(tmp_path: Path):
    result = run(meddaemon, "config", "show", env={"MEDDAEMON_WORKERS": "two"})
    assert result.exit_code == 2 and "MEDDAEMON_WORKERS" in result.stderr


def test_3_no_database(tmp_path: Path):
    result = run(medcli, "scans", "--state-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 3 and "no meddaemon database" in result.stderr


def test_5_an_audit_criterion_that_fails_and_0_when_it_holds(db_url: str, labels: Path):
    audit = ["audit", "--db", db_url, "--labels", str(labels), "--bootstrap", "0"]
    failed = run(medcli, *audit, "--require", "sensitivity>=0.999")
    assert failed.exit_code == 5, failed.output
    assert "FAIL sensitivity>=0.999" in failed.stdout
    assert run(medcli, *audit, "--require", "auc>=0.01").exit_code == 0


def test_130_ctrl_c_in_any_command(db_url: str, migrated_engine: Engine, tmp_path: Path):
    """A command waiting on its input (here a labels file that is a FIFO nothing writes to yet) and
    sent SIGINT: click's own answer was "Aborted!", exit 1 (``models import`` of a large checkpoint
    met it most)."""
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    medcli_path = Path(sys.executable).parent / "medcli"
    proc = subprocess.Popen(
        [str(medcli_path), "audit", "--db", db_url, "--labels", str(fifo), "--task", "busi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wchan = Path(f"/proc/{proc.pid}/wchan")
        deadline = time.monotonic() + 60
        while wchan.read_text() != "wait_for_partner":  # the FIFO's open() waits for a writer
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted (Ctrl-C)" in err and "Aborted" not in err


def test_every_command_answers_ctrl_c_and_the_errors_a_user_can_act_on_in_one_line():
    """`medcli synth` and `medcli dataset inspect` answered Ctrl-C with click's "Aborted!", exit 1:
    every command of both programs goes through ``handle_errors``."""
    from meddaemon.cli.daemon import cli as meddaemon

    def commands(group: click.Group, name: str) -> list[tuple[str, click.Command]]:
        found = []
        for sub, command in group.commands.items():
            if isinstance(command, click.Group):
                found += commands(command, f"{name} {sub}")
            else:
                found.append((f"{name} {sub}", command))
        return found

    everyone = commands(meddaemon, "meddaemon") + commands(medcli, "medcli")
    assert len(everyone) > 20
    assert [name for name, command in everyone if not getattr(command.callback, "handles_errors", False)] == []
