"""Which names in the inbox are scans to read, and which wait or are never ours."""

import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from contextlib import closing
from pathlib import Path, PurePosixPath

import pytest

from daemon_harness import (
    MEDDAEMON,
    TASK,
    Daemons,
    Layout,
    daemon_env,
    drop,
    files_under,
    one,
    scrape,
    synthetic_png,
    wait_until,
)
from descriptors import out_of_descriptors
from meddaemon.daemon.inbox import Inbox, rename_to_utf8
from permissions import held_to_file_modes, unlistable
from ports import free_port

IGNORE = ("*.part", "*.tmp")


@pytest.fixture
def inbox(tmp_path: Path) -> Inbox:
    (tmp_path / "inbox").mkdir()
    return Inbox(tmp_path / "inbox", IGNORE, exclude=[tmp_path / "inbox" / "state"])


@pytest.mark.parametrize(
    ("name", "candidate"),
    [
        ("scan.png", True),
        ("busi/benign (1).png", True),
        ("with space ünïcødé.dcm", True),
        ("line\nbreak.png", True),
        ("scan.png.part", False),
        ("scan.tmp", False),
        (".scan.png.Xy12Ab", False),  # rsync's temporary name
        (".hidden/scan.png", False),
        ("state/meddaemon.db", False),  # the daemon's own state inside the inbox
    ],
)
def test_candidate_names(inbox: Inbox, name: str, candidate: bool):
    assert inbox.is_candidate(inbox.root / name) is candidate


def test_paths_outside_the_inbox_are_never_candidates(inbox: Inbox, tmp_path: Path):
    assert not inbox.is_candidate(tmp_path / "elsewhere.png")
    assert not inbox.is_candidate(inbox.root)


def test_renaming_to_utf8_renames_each_part_that_is_not_and_never_replaces_a_file(tmp_path: Path):
    root = tmp_path / "inbox"
    folder = Path(os.fsdecode(os.fsencode(root / "busi") + b"/lot\xff"))
    folder.mkdir(parents=True)
    (folder / "synthetic.png").write_bytes(b"synthetic a")
    name = PurePosixPath(os.fsdecode(b"busi/lot\xff/synthetic.png"))
    assert rename_to_utf8(root, name) == PurePosixPath("busi/lot%FF/synthetic.png")
    latin1_name = PurePosixPath(os.fsdecode(b"busi/sc\xe9n.png"))
    given = []
    for content in (b"synthetic b", b"synthetic c", b"synthetic d"):  # the name taken: ~1, ~2 before the extension
        (root / latin1_name).write_bytes(content)
        given.append(rename_to_utf8(root, latin1_name))
    assert [str(name) for name in given] == ["busi/sc%E9n.png", "busi/sc%E9n~1.png", "busi/sc%E9n~2.png"]
    assert [(root / name).read_bytes() for name in given] == [b"synthetic b", b"synthetic c", b"synthetic d"]
    long_latin1 = PurePosixPath(os.fsdecode(b"busi/" + b"\xe9" * 200 + b".png"))  # %E9: three bytes for one
    (root / long_latin1).write_bytes(b"synthetic e")
    cut = rename_to_utf8(root, long_latin1)
    assert cut.name.startswith("%E9%E9") and cut.name.endswith(".png") and len(cut.name.encode()) == 255
    assert (root / cut).read_bytes() == b"synthetic e"
    with pytest.raises(FileNotFoundError):
        rename_to_utf8(root, PurePosixPath(os.fsdecode(b"busi/gone\xe9.png")))


def test_scan_walks_subfolders_even_one_named_like_a_file(inbox: Inbox):
    (inbox.root / "x.dcm").mkdir()
    (inbox.root / "x.dcm" / "inside.dcm").write_bytes(b"synthetic")
    (inbox.root / "a" / "b").mkdir(parents=True)
    (inbox.root / "a" / "b" / "deep.png").write_bytes(b"synthetic")
    (inbox.root / "wait.part").write_bytes(b"synthetic")
    found = {p.relative_to(inbox.root).as_posix() for p in inbox.scan()}
    assert found == {"x.dcm/inside.dcm", "a/b/deep.png"}


def test_a_watch_folder_gone_is_an_unlisted_folder_not_an_empty_inbox_and_is_relisted_when_back(inbox: Inbox):
    """Removed (or its share unmounted) while the daemon ran, it was an empty inbox without a word:
    nothing in `meddaemon status`, nothing in the metrics."""
    import shutil

    shutil.rmtree(inbox.root)
    assert list(inbox.scan()) == []
    assert inbox.unlisted == {PurePosixPath("."): "the watch folder is gone: removed, or its share unmounted"}
    inbox.root.mkdir()
    (inbox.root / "synthetic.png").write_bytes(b"synthetic")
    assert [p.name for p in inbox.scan()] == ["synthetic.png"]
    assert inbox.unlisted == {} and inbox.relisted == {PurePosixPath(".")}


