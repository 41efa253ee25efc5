"""Failed scans can be tried again: their kept original goes back through the inbox once the cause is
fixed, the daemon records a new attempt, and the failed scan keeps its history (issue 12, fault 5)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom, write_png
from sqlalchemy import select

from daemon_rows import add_scan
from meddaemon.daemon import filing
from meddaemon.daemon.retry import Refusal, RetryResult, Selector, retry_failed
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import transaction
from meddaemon.db.models import DuplicateArrival, Scan, utcnow
from meddaemon.states import ScanState
from model_factory import promote, write_model

#: a breast-ultrasound DICOM of the ABDOMEN at the inbox root: no task folder, no routing rule
UNROUTABLE = "synthetic_us_abdomen.dcm"


@pytest.fixture
def daemon(make_settings, tmp_path: Path) -> Daemon:
    """A daemon with a busi model and no default task, after one run that failed an unroutable DICOM."""
    d = Daemon(make_settings(max_wait_ms=10, reports=False))
    d.prepare()
    promote(d, write_model(tmp_path / "model"))
    rng = np.random.default_rng(5)
    write_dicom(
        d.settings.watch / UNROUTABLE,
        pixels=rng.integers(0, 255, (40, 40), dtype=np.uint8),
        modality="US",
        body_part="ABDOMEN",
    )
    d.run(once=True)
    return d


def scans_by_id(daemon: Daemon) -> list[Scan]:
    with daemon.sessions() as session:
        scans = session.scalars(select(Scan).order_by(Scan.id)).all()
        for scan in scans:
            scan.events  # noqa: B018 (loaded before the session closes)
        return list(scans)


def history(scan: Scan) -> list[tuple[str, str | None]]:
    return [(e.state, e.detail) for e in scan.events]


def kept_failure(  # type: ignore[no-untyped-def]
    sessions, settings, kept: Path, data: bytes, reason: str = "changed_after_registration", sha256: str | None = None
) -> int:
    """A SYNTHETIC failed scan row whose original ``data`` is kept at ``kept``, the inbox made; its id."""
    kept.parent.mkdir(parents=True)
    settings.watch.mkdir()
    kept.write_bytes(data)
    with transaction(sessions) as session:
        columns = {"sha256": sha256} if sha256 else {}
        return add_scan(session, 1, ScanState.FAILED, failure_reason=reason, stored_path=str(kept), **columns).id


def test_the_fixture_scan_failed_as_unroutable_and_its_file_was_kept(daemon: Daemon):
    [scan] = scans_by_id(daemon)
    assert (scan.state, scan.failure_reason) == ("failed", "unroutable")
    assert daemon.settings.stored_file(scan.stored_path) == daemon.settings.failed_dir / UNROUTABLE
    assert daemon.settings.stored_file(scan.stored_path).is_file()


def test_a_retried_scan_is_a_new_attempt_that_gets_inferred_and_the_failed_scan_keeps_its_history(
    daemon: Daemon, make_settings
):
    [failed] = scans_by_id(daemon)
    kept = daemon.settings.stored_file(failed.stored_path)
    data = kept.read_bytes()
    settings = make_settings(max_wait_ms=10, reports=False, default_task="busi")

    result = retry_failed(daemon.sessions, settings, Selector(scan=str(failed.id)))

    assert result.ok and [r.scan_id for r in result.requeued] == [failed.id]
    back = settings.watch / UNROUTABLE
    assert result.requeued[0].inbox_path == back and back.read_bytes() == data
    assert not kept.exists() and not (kept.parent / f"{UNROUTABLE}.reason.json").exists()
    assert not [p for p in settings.watch.iterdir() if p.name.startswith(".")]  # no temporary left behind

    Daemon(settings).run(once=True)

    old, new = scans_by_id(daemon)
    assert (old.id, old.state, old.failure_reason, old.stored_path) == (failed.id, "failed", "unroutable", None)
    assert old.retried_at is not None
    assert history(old)[:-1] == history(failed)
    state, detail = history(old)[-1]
    assert state == "failed" and detail.startswith("sent for retry:") and detail.endswith(f"as {UNROUTABLE}")
    assert (new.sha256, new.state, new.task_name, new.source_name) == (old.sha256, "inferred", "busi", UNROUTABLE)
    assert history(new)[0] == ("registered", f"a new attempt: scan {old.id} of the same bytes failed (unroutable)")
    with daemon.sessions() as session:
        assert session.scalar(select(DuplicateArrival.id)) is None
    assert not back.exists()


def test_each_new_attempt_names_the_failed_scan_whose_retry_sent_it_back_among_copies(daemon: Daemon, make_settings):
    """Two files of the same bytes failed, were sent back and failed again: both new attempts said
    they tried the later failed scan again, and the earlier one's retry was in no history."""
    [first] = scans_by_id(daemon)
    settings = daemon.settings
    twin = "synthetic_twin.dcm"
    shutil.copy(settings.stored_file(first.stored_path), settings.watch / twin)
    Daemon(settings).run(once=True)

    result = retry_failed(daemon.sessions, settings, Selector(all_failed=True))
    Daemon(settings).run(once=True)  # still no default task: both fail again, each a new attempt

    assert result.ok and len(result.requeued) == 2
    scans = scans_by_id(daemon)
    by_name = {name: [s for s in scans if s.source_name == name] for name in (UNROUTABLE, twin)}
    for name, (earlier, again) in by_name.items():
        assert history(again)[0] == ("registered", f"a new attempt: scan {earlier.id} of the same bytes failed "
                                                   "(unroutable)"), name  # fmt: skip


