"""The command line: help that explains, --json for scripts, exit codes that mean something."""

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from dicom_factory import write_png
from sqlalchemy import text

from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.medcli import cli as medcli
from meddaemon.db.engine import create_db_engine
from meddaemon.engine.tasks import BUILTIN_TASKS
from model_factory import drop_study, promote_into, write_model


def test_the_console_scripts_are_installed_and_explain_themselves():
    bindir = Path(sys.executable).parent
    out = subprocess.run([bindir / "meddaemon", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Watch a folder" in out and "start" in out and "status" in out
    out = subprocess.run([bindir / "medcli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "scans" in out and "decoders" in out


def every_command(group: click.Group, path: tuple[str, ...]):  # type: ignore[no-untyped-def]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name), command


@pytest.mark.parametrize("group", [meddaemon, medcli], ids=["meddaemon", "medcli"])
def test_every_option_of_every_command_says_what_it_is_for(group: click.Group):
    """`medcli scans --limit`, `models import --format` and `--outputs`, `outbox purge
    --older-than-days` and five more showed a bare name in --help."""
    silent = [
        f"{' '.join(path)} {option.opts[0]}"
        for path, command in every_command(group, ())
        for option in command.params
        if isinstance(option, click.Option) and not option.hidden and not option.help
    ]
    assert silent == []


def test_start_help_documents_every_option(runner: CliRunner):
    out = runner.invoke(meddaemon, ["start", "--help"]).output
    for option in ("--watch", "--once", "--stable-seconds", "--workers", "--db", "--config", "--json"):
        assert option in out
    # the built-in defaults, which `meddaemon config default` alone gave
    flat = " ".join(out.split())
    for said in ("(default: 2.0)", "(default: 30.0)", "default: 2)", "(default: 64)", "(default: native)"):
        assert said in flat, said


def test_config_show_says_where_each_value_comes_from(runner: CliRunner, tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("batch_size = 8\n")
    result = runner.invoke(
        meddaemon,
        ["config", "show", "--json", "--config", str(config), "--state-dir", str(tmp_path)],
        env={"MEDDAEMON_WORKERS": "3"},
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["batch_size"] == 8 and data["sources"]["batch_size"] == f"file {config}"
    assert data["settings"]["workers"] == 3 and data["sources"]["workers"] == "env MEDDAEMON_WORKERS"
    assert data["sources"]["state_dir"] == "flag"
    assert data["settings"]["db_url"].endswith("meddaemon.db")


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_config_show_never_prints_the_database_password(runner: CliRunner, tmp_path: Path, as_json: bool):
    """deploy/README.md keeps it in a file of mode 0600; `config show` is what operators paste into tickets."""
    url = "postgresql+psycopg://meddaemon:SYNTHETIC-S3CRET@db.example/meddaemon"
    args = ["config", "show", "--state-dir", str(tmp_path), *(["--json"] if as_json else [])]
    result = runner.invoke(meddaemon, args, env={"MEDDAEMON_DB": url})
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC-S3CRET" not in result.output
    assert "postgresql+psycopg://meddaemon:***@db.example/meddaemon" in result.output


def test_config_default_prints_a_file_that_loads(runner: CliRunner, tmp_path: Path):
    text_ = runner.invoke(meddaemon, ["config", "default"]).output
    (tmp_path / "c.toml").write_text(text_)
    assert runner.invoke(meddaemon, ["config", "show", "--config", str(tmp_path / "c.toml")]).exit_code == 0


def test_a_bad_setting_exits_2_with_the_key_named(runner: CliRunner, dirs: list[str]):
    result = runner.invoke(meddaemon, ["start", *dirs, "--once"], env={"MEDDAEMON_OBSERVER": "carrier-pigeon"})
    assert result.exit_code == 2
    assert "observer" in result.output and "MEDDAEMON_OBSERVER" in result.output


def test_start_refuses_a_missing_watch_folder_with_exit_2_naming_it(runner: CliRunner, dirs: list[str], tmp_path: Path):
    result = runner.invoke(meddaemon, ["start", *dirs, "--once", "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert f"the watch folder {(tmp_path / 'inbox').resolve()} does not exist" in result.output
    assert "--create-watch" in result.output and not (tmp_path / "inbox").exists()
    assert "setting 'watch' from flag" in result.output  # where the path came from, as every bad setting says


def test_a_watch_folder_that_is_a_file_is_refused_naming_the_config_file_it_came_from(tmp_path: Path):
    (tmp_path / "afile").touch()
    config = tmp_path / "c.toml"
    config.write_text('watch = "afile"\nstate_dir = "state"\n')
    result = CliRunner().invoke(meddaemon, ["start", "--config", str(config), "--once", "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert f"setting 'watch' from file {config}: the watch folder {tmp_path / 'afile'} is not a folder" in result.output


def test_status_names_a_task_whose_active_model_no_daemon_serves(runner: CliRunner, dirs: list[str], tmp_path: Path):
    """An active version refused (its weights changed on disk): its scans wait in ``waiting_model``,
    and status listed only the tasks without a model, which busi is not: nothing said why they wait."""
    for i in range(2):
        write_png(tmp_path / "inbox" / "busi" / f"synthetic_{i}.png", np.full((8, 8), i, np.uint8))
    once = runner.invoke(meddaemon, ["start", *dirs, "--once", "--stable-seconds", "0", "--workers", "0"])
    assert once.exit_code == 0, once.output
    state = tmp_path / "state"
    promote_into(f"sqlite:///{state / 'meddaemon.db'}", state / "models", write_model(tmp_path / "model"))

    status = json.loads(runner.invoke(meddaemon, ["status", *dirs, "--json"]).stdout)
    assert status["waiting_active_model"] == {"busi": 2} and "busi" not in status["waiting_model"]
    human = runner.invoke(meddaemon, ["status", *dirs]).output
    said = "tasks whose active model no daemon serves (refused or failing to load: the log says why):\n"
    assert said + "  busi           2\n" in human


def test_a_once_run_whose_reports_could_not_be_written_says_so_and_exits_1(
    runner: CliRunner, dirs: list[str], tmp_path: Path
):
    """A cron job's ``--once`` whose reports folder could not be written: the scans stayed inferred in
    work/, and the run said nothing of it (exit 0, the log promising a retry every 30 s by a process
    that had exited)."""
    for i in range(2):
        write_png(tmp_path / "inbox" / "busi" / f"synthetic_{i}.png", np.full((32, 32), i, np.uint8))
    state = tmp_path / "state"
    promote_into(f"sqlite:///{state / 'meddaemon.db'}", state / "models", write_model(tmp_path / "model"))
    (state / "reports").mkdir()
    (state / "reports" / "scans").write_text("a file where the reports folder should be")
    once = [*dirs, "--once", "--stable-seconds", "0", "--workers", "0", "--json"]

    failed = runner.invoke(meddaemon, ["start", *once])
    assert failed.exit_code == 1, failed.output
    assert json.loads(failed.stdout)["unreported"] == 2
    assert "error: the reports of 2 scans could not be written" in failed.stderr and "studies" not in failed.stderr
    assert "it stays inferred and is left to the next run" in failed.stderr and "retried every" not in failed.stderr

    (state / "reports" / "scans").unlink()
    again = runner.invoke(meddaemon, ["start", *once])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["unreported"] == 0
    assert len(list((state / "reports" / "scans").rglob("*.pdf"))) == 2


def test_a_once_run_whose_dicom_outputs_wait_for_their_destination_says_so(runner: CliRunner, tmp_path: Path):
    """A destination down (its share unmounted): the outputs waited in the outbox, and the run's
    summary and JSON said nothing of them, only a warning per object in the log."""
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text(
        f'watch = "{tmp_path / "inbox"}"\nstate_dir = "{state}"\ndicom_outputs = ["sr"]\n'
        f'[[destination]]\nname = "share"\nkind = "folder"\npath = "{tmp_path / "unmounted"}"\n'
    )
    promote_into(f"sqlite:///{state / 'meddaemon.db'}", state / "models", write_model(tmp_path / "model"))
    drop_study(tmp_path / "inbox" / "busi", count=1)
    once = ["start", "--config", str(config), "--once", "--json", "--stable-seconds", "0", "--workers", "0"]

    result = runner.invoke(meddaemon, once)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs_waiting"] == 1
    assert "1 DICOM outputs wait in the outbox for their destinations" in result.stderr

    # with reports off a --once sends nothing (the outputs go with the reports): it says nothing of them either
    config.write_text("reports = false\n" + config.read_text())
    quiet = runner.invoke(meddaemon, once)
    assert quiet.exit_code == 0, quiet.output
    assert json.loads(quiet.stdout)["outputs_waiting"] == 0 and "wait in the outbox" not in quiet.stderr


def test_start_creates_a_missing_watch_folder_when_asked(runner: CliRunner, dirs: list[str], tmp_path: Path):
    result = runner.invoke(meddaemon, ["start", *dirs, "--create-watch", "--once", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "inbox").is_dir()
    config = tmp_path / "c.toml"
    config.write_text(f'create_watch = true\nwatch = "{tmp_path / "other"}"\n')
    result = runner.invoke(meddaemon, ["start", "--config", str(config), *dirs[2:], "--once", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "other").is_dir()


def test_start_once_then_status_report_the_same_counts(runner: CliRunner, dirs: list[str], tmp_path: Path):
    for i in range(3):
        write_png(tmp_path / "inbox" / "busi" / f"synthetic_{i}.png", np.full((8, 8), i, np.uint8))
    (tmp_path / "inbox" / "busi" / "bad.png").write_bytes(b"")
    result = runner.invoke(meddaemon, ["start", *dirs, "--once", "--json", "--stable-seconds", "0", "--workers", "0"])
    assert result.exit_code == 0, result.output
    # no model: the routed scans wait for one, none got a result (the log said so, the JSON did not)
    assert json.loads(result.stdout) == {
        "routed": 3, "inferred": 0, "duplicates": 0, "failed": 1, "drained": True, "left": 0, "held": 0,
        "unlisted": 0, "unreported": 0, "unreported_studies": 0, "refused_models": [], "outputs_waiting": 0,
    }  # fmt: skip
    assert "4 of 4 files" in result.stderr
    assert f"no active model for {len(BUILTIN_TASKS)} task(s)" in result.output and "busi (0 waiting)" in result.output

    status = json.loads(runner.invoke(meddaemon, ["status", *dirs, "--json"]).stdout)
    assert status["states"] == {"waiting_model": 3, "failed": 1}
    assert status["failures_by_reason"] == {"empty_file": 1}
    assert status["last_failures"][0]["source_name"] == "busi/bad.png"
    assert isinstance(status["last_failures"][0]["scan_id"], int)  # what `medcli retry` takes
    none = runner.invoke(meddaemon, ["status", *dirs, "--json", "--recent", "0"])
    assert json.loads(none.stdout)["last_failures"] == []
    # -1 was SQLite's "no limit" (every failure) and an error on PostgreSQL
    assert runner.invoke(meddaemon, ["status", *dirs, "--recent", "-1"]).exit_code == 2
    assert status["extra"]["inbox_waiting"] == 0
    assert status["waiting_model"] == {task: 3 if task == "busi" else 0 for task in BUILTIN_TASKS}

    human = runner.invoke(meddaemon, ["status", *dirs]).output
    assert "waiting_model" in human and "empty_file" in human
    assert "tasks without an active model (scans waiting for one):\n  busi           3\n" in human

    scans = json.loads(runner.invoke(medcli, ["scans", "--state-dir", dirs[3], "--json", "--state", "failed"]).stdout)
    assert [s["reason"] for s in scans] == ["empty_file"]


def test_status_without_a_watch_folder_given_counts_no_inbox_and_warns_of_none(
    runner: CliRunner, dirs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As the README prints it, `meddaemon status` (no --watch) looked for ./inbox: "files waiting
    in the inbox: 0", then that the watch folder was gone, its share unmounted."""
    assert runner.invoke(meddaemon, ["start", *dirs, "--create-watch", "--once", "--workers", "0"]).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = json.loads(runner.invoke(meddaemon, ["status", *dirs[2:], "--json"]).stdout)
    assert data["extra"]["inbox_waiting"] is None and data["extra"]["inbox_unlisted"] == {}
    text = runner.invoke(meddaemon, ["status", *dirs[2:]]).output
    assert "inbox: not counted (give --watch)" in text and "cannot list" not in text and "waiting in the" not in text
    given = runner.invoke(meddaemon, ["status", *dirs, "--json"]).stdout  # given and there: counted
    assert json.loads(given)["extra"]["inbox_waiting"] == 0


def test_a_database_from_a_newer_version_exits_6(runner: CliRunner, dirs: list[str], tmp_path: Path):
    """Not 3, which a supervisor restarts (a database that does not answer may come back): only an
    upgrade of meddaemon helps, and systemd restarted it every 5 s, for good."""
    assert runner.invoke(medcli, ["db", "upgrade", "--state-dir", dirs[3]]).exit_code == 0
    engine = create_db_engine(f"sqlite:///{tmp_path / 'state' / 'meddaemon.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    result = runner.invoke(meddaemon, ["status", *dirs])
    assert result.exit_code == 6 and "upgrade meddaemon" in result.output
    started = runner.invoke(meddaemon, ["start", "--once", "--create-watch", *dirs])
    assert started.exit_code == 6 and "upgrade meddaemon" in started.output


def test_status_names_a_watch_folder_that_is_gone(runner: CliRunner, dirs: list[str]):
    """An unmounted share counted as an empty inbox, without a word."""
    assert runner.invoke(medcli, ["db", "upgrade", "--state-dir", dirs[3]]).exit_code == 0
    status = json.loads(runner.invoke(meddaemon, ["status", *dirs, "--json"]).stdout)
    assert status["extra"]["inbox_unlisted"] == {".": "the watch folder is gone: removed, or its share unmounted"}
    assert (
        "cannot list the inbox folder itself (the watch folder is gone"
        in runner.invoke(meddaemon, ["status", *dirs]).output
    )


def test_decoders_lists_transfer_syntaxes(runner: CliRunner):
    rows = json.loads(runner.invoke(medcli, ["decoders", "--json"]).stdout)
    by_uid = {r["uid"]: r for r in rows}
    assert by_uid["1.2.840.10008.1.2.5"]["decodable"]  # RLE Lossless
    assert by_uid["1.2.840.10008.1.2.4.90"]["decodable"]  # JPEG 2000 Lossless


def test_tasks_lists_the_seed_presets_with_their_contracts(runner: CliRunner):
    tasks = json.loads(runner.invoke(medcli, ["tasks", "--json"]).stdout)
    assert set(tasks) == {"busi", "busi_binary", "chestxray14", "covid", "histopathology"}
    assert tasks["busi"]["labels"] == ["benign", "malignant", "normal"]
    assert tasks["chestxray14"]["kind"] == "multilabel" and len(tasks["chestxray14"]["labels"]) == 14
    assert tasks["histopathology"]["contract"]["channels"] == 3
    assert tasks["covid"]["architecture"] == "mobilenet_v2"
    human = runner.invoke(medcli, ["tasks"]).output
    assert "densenet121" in human and "1x320x320" in human


def test_a_once_run_cut_short_says_what_it_left_undone_files_in_the_inbox_or_the_work_on_its_scans():
    """A stop once every file was taken in, its reports still being written, said "stopped before
    the inbox was drained: 0 files left in it"."""
    from meddaemon.cli.daemon import cut_short
    from meddaemon.daemon.intake_stage import RunStats

    assert cut_short(RunStats(drained=False, left=3)) == "stopped before the inbox was drained: 3 files left in it"
    taken_in = cut_short(RunStats(routed=180, inferred=180, drained=False, left=0))
    assert "0 files" not in taken_in and "every file was taken in from the inbox" in taken_in
    assert "(inference, reports, DICOM outputs) was cut short" in taken_in
    nothing = cut_short(RunStats(drained=False, left=0))  # a stop on an empty inbox: nothing to finish
    assert nothing == "stopped as asked before the run ended: no file was taken from the inbox, which holds none"


def test_start_with_json_but_not_once_is_a_usage_error(runner: CliRunner, tmp_path: Path):
    """Accepted, it printed nothing: --json is --once's summary."""
    (tmp_path / "inbox").mkdir()
    args = ["start", "--json", "--watch", str(tmp_path / "inbox"), "--state-dir", str(tmp_path / "state")]
    result = runner.invoke(meddaemon, args)
    assert result.exit_code == 2 and "--json goes with --once" in result.output, result.output
    assert not (tmp_path / "state").exists()