def test_scan_yields_symlinks_but_never_walks_into_linked_folders(inbox: Inbox, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"synthetic")
    os.symlink(outside, inbox.root / "linked_folder")
    os.symlink(outside / "secret.png", inbox.root / "link.png")
    found = {p.relative_to(inbox.root).as_posix() for p in inbox.scan()}
    assert found == {"link.png", "linked_folder"}


def test_a_file_name_holding_a_line_break_or_a_terminal_escape_cannot_forge_a_log_line(daemons: Daemons):
    """A name may hold any byte but '/' and NUL: the daemon's log (the journal splits it at line
    breaks) shows such a name on its record's one line, escaped: no line is forged; ``medcli scans``
    shows it so too."""
    forged = "forged\n2026-12-04 00:00:00,000 INFO    meddaemon.daemon: busi/x.png -> archived \x1b[2J.png"
    drop(daemons.layout.inbox, f"{TASK}/{forged}", synthetic_png(daemons.layout.root, 3), rename=False)
    text = daemons.run_once().log_text()
    escaped = forged.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert f"{TASK}/{escaped} (sha256" in text
    assert not any(line.startswith("2026-12-04 00:00:00,000") for line in text.splitlines()), text
    assert "\x1b" not in text
    medcli = [str(MEDDAEMON.with_name("medcli")), "scans", "--state-dir", str(daemons.layout.state)]
    listed = subprocess.run(medcli, capture_output=True, text=True, env=daemon_env(), check=True).stdout
    assert f"{TASK}/{escaped}" in listed and "\x1b" not in listed and len(listed.splitlines()) == 1


def test_a_folder_the_daemon_cannot_list_is_named_once_and_its_files_are_read_once_it_can(daemons: Daemons):
    """A folder whose permissions keep the daemon's user out: a warning naming it at the first scan
    that meets it (not at every rescan), the files around it processed, and its own files read as soon
    as a rescan can list it."""
    inbox = daemons.layout.inbox
    drop(inbox, f"{TASK}/beside.png", synthetic_png(daemons.layout.root, 1), rename=False)
    drop(inbox, f"{TASK}/locked/inside.png", synthetic_png(daemons.layout.root, 2), rename=False)
    warning = f"cannot list inbox folder {TASK}/locked (Permission denied): its files wait there, unread"
    port = free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    with unlistable(inbox / TASK / "locked"):
        daemon = daemons.start(
            stable=0.3, rescan=0.5, wrap=held_to_file_modes, env={"MEDDAEMON_METRICS_PORT": str(port)}
        )
        wait_until(lambda: f"{TASK}/beside.png (sha256" in daemon.log_text(), 60, "the readable file", daemon)
        wait_until(lambda: warning in daemon.log_text(), 10, "the warning", daemon)
        assert json.loads(status_output(daemons.layout, "--json"))["extra"]["inbox_unlisted"] == {
            f"{TASK}/locked": "Permission denied"
        }
        assert f"cannot list inbox folder {TASK}/locked (Permission denied): its files are not counted" in (
            status_output(daemons.layout)
        )
        assert one(scrape(metrics), "meddaemon_inbox_unlisted_folders") == 1
        time.sleep(2.0)  # four rescans more
        assert daemon.log_text().count(warning) == 1
        assert "inside.png" not in daemon.log_text()
    relisted = f"inbox folder {TASK}/locked can be listed again"
    wait_until(lambda: relisted in daemon.log_text(), 10, "the recovery", daemon)
    wait_until(lambda: f"{TASK}/locked/inside.png (sha256" in daemon.log_text(), 30, "the file inside", daemon)
    assert one(scrape(metrics), "meddaemon_inbox_unlisted_folders") == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert files_under(inbox) == []


@pytest.mark.parametrize("beside", [True, False], ids=["a file beside it", "nothing else"])
def test_a_once_run_that_could_not_list_a_folder_is_not_drained_names_it_and_exits_1(daemons: Daemons, beside: bool):
    """Its JSON said ``"drained": true``, exit 0, while the folder's files waited unread: a script
    took the inbox for empty. The folder is named in the log: its first look at the inbox (whether
    to start workers) met it first, and the warning, kept for a folder new to the scan, never came."""
    inbox = daemons.layout.inbox
    if beside:
        drop(inbox, f"{TASK}/beside.png", synthetic_png(daemons.layout.root, 1), rename=False)
    drop(inbox, f"{TASK}/locked/inside.png", synthetic_png(daemons.layout.root, 2), rename=False)
    with unlistable(inbox / TASK / "locked"):
        daemon = daemons.start(once=True, extra=("--json",), wrap=held_to_file_modes)
        assert daemon.wait(90) == 1, daemon.tail()
    text = daemon.log_text()
    summary = json.loads(text[text.index("\n{\n") : text.rindex("\n}") + 2])  # stdout's, amid the log
    assert (summary["routed"], summary["drained"], summary["unlisted"], summary["held"]) == (int(beside), False, 1, 0)
    assert "error: 1 inbox folders could not be listed (each named in the log): their files were not read" in text
    assert text.count(f"cannot list inbox folder {TASK}/locked (Permission denied): its files wait there") == 1
    assert "stopped before" not in text
    assert files_under(inbox) == [inbox / TASK / "locked" / "inside.png"]


