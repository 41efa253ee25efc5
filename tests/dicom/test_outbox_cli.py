"""``medcli outbox list | retry | purge``: the queue seen and handled from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from daemon_rows import add_scan
from meddaemon.cli.medcli import cli as medcli
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.dicom import outbox
from meddaemon.dicom.outbox import NewItem
from meddaemon.states import ScanState


def test_list_shows_each_item_with_the_peers_answer_retry_revives_the_dead_and_purge_removes_the_done(
    tmp_path: Path,
):
    state = tmp_path / "state"
    dirs = ["--state-dir", str(state)]
    runner = CliRunner()
    assert runner.invoke(medcli, ["db", "upgrade", *dirs]).exit_code == 0
    (state / "dicom").mkdir()
    (state / "dicom" / "sr.dcm").write_bytes(b"SYNTHETIC")
    engine = create_db_engine(f"sqlite:///{state / 'meddaemon.db'}")
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        from meddaemon.daemon.bookkeeper import ensure_tasks
        from meddaemon.engine.tasks import all_tasks

        ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        scan = add_scan(session, 1, ScanState.REPORTED, format="dicom")
        outbox.enqueue(
            session, scan.id, [NewItem("sr", "pacs", path="dicom/sr.dcm"), NewItem("pdf", "pacs", path="dicom/pdf.dcm")]
        )
        sr, pdf = outbox.claim_due(session, None, 2)
        outbox.record_delivered(session, [sr.id])
        answer = "C-STORE status 0xA900 (SYNTHETIC\x1b[2Jcomment)"  # a peer's Error Comment, as it sent it
        outbox.record_failure(session, pdf.id, answer, True, outbox.Backoff(1, 1, 3), None)
    engine.dispose()

    listed = runner.invoke(medcli, ["outbox", "list", "--json", *dirs])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    assert {(i["object"], i["status"], i["last_error"]) for i in data["items"]} == {
        ("sr", "delivered", None),
        ("pdf", "dead", "C-STORE status 0xA900 (SYNTHETIC\x1b[2Jcomment)"),
    }
    assert data["queue"]["counts"] == {"pending": 0, "delivered": 1, "dead": 1}
    by_object = {i["object"]: i for i in data["items"]}  # the times a script needs, in UTC
    assert by_object["sr"]["delivered_at"].endswith("+00:00") and by_object["sr"]["next_attempt_at"] is None
    assert by_object["pdf"]["created_at"].endswith("+00:00") and by_object["pdf"]["delivered_at"] is None
    text = runner.invoke(medcli, ["outbox", "list", *dirs]).stdout
    assert "dead" in text and "0xA900 (SYNTHETIC\\x1b[2Jcomment)" in text and "1 delivered, 1 dead" in text
    assert "\x1b" not in text  # escaped on the terminal: no peer's text acts on it

    assert runner.invoke(medcli, ["outbox", "retry", *dirs]).exit_code == 2  # nothing named
    delivered = runner.invoke(medcli, ["outbox", "retry", str(sr.id), *dirs])  # passed over without a word
    assert delivered.exit_code == 0 and f"item {sr.id} is delivered, not dead: left as it is" in delivered.stdout
    revived = runner.invoke(medcli, ["outbox", "retry", "--all-dead", *dirs])
    assert revived.exit_code == 0 and "1 item(s) pending again" in revived.stdout
    # a sender claims its own destinations only: one this configuration does not name waits for its daemon
    assert "1 item(s) pending for destination 'pacs', which this configuration does not name" in revived.stdout
    purged = runner.invoke(medcli, ["outbox", "purge", *dirs])
    assert purged.exit_code == 0 and "purged 1 item(s) (delivered); 1 object file(s) removed" in purged.stdout
    assert not (state / "dicom" / "sr.dcm").exists()
    after = json.loads(runner.invoke(medcli, ["outbox", "list", "--json", *dirs]).stdout)
    assert [(i["object"], i["status"]) for i in after["items"]] == [("pdf", "pending")]


def test_retrying_an_item_that_does_not_exist_says_so_and_exits_2(tmp_path: Path):
    """A mistyped id was '0 item(s) pending again', exit 0: a script took it for done."""
    dirs = ["--state-dir", str(tmp_path / "state")]
    runner = CliRunner()
    assert runner.invoke(medcli, ["db", "upgrade", *dirs]).exit_code == 0
    result = runner.invoke(medcli, ["outbox", "retry", "999", *dirs])
    assert result.exit_code == 2 and "no outbox item 999" in result.output, result.output


def test_a_dead_item_with_no_object_is_named_by_retry_and_purge_counts_the_items_it_forgets(tmp_path: Path):
    """Retrying an item born dead (its object could not be made: no file) said "0 item(s) pending
    again" and nothing else; purging dead items said "purged; 0 object file(s) removed" after
    forgetting them."""
    dirs, runner = one_item_born_dead(tmp_path), CliRunner()
    retried = runner.invoke(medcli, ["outbox", "retry", "1", *dirs])
    assert retried.exit_code == 0, retried.output
    assert "item 1 is dead with no object to send (source_without_study: SYNTHETIC): left as it is" in retried.stdout
    purged = runner.invoke(medcli, ["outbox", "purge", "--status", "dead", *dirs])
    assert purged.exit_code == 0 and "purged 1 item(s) (dead); 0 object file(s) removed" in purged.stdout


def test_retry_and_purge_answer_in_json_for_scripts(tmp_path: Path):
    """Their --json was "No such option", exit 2, where `medcli retry` and `outbox list` had one."""
    dirs, runner = one_item_born_dead(tmp_path), CliRunner()
    retried = runner.invoke(medcli, ["outbox", "retry", "1", "--json", *dirs])
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout) == {
        "pending_again": 0,
        "left_alone": [{"id": 1, "why": "is dead with no object to send (source_without_study: SYNTHETIC)"}],
        "pending_unconfigured": {},
    }
    purged = runner.invoke(medcli, ["outbox", "purge", "--status", "dead", "--json", *dirs])
    assert json.loads(purged.stdout) == {"purged": 1, "statuses": ["dead"], "files_removed": 0}


def one_item_born_dead(tmp_path: Path) -> list[str]:
    """A database with one SYNTHETIC scan whose one outbox item could not be made (no study): its
    state directory's flags."""
    from meddaemon.daemon.bookkeeper import ensure_tasks
    from meddaemon.engine.tasks import all_tasks

    dirs = ["--state-dir", str(tmp_path / "state")]
    assert CliRunner().invoke(medcli, ["db", "upgrade", *dirs]).exit_code == 0
    engine = create_db_engine(f"sqlite:///{tmp_path / 'state' / 'meddaemon.db'}")
    with transaction(session_factory(engine)) as session:
        ensure_tasks(session, all_tasks({}))
    with transaction(session_factory(engine)) as session:
        scan = add_scan(session, 1, ScanState.REPORTED, format="dicom")
        assert outbox.enqueue(session, scan.id, [NewItem("sr", "pacs", error="source_without_study: SYNTHETIC")]) == 1
    engine.dispose()
    return dirs