def test_a_file_sent_back_keeps_the_mode_of_the_original_whatever_the_retrying_user_s_umask(
    daemon: Daemon, make_settings
):
    """Copied under medcli's umask (0o007 added), the file came back at 0640, its retrying user's: a
    daemon running as another user failed the new attempt as unreadable."""
    [failed] = scans_by_id(daemon)
    kept = daemon.settings.stored_file(failed.stored_path)
    kept.chmod(0o644)
    owner = (12345, 12345) if os.geteuid() == 0 else (os.getuid(), os.getgid())  # root gives it back its owner
    os.chown(kept, *owner)
    settings = make_settings(max_wait_ms=10, reports=False, default_task="busi")
    before = os.umask(0o077)
    try:
        result = retry_failed(daemon.sessions, settings, Selector(scan=str(failed.id)))
    finally:
        os.umask(before)
    assert result.ok
    back = result.requeued[0].inbox_path
    assert stat.S_IMODE(back.stat().st_mode) == 0o644
    assert (back.stat().st_uid, back.stat().st_gid) == owner


def test_a_file_sent_back_never_carries_set_user_id_or_set_group_id_bits(daemon: Daemon):
    """A file dropped set-user-ID by another user came back, through a retrying user who may not give
    it back its owner (the daemon's service user), set-user-ID and owned by that user: for the one
    who dropped it to run as the daemon's user. Here root without CAP_CHOWN is that user."""
    import subprocess
    import sys

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with util-linux's setpriv: this test needs both")
        pytest.skip("needs root (to give the kept file another owner) and setpriv (to take CAP_CHOWN away)")
    [failed] = scans_by_id(daemon)
    kept = daemon.settings.stored_file(failed.stored_path)
    os.chown(kept, 12345, 12345)
    kept.chmod(0o6755)
    medcli = Path(sys.executable).parent / "medcli"
    where = ["--state-dir", str(daemon.settings.state_dir), "--watch", str(daemon.settings.watch)]
    retried = subprocess.run(
        [setpriv, "--bounding-set", "-chown", str(medcli), "retry", str(failed.id), *where, "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "MEDDAEMON_CONFIG": ""},
    )  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    back = daemon.settings.watch / UNROUTABLE
    assert stat.S_IMODE(back.stat().st_mode) == 0o755


def test_bytes_of_a_failed_scan_moved_back_by_hand_are_a_new_attempt_not_a_duplicate(daemon: Daemon):
    [failed] = scans_by_id(daemon)
    (daemon.settings.watch / "busi").mkdir()
    kept = daemon.settings.stored_file(failed.stored_path)
    (daemon.settings.watch / "busi" / UNROUTABLE).write_bytes(kept.read_bytes())

    Daemon(daemon.settings).run(once=True)

    old, new = scans_by_id(daemon)
    assert (old.state, new.state, new.task_name) == ("failed", "inferred", "busi")
    assert new.sha256 == old.sha256
    with daemon.sessions() as session:
        assert session.scalar(select(DuplicateArrival.id)) is None

    again = daemon.settings.stored_file(new.stored_path)
    (daemon.settings.watch / "busi" / "synthetic_copy.dcm").write_bytes(again.read_bytes())
    Daemon(daemon.settings).run(once=True)

    assert len(scans_by_id(daemon)) == 2, "a copy of a scan that did not fail is a duplicate, as ever"
    with daemon.sessions() as session:
        assert session.scalars(select(DuplicateArrival.scan_id)).all() == [new.id]


def test_a_file_that_came_through_a_task_folder_goes_back_into_it(make_settings, tmp_path: Path):
    d = Daemon(make_settings(max_wait_ms=10, reports=False))
    d.prepare()
    promote(d, write_model(tmp_path / "model"))
    write_png(d.settings.watch / "busi" / "synthetic_tiny.png", np.zeros((16, 16), np.uint8))
    d.run(once=True)
    [failed] = scans_by_id(d)
    assert (failed.failure_reason, failed.source_name) == ("contract_mismatch", "busi/synthetic_tiny.png")

    result = retry_failed(d.sessions, d.settings, Selector(scan=failed.sha256))

    assert [r.inbox_path for r in result.requeued] == [d.settings.watch / "busi" / "synthetic_tiny.png"]
    Daemon(d.settings).run(once=True)  # nothing fixed: it fails again, a second failed attempt beside the first
    first, second = scans_by_id(d)
    assert (first.state, second.state, second.failure_reason) == ("failed", "failed", "contract_mismatch")
    assert second.sha256 == first.sha256 and d.settings.stored_file(second.stored_path).is_file()


@pytest.fixture
def three_failures(daemon: Daemon) -> Daemon:
    """The unroutable DICOM, an empty file and a PNG outside the busi model's contract, all failed."""
    (daemon.settings.watch / "synthetic_empty.png").write_bytes(b"")
    write_png(daemon.settings.watch / "busi" / "synthetic_tiny.png", np.zeros((16, 16), np.uint8))
    Daemon(daemon.settings).run(once=True)
    reasons = {s.source_name: s.failure_reason for s in scans_by_id(daemon)}
    assert reasons == {
        UNROUTABLE: "unroutable",
        "synthetic_empty.png": "empty_file",
        "busi/synthetic_tiny.png": "contract_mismatch",
    }
    return daemon


def requeued_names(result: RetryResult) -> set[str]:
    return {r.source_name for r in result.requeued}


def test_reason_selects_the_failed_scans_of_that_reason_only(three_failures: Daemon):
    d = three_failures
    result = retry_failed(d.sessions, d.settings, Selector(reason="empty_file"))
    assert result.ok and requeued_names(result) == {"synthetic_empty.png"}
    assert sorted(p.name for p in d.settings.watch.rglob("*") if p.is_file()) == ["synthetic_empty.png"]


def test_all_failed_selects_every_failed_scan_not_yet_retried(three_failures: Daemon):
    d = three_failures
    retry_failed(d.sessions, d.settings, Selector(reason="unroutable"))
    with transaction(d.sessions) as session:  # a vanished scan: no file was ever kept
        add_scan(session, 99, ScanState.FAILED, failure_reason="vanished", stored_path=None, task_name=None)

    result = retry_failed(d.sessions, d.settings, Selector(all_failed=True))

    assert result.ok and requeued_names(result) == {"synthetic_empty.png", "busi/synthetic_tiny.png"}
    assert result.without_original == 1


def test_dry_run_says_what_would_go_back_and_changes_nothing(three_failures: Daemon):
    d = three_failures
    before = [(s.id, s.stored_path, s.retried_at, len(s.events)) for s in scans_by_id(d)]

    result = retry_failed(d.sessions, d.settings, Selector(all_failed=True), dry_run=True)

    assert result.ok and result.dry_run and len(result.requeued) == 3
    assert [(s.id, s.stored_path, s.retried_at, len(s.events)) for s in scans_by_id(d)] == before
    assert not [p for p in d.settings.watch.rglob("*") if p.is_file()]


def test_a_name_taken_in_the_inbox_meanwhile_is_not_overwritten(daemon: Daemon):
    [failed] = scans_by_id(daemon)
    (daemon.settings.watch / UNROUTABLE).write_bytes(b"another sender's file, same name")

    [requeued] = retry_failed(daemon.sessions, daemon.settings, Selector(scan=str(failed.id))).requeued

    assert requeued.inbox_path == daemon.settings.watch / f"synthetic_us_abdomen__retry{failed.id}.dcm"
    assert (daemon.settings.watch / UNROUTABLE).read_bytes() == b"another sender's file, same name"


def refusal(result: RetryResult) -> Refusal:
    assert not result.ok and not result.requeued
    [refused] = result.refused
    return refused.code


def test_what_cannot_be_retried_is_refused_with_a_named_reason(daemon: Daemon, make_settings):
    [failed] = scans_by_id(daemon)
    settings = make_settings(max_wait_ms=10, reports=False, default_task="busi")

    def retry(**selector: object) -> RetryResult:
        return retry_failed(daemon.sessions, settings, Selector(**selector))  # type: ignore[arg-type]

    assert refusal(retry(scan="424242")) is Refusal.UNKNOWN_SCAN
    assert refusal(retry(scan="ab" * 32)) is Refusal.UNKNOWN_SCAN
    assert refusal(retry(scan="not-a-scan")) is Refusal.UNKNOWN_SCAN
    assert refusal(retry(reason="no_such_reason")) is Refusal.UNKNOWN_REASON
    vanished = retry(reason="vanished")  # a bulk selection: what kept no file is left alone, counted
    assert vanished.ok and (vanished.requeued, vanished.refused, vanished.without_original) == ([], [], 0)

    assert retry(scan=str(failed.id)).ok
    assert refusal(retry(scan=str(failed.id))) is Refusal.ALREADY_RETRIED
    Daemon(settings).run(once=True)
    [_, new] = scans_by_id(daemon)
    assert refusal(retry(scan=str(new.id))) is Refusal.NOT_FAILED
    assert refusal(retry(scan=failed.sha256)) is Refusal.NOT_FAILED  # its latest attempt is inferred


def test_a_failed_scan_whose_kept_file_was_deleted_is_refused(daemon: Daemon):
    [failed] = scans_by_id(daemon)
    daemon.settings.stored_file(failed.stored_path).unlink()

    result = retry_failed(daemon.sessions, daemon.settings, Selector(scan=str(failed.id)))

    assert refusal(result) is Refusal.ORIGINAL_GONE
    [after] = scans_by_id(daemon)
    assert after.retried_at is None and len(after.events) == len(failed.events)


def test_a_kept_fifo_is_named_no_regular_file_not_gone(daemon: Daemon):
    """A FIFO dropped in the inbox fails as unreadable and is kept in failed/: a retry said it was
    gone, while it stayed there, with its reason, for good."""
    [failed] = scans_by_id(daemon)
    kept = daemon.settings.stored_file(failed.stored_path)
    kept.unlink()
    os.mkfifo(kept)

    result = retry_failed(daemon.sessions, daemon.settings, Selector(scan=str(failed.id)))

    assert refusal(result) is Refusal.ORIGINAL_NOT_A_FILE
    assert "is no regular file (a FIFO)" in result.refused[0].message and "remove it" in result.refused[0].message
    bulk = retry_failed(daemon.sessions, daemon.settings, Selector(all_failed=True))
    assert bulk.ok and [r.code for r in bulk.left_alone] == [Refusal.ORIGINAL_NOT_A_FILE]


def test_a_scan_another_retry_sends_back_during_a_bulk_run_is_left_alone_not_refused(
    daemon: Daemon, make_settings, monkeypatch: pytest.MonkeyPatch
):
    """Two scheduled runs (or a run and a click in the console) at once: each counted the scans the
    other had sent back since its selection as refused, and both exited 2, though every scan went
    back once."""
    from meddaemon.daemon import retry as retrying

    [failed] = scans_by_id(daemon)
    settings = make_settings(max_wait_ms=10, reports=False, default_task="busi")
    select = retrying._selected

    def another_retry_meanwhile(*args: object) -> list[int]:
        selected = select(*args)  # type: ignore[arg-type]
        monkeypatch.setattr(retrying, "_selected", select)  # the other run selects as it would
        assert retry_failed(daemon.sessions, settings, Selector(scan=str(failed.id))).ok
        return selected

    monkeypatch.setattr(retrying, "_selected", another_retry_meanwhile)
    result = retry_failed(daemon.sessions, settings, Selector(all_failed=True))

    assert result.ok and result.requeued == [] and result.refused == []
    assert [(r.code, r.scan_id) for r in result.left_alone] == [(Refusal.ALREADY_RETRIED, failed.id)]
    assert len(list(settings.watch.rglob("*.dcm"))) == 1


def test_a_kept_original_changed_by_hand_is_refused_as_not_the_file_that_failed(daemon: Daemon):
    """It was sent back as the scan's file: its new attempt was other bytes, not linked to the scan,
    and the scan's own bytes never came back (a second retry said already_retried)."""
    [failed] = scans_by_id(daemon)
    daemon.settings.stored_file(failed.stored_path).write_bytes(b"SYNTHETIC bytes edited by hand")

    result = retry_failed(daemon.sessions, daemon.settings, Selector(scan=str(failed.id)))

    assert refusal(result) is Refusal.ORIGINAL_CHANGED and "has changed since it failed" in result.refused[0].message
    [after] = scans_by_id(daemon)
    assert after.retried_at is None and list(daemon.settings.watch.rglob("*.dcm")) == []


def test_a_scan_that_failed_as_changed_after_registration_goes_back_with_the_bytes_it_failed_for(
    migrated_engine, sessions, make_settings
):
    """Its kept file differs from its recorded SHA-256 by its very failure: the first check of the
    kept original refused every such scan as original_changed."""
    settings = make_settings(db=str(migrated_engine.url.render_as_string(hide_password=False)))
    kept = settings.failed_dir / "busi" / "synthetic_rewritten.png"
    scan_id = kept_failure(sessions, settings, kept, b"SYNTHETIC bytes rewritten after registration")

    result = retry_failed(sessions, settings, Selector(reason="changed_after_registration"))

    assert result.ok and [r.scan_id for r in result.requeued] == [scan_id]
    assert (settings.watch / "busi" / "synthetic_1.png").read_bytes() == b"SYNTHETIC bytes rewritten after registration"


def test_a_retry_killed_after_its_commit_is_finished_by_the_next_one(daemon: Daemon):
    """Killed between marking the scan retried and removing its original, it left the file and its
    reason file in failed/ for good, named by no row. The row keeps naming the file until it is gone."""
    [failed] = scans_by_id(daemon)
    original = daemon.settings.stored_file(failed.stored_path)
    assert filing.reason_path(original).is_file()
    with transaction(daemon.sessions) as session:  # what a retry killed after its commit leaves
        session.get(Scan, failed.id).retried_at = utcnow()

    result = retry_failed(daemon.sessions, daemon.settings, Selector(all_failed=True))

    assert result.ok and result.requeued == []
    assert not original.exists() and not filing.reason_path(original).exists()
    [after] = scans_by_id(daemon)
    assert after.stored_path is None and after.retried_at is not None


def test_an_original_this_user_may_not_remove_stays_for_the_next_retry_and_blocks_nothing(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
):
    """failed/ is the daemon's (0750): a retry by a user who may read it but not remove from it raised
    after the copy had gone back, and every later retry raised on the same file. (EPERM injected:
    the tests run as root, whom no permission stops.)"""
    import errno
    import os

    [failed] = scans_by_id(daemon)
    original = daemon.settings.stored_file(failed.stored_path)
    real_unlink = os.unlink

    def not_permitted(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).is_relative_to(daemon.settings.failed_dir):
            raise PermissionError(errno.EPERM, "Operation not permitted (injected)", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", not_permitted)
    [sent] = retry_failed(daemon.sessions, daemon.settings, Selector(scan=str(failed.id))).requeued
    assert sent.inbox_path.is_file() and original.is_file()
    assert sent.left_in_failed is not None and "Operation not permitted (injected)" in sent.left_in_failed
    assert retry_failed(daemon.sessions, daemon.settings, Selector(all_failed=True)).ok  # nothing else blocked
    monkeypatch.undo()
    retry_failed(daemon.sessions, daemon.settings, Selector(all_failed=True))
    assert not original.exists() and not filing.reason_path(original).exists()
    assert scans_by_id(daemon)[0].stored_path is None


def test_a_file_named_like_the_scan_s_task_folder_is_a_refusal_that_names_it_dry_run_or_not(
    make_settings, tmp_path: Path
):
    """The dry run said it would send the scan back; the retry then tried 100 names under a folder
    that is a file, and said all 100 were taken."""
    settings = make_settings(reports=False)
    d = Daemon(settings)
    d.prepare()
    (settings.watch / "busi").mkdir(parents=True)
    (settings.watch / "busi" / "synthetic_bad.png").write_bytes(b"SYNTHETIC, not an image")
    d.run(once=True)
    [failed] = scans_by_id(d)
    (settings.watch / "busi").rmdir()
    (settings.watch / "busi").write_bytes(b"a file named like the task folder")
    for dry_run in (True, False):
        result = retry_failed(d.sessions, settings, Selector(scan=str(failed.id)), dry_run=dry_run)
        [refused] = result.refused
        assert refused.code is Refusal.INBOX_UNWRITABLE
        assert f"{settings.watch / 'busi'} is not a folder" in refused.message


def test_a_scan_that_failed_as_a_symbolic_link_is_refused_and_nothing_it_points_to_is_copied(
    make_settings, tmp_path: Path
):
    """Its kept original is the link itself: copied back into the inbox, the file it pointed to (here
    a SYNTHETIC secret outside the inbox; /etc/passwd in the review) was read into the state directory."""
    d = Daemon(make_settings(reports=False))
    d.prepare()
    secret = tmp_path / "elsewhere" / "synthetic_secret.txt"
    secret.parent.mkdir()
    secret.write_text("SYNTHETIC secret, outside the inbox")
    (d.settings.watch / "busi").mkdir(parents=True)
    (d.settings.watch / "busi" / "link.png").symlink_to(secret)
    d.run(once=True)
    [failed] = scans_by_id(d)
    assert failed.failure_reason == "symlink_not_followed"

    result = retry_failed(d.sessions, d.settings, Selector(scan=str(failed.id)))

    assert refusal(result) is Refusal.ORIGINAL_IS_A_LINK
    assert list(d.settings.watch.rglob("*.png")) == []
    [after] = scans_by_id(d)
    assert after.retried_at is None


def test_a_missing_watch_folder_is_refused_not_created(daemon: Daemon, make_settings, tmp_path: Path):
    [failed] = scans_by_id(daemon)
    unmounted = make_settings(watch=tmp_path / "unmounted_share")

    result = retry_failed(daemon.sessions, unmounted, Selector(scan=str(failed.id)))

    assert refusal(result) is Refusal.INBOX_MISSING
    assert not (tmp_path / "unmounted_share").exists() and daemon.settings.stored_file(failed.stored_path).is_file()


def test_two_retries_of_one_scan_at_once_send_it_back_once(migrated_engine, sessions, make_settings, tmp_path: Path):
    settings = make_settings(db=str(migrated_engine.url.render_as_string(hide_password=False)))
    kept = settings.failed_dir / "busi" / "synthetic_race.png"
    data = b"SYNTHETIC bytes of a failed scan"
    scan_id = kept_failure(sessions, settings, kept, data, "unroutable", hashlib.sha256(data).hexdigest())
    start = threading.Barrier(2)
    results: list[RetryResult] = []

    def retry() -> None:
        start.wait()
        results.append(retry_failed(sessions, settings, Selector(scan=str(scan_id))))

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert sorted(len(r.requeued) for r in results) == [0, 1]
    assert [refusal(r) for r in results if not r.ok] == [Refusal.ALREADY_RETRIED]
    assert [p.name for p in settings.watch.rglob("*") if p.is_file()] == ["synthetic_1.png"]