def test_lost_and_found_at_the_root_of_an_inbox_that_is_a_mount_point_is_never_read(daemons: Daemons):
    """Root's alone to list: every ``--once`` of the daemon's user said the inbox was not drained."""
    inbox = daemons.layout.inbox
    drop(inbox, f"{TASK}/scan.png", synthetic_png(daemons.layout.root, 1), rename=False)
    drop(inbox, "lost+found/#1234", b"SYNTHETIC fsck fragment", rename=False)
    with unlistable(inbox / "lost+found"):
        daemon = daemons.start(once=True, extra=("--json",), wrap=held_to_file_modes)
        assert daemon.wait(90) == 0, daemon.tail()
    text = daemon.log_text()
    summary = json.loads(text[text.index("\n{\n") : text.rindex("\n}") + 2])
    assert (summary["routed"], summary["drained"], summary["unlisted"]) == (1, True, 0)
    assert "lost+found" not in text


def test_a_folder_listed_but_not_searchable_is_named_and_never_stops_the_daemon(daemons: Daemons):
    """A folder that can be listed but not entered (mode 0444): the daemon saw its files' names and
    died on looking at them, at start (every restart the same) and when a folder was locked while a
    file in it waited out its window. Its files wait, named once; they are read once it can."""
    inbox = daemons.layout.inbox
    drop(inbox, f"{TASK}/beside.png", synthetic_png(daemons.layout.root, 1), rename=False)
    drop(inbox, f"{TASK}/listed/inside.png", synthetic_png(daemons.layout.root, 2), rename=False)
    (inbox / TASK / "later").mkdir()
    (inbox / TASK / "listed").chmod(0o444)
    try:
        daemon = daemons.start(stable=1.5, rescan=0.5, wrap=held_to_file_modes)
        wait_until(lambda: f"{TASK}/beside.png (sha256" in daemon.log_text(), 60, "the readable file", daemon)
        warning = f"cannot list inbox folder {TASK}/listed (Permission denied"
        wait_until(lambda: warning in daemon.log_text(), 10, "the warning", daemon)
        (inbox / TASK / "later" / "waiting.png").write_bytes(synthetic_png(daemons.layout.root, 3))
        time.sleep(0.3)  # seen, its window not yet passed
        (inbox / TASK / "later").chmod(0o000)
        time.sleep(3.0)
        drop(inbox, f"{TASK}/next.png", synthetic_png(daemons.layout.root, 4), rename=True)
        wait_until(lambda: f"{TASK}/next.png (sha256" in daemon.log_text(), 30, "a file dropped after", daemon)
        assert daemon.log_text().count(warning) == 1
    finally:
        (inbox / TASK / "listed").chmod(0o755)
        (inbox / TASK / "later").chmod(0o755)
    for name in ("listed/inside.png", "later/waiting.png"):
        wait_until(lambda: f"{TASK}/{name} (sha256" in daemon.log_text(), 30, name, daemon)  # noqa: B023
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert files_under(inbox) == []


