"""``medcli retry``: failed scans back through the inbox from the command line, exit 0 when all went,
2 with a named reason when something was refused."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from dicom_factory import write_png

from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.medcli import cli as medcli
from permissions import held_to_file_modes


def start_once(runner: CliRunner, dirs: list[str], **env: str) -> None:
    result = runner.invoke(meddaemon, ["start", *dirs, "--once", "--stable-seconds", "0", "--workers", "0"], env=env)
    assert result.exit_code == 0, result.output


def failed_scans(runner: CliRunner, dirs: list[str]) -> list[dict]:
    out = runner.invoke(medcli, ["scans", "--state", "failed", "--json", *dirs[2:]]).stdout
    return json.loads(out)


@pytest.fixture
def unroutable(runner: CliRunner, dirs: list[str], tmp_path: Path) -> int:
    """A PNG at the inbox root with no default task: failed as unroutable by a real daemon run."""
    write_png(tmp_path / "inbox" / "synthetic.png", np.full((40, 40), 90, np.uint8))
    start_once(runner, dirs)
    [scan] = failed_scans(runner, dirs)
    assert scan["reason"] == "unroutable"
    return scan["id"]


def retry(runner: CliRunner, dirs: list[str], *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(medcli, ["retry", *dirs, *args])


def test_retry_sends_the_file_back_and_the_daemon_records_a_new_attempt(
    runner: CliRunner, dirs: list[str], tmp_path: Path, unroutable: int
):
    result = retry(runner, dirs, str(unroutable), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and [r["scan_id"] for r in data["requeued"]] == [unroutable]
    assert data["requeued"][0]["inbox_path"] == str(tmp_path / "inbox" / "synthetic.png")
    start_once(runner, dirs, MEDDAEMON_DEFAULT_TASK="busi")
    scans = json.loads(runner.invoke(medcli, ["scans", "--json", *dirs[2:]]).stdout)
    assert [(s["id"], s["state"], s["task"]) for s in scans] == [
        (unroutable + 1, "waiting_model", "busi"),
        (unroutable, "failed", None),
    ]
    # still failed, as it did fail; said to be retried (it read as a failure left to deal with)
    assert [bool(s["retried_at"]) for s in scans] == [False, True]
    listed = runner.invoke(medcli, ["scans", "--state", "failed", *dirs[2:]]).stdout.splitlines()
    assert [line.endswith("(retried)") for line in listed] == [True]


def test_a_refused_retry_exits_2_and_names_why(runner: CliRunner, dirs: list[str], unroutable: int):
    assert retry(runner, dirs, str(unroutable)).exit_code == 0
    again = retry(runner, dirs, str(unroutable))
    assert again.exit_code == 2 and "refused (already_retried)" in again.output
    unknown = retry(runner, dirs, "999999")
    assert unknown.exit_code == 2 and "refused (unknown_scan)" in unknown.output
    reason = retry(runner, dirs, "--reason", "no_such_reason", "--json")
    assert reason.exit_code == 2 and json.loads(reason.stdout)["refused"][0]["code"] == "unknown_reason"


def test_a_bulk_retry_leaves_alone_what_no_retry_can_send_back_and_exits_0(
    runner: CliRunner, dirs: list[str], tmp_path: Path
):
    """A scheduled `--all-failed` exited 2 at every run, for ever, once one kept original had been
    changed by hand (or was a link, or gone): each is named and left alone; the others go back."""
    for i in range(2):
        write_png(tmp_path / "inbox" / f"synthetic_{i}.png", np.full((40, 40), 90 + i, np.uint8))
    start_once(runner, dirs)
    edited = sorted((tmp_path / "state" / "failed").rglob("synthetic_0.png"))[0]
    edited.write_bytes(b"SYNTHETIC bytes edited by hand")
    ids = {Path(s["source_name"]).name: s["id"] for s in failed_scans(runner, dirs)}
    first, second = ids["synthetic_0.png"], ids["synthetic_1.png"]

    result = retry(runner, dirs, "--all-failed", "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and [r["scan_id"] for r in data["requeued"]] == [second] and data["refused"] == []
    assert [(r["scan_id"], r["code"]) for r in data["left_alone"]] == [(first, "original_changed")]
    again = retry(runner, dirs, "--reason", "unroutable")
    assert again.exit_code == 0 and f"left alone (original_changed): scan {first}" in again.output
    named = retry(runner, dirs, str(first))
    assert named.exit_code == 2 and "refused (original_changed)" in named.output


def test_a_schedule_sends_a_file_that_failed_the_same_way_after_a_retry_back_only_with_again(
    runner: CliRunner, dirs: list[str], tmp_path: Path, unroutable: int
):
    """A scheduled --all-failed sent a file that can never pass back at every run, each run adding a
    failed row (and a failure to health's rate). Once its bytes failed the same way after a retry,
    a bulk run leaves it alone, named, exit 0; --again, or its id, sends it back."""
    assert retry(runner, dirs, "--all-failed").exit_code == 0
    start_once(runner, dirs)  # still no default task: unroutable again
    [again] = [s for s in failed_scans(runner, dirs) if s["id"] != unroutable]

    scheduled = retry(runner, dirs, "--all-failed", "--json")

    assert scheduled.exit_code == 0, scheduled.output
    data = json.loads(scheduled.stdout)
    assert data["ok"] and data["requeued"] == [] and [r["code"] for r in data["left_alone"]] == ["failed_again"]
    assert f"scan {again['id']} failed as unroutable again after scan {unroutable}" in data["left_alone"][0]["message"]
    assert not (tmp_path / "inbox" / "synthetic.png").exists()
    assert retry(runner, dirs, "1", "--again").exit_code == 2  # --again goes with a bulk selection
    forced = retry(runner, dirs, "--reason", "unroutable", "--again")
    assert forced.exit_code == 0 and f"scan {again['id']} (unroutable): sent back as" in forced.output
    assert (tmp_path / "inbox" / "synthetic.png").exists()


def test_a_file_too_large_to_read_that_failed_again_after_a_retry_is_left_alone_by_its_name(
    runner: CliRunner, dirs: list[str], tmp_path: Path
):
    """A file over max_file_bytes is never read: with no SHA-256 it never matched its earlier
    attempt, and a schedule sent it back at every run. A file never read is known by its name."""
    limit = {"MEDDAEMON_MAX_FILE_BYTES": "100"}
    write_png(
        tmp_path / "inbox" / "busi" / "synthetic_large.png",
        np.random.default_rng(3).integers(0, 255, (40, 40), np.uint8),
    )
    start_once(runner, dirs, **limit)
    assert retry(runner, dirs, "--all-failed").exit_code == 0
    start_once(runner, dirs, **limit)
    [first, again] = sorted(failed_scans(runner, dirs), key=lambda s: s["id"])
    assert (first["reason"], again["reason"]) == ("too_large", "too_large")

    scheduled = runner.invoke(medcli, ["retry", *dirs, "--all-failed", "--json"], env=limit)

    data = json.loads(scheduled.stdout)
    assert scheduled.exit_code == 0 and data["requeued"] == []
    assert [(r["scan_id"], r["code"]) for r in data["left_alone"]] == [(again["id"], "failed_again")]


def test_a_retry_of_vanished_scans_leaves_them_alone_and_exits_0(runner: CliRunner, dirs: list[str], unroutable: int):
    """A bulk selection of a reason whose scans keep no file was refused, exit 2."""
    result = retry(runner, dirs, "--reason", "vanished")
    assert result.exit_code == 0 and result.output.strip() == "no failed scans to retry"


def test_reason_all_failed_and_dry_run(runner: CliRunner, dirs: list[str], tmp_path: Path, unroutable: int):
    dry = retry(runner, dirs, "--all-failed", "--dry-run")
    assert dry.exit_code == 0 and "would send back" in dry.output
    assert not (tmp_path / "inbox" / "synthetic.png").exists()

    assert retry(runner, dirs, "--reason", "empty_file").output.strip() == "no failed scans to retry"
    result = retry(runner, dirs, "--reason", "unroutable")
    assert result.exit_code == 0 and f"scan {unroutable} (unroutable): sent back as" in result.output
    assert (tmp_path / "inbox" / "synthetic.png").exists()


def test_exactly_one_selection_is_required_and_the_message_names_the_options(runner: CliRunner, dirs: list[str]):
    """It named the library's `all_failed`."""
    for given in ((), ("1", "--all-failed")):
        result = retry(runner, dirs, *given)
        assert result.exit_code == 2
        assert "give exactly one of SCAN (an id or a SHA-256), --reason CODE or --all-failed" in result.output


def test_retry_does_not_create_or_migrate_a_database(runner: CliRunner, dirs: list[str], tmp_path: Path):
    result = retry(runner, dirs, "--all-failed")
    assert result.exit_code == 3, result.output
    assert "no meddaemon database at" in result.output
    assert not (tmp_path / "state" / "meddaemon.db").exists()


def test_a_name_holding_a_line_break_is_printed_escaped_as_medcli_scans_shows_it(
    runner: CliRunner, dirs: list[str], tmp_path: Path
):
    """It was printed raw: a name can forge a line of the output, or a terminal escape."""
    write_png(tmp_path / "inbox" / "weird\nname\x1b[2J.png", np.full((40, 40), 90, np.uint8))
    start_once(runner, dirs)
    [scan] = failed_scans(runner, dirs)
    result = retry(runner, dirs, str(scan["id"]), "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and "\x1b" not in result.output
    assert "weird\\nname\\x1b[2J.png" in result.output


def test_a_kept_original_that_cannot_be_read_is_named_not_the_inbox(
    runner: CliRunner, dirs: list[str], tmp_path: Path, unroutable: int
):
    """One error covered the copy: a kept original this user cannot read was refused as
    inbox_unwritable, "cannot write into <inbox>", and the operator went to fix the inbox."""
    [original] = (tmp_path / "state" / "failed").glob("*.png")
    original.chmod(0o000)
    command = [str(Path(sys.executable).parent / "medcli"), "retry", str(unroutable), *dirs, "--json"]
    done = subprocess.run(held_to_file_modes(command), capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    [refused] = json.loads(done.stdout)["refused"]
    assert refused["code"] == "original_unreadable" and f"{original} cannot be read" in refused["message"]
    assert list((tmp_path / "inbox").rglob("*.png")) == []


def test_a_bulk_retry_that_cannot_reach_failed_says_so_and_does_not_leave_the_files_alone(
    runner: CliRunner, dirs: list[str], tmp_path: Path, unroutable: int
):
    """A failed/ folder this user may not search (it is the daemon's) made every kept original look
    gone: a bulk retry left them all alone as original_gone, exit 0, run after run, the files intact."""
    failed = tmp_path / "state" / "failed"
    failed.chmod(0o600)
    try:
        command = [str(Path(sys.executable).parent / "medcli"), "retry", "--all-failed", *dirs, "--json"]
        done = subprocess.run(held_to_file_modes(command), capture_output=True, text=True)
    finally:
        failed.chmod(0o700)
    assert done.returncode == 2, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["left_alone"] == [] and [r["code"] for r in data["refused"]] == ["original_unreadable"]
    assert "cannot be reached: Permission denied" in data["refused"][0]["message"]
    assert len(list(failed.glob("*.png"))) == 1