def test_a_folder_replaced_by_a_link_while_its_file_waits_is_not_followed_and_its_target_is_left_alone(
    daemons: Daemons,
):
    """The rescan never walks into a linked folder, but a folder replaced by a link while one of its
    files waited out its stability window left that file's path naming the link target's file of
    the same name, outside the inbox: it was read, registered and moved into work/."""
    root = daemons.layout.root
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "a.png"
    outside.write_bytes(synthetic_png(root, 1))
    daemon = daemons.start(stable=2.0, rescan=60.0)
    daemon.wait_ready()
    drop(daemons.layout.inbox, f"{TASK}/sub/a.png", synthetic_png(root, 2), rename=False)
    time.sleep(0.5)  # seen, its window not yet passed
    folder = daemons.layout.inbox / TASK / "sub"
    folder.rename(root / "sub.moved")
    folder.symlink_to(elsewhere)
    said = f"{TASK}/sub/a.png: its folder {TASK}/sub/ is now a symbolic link, which the inbox does not follow"
    wait_until(lambda: said in daemon.log_text(), 30, "the file left alone", daemon)
    drop(daemons.layout.inbox, f"{TASK}/next.png", synthetic_png(root, 3), rename=True)
    wait_until(lambda: f"{TASK}/next.png (sha256" in daemon.log_text(), 30, "a file dropped after", daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert outside.read_bytes() == synthetic_png(root, 1)
    assert f"{TASK}/sub/a.png (sha256" not in daemon.log_text()


def status_output(layout: Layout, *options: str) -> str:
    command = [str(MEDDAEMON), "status", "--watch", str(layout.inbox), "--state-dir", str(layout.state), *options]
    done = subprocess.run(held_to_file_modes(command), capture_output=True, text=True, env=daemon_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_inbox_that_cannot_be_listed_is_refused_at_start_and_named_when_it_becomes_so_later(daemons: Daemons):
    inbox = daemons.layout.inbox
    once = [str(MEDDAEMON), "start", "--once", "--watch", str(inbox), "--state-dir", str(daemons.layout.state)]
    with unlistable(inbox):
        refused = subprocess.run(held_to_file_modes(once), capture_output=True, text=True, env=daemon_env())
    assert refused.returncode == 2 and "is not readable" in refused.stderr, refused.stderr

    daemon = daemons.start(stable=0.3, rescan=0.5, wrap=held_to_file_modes)
    daemon.wait_ready()
    with unlistable(inbox):
        warning = "cannot list the inbox folder itself (Permission denied): its files wait there, unread"
        wait_until(lambda: warning in daemon.log_text(), 10, "the warning", daemon)
    wait_until(lambda: "the inbox folder itself can be listed again" in daemon.log_text(), 10, "the recovery", daemon)
    drop(inbox, f"{TASK}/after.png", synthetic_png(daemons.layout.root, 3), rename=True)
    wait_until(lambda: f"{TASK}/after.png (sha256" in daemon.log_text(), 30, "a file dropped after", daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def test_what_the_daemon_writes_is_kept_from_other_users_whatever_the_umask_it_is_started_with(daemons: Daemons):
    """Started by hand or in Docker (umask 022), the state folder was 0755 and the database, its
    folders and the reason files 0644: any user of the host could read a patient's name. The daemon
    takes away the others' bits (systemd's unit sets UMask=0027 as well). A scan moved in from the
    inbox keeps its producer's mode, in folders the others cannot enter."""
    inbox = daemons.layout.inbox
    drop(inbox, f"{TASK}/scan.png", synthetic_png(daemons.layout.root, 5), rename=False)
    drop(inbox, f"{TASK}/empty.png", b"", rename=False)
    state = daemons.layout.root / "new_state"
    umask_022 = ["sh", "-c", 'umask 022; exec "$@"', "sh"]
    daemons.run_once(extra=("--state-dir", str(state)), wrap=lambda cmd: [*umask_022, *cmd])
    written = [state, *(p for p in state.rglob("*") if p.is_dir() or not p.name.endswith(".png"))]
    assert (state / "meddaemon.db") in written and (state / "failed" / TASK / "empty.png.reason.json") in written
    exposed = [
        f"{p.relative_to(state)} {stat.S_IMODE(p.stat().st_mode):o}" for p in written if p.stat().st_mode & 0o007
    ]
    assert exposed == []


def test_files_that_cannot_be_opened_while_the_host_is_out_of_descriptors_wait_and_are_read_after(daemons: Daemons):
    """EMFILE is the host's trouble, not the file's: good scans were failed for good, ``unreadable``
    ("Too many open files"), and stayed failed once descriptors were free again."""
    daemon = daemons.start(stable=0.3, rescan=1.0)
    inbox = daemons.layout.inbox
    drop(inbox, f"{TASK}/warm_up.png", synthetic_png(daemons.layout.root, 19), rename=True)  # decoders imported
    wait_until(lambda: daemon.log_text().count("-> waiting_model") == 1, 60, "the warm-up file", daemon)
    with out_of_descriptors(daemon.pid):
        for i in range(3):
            drop(inbox, f"{TASK}/scan_{i}.png", synthetic_png(daemons.layout.root, 20 + i), rename=True)
        waits = "Too many open files; it is read again later"
        wait_until(lambda: daemon.log_text().count(waits) >= 3, 30, "the files to wait", daemon)
    wait_until(lambda: daemon.log_text().count("-> waiting_model") == 4, 60, "the files read after", daemon)
    with closing(sqlite3.connect(daemons.layout.db)) as db:
        assert sorted(state for (state,) in db.execute("SELECT state FROM scans")) == ["waiting_model"] * 4
    # a file's line is logged as its row is committed, before its move: the moves follow
    wait_until(lambda: not list(daemons.layout.inbox.rglob("*.png")), 30, "the files moved out", daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
