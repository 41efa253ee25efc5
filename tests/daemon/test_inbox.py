"""Which names in the inbox are scans to read, and which wait or are never ours."""

import os
from pathlib import Path

import pytest

from meddaemon.daemon.inbox import Inbox

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


def test_scan_walks_subfolders_even_one_named_like_a_file(inbox: Inbox):
    (inbox.root / "x.dcm").mkdir()
    (inbox.root / "x.dcm" / "inside.dcm").write_bytes(b"synthetic")
    (inbox.root / "a" / "b").mkdir(parents=True)
    (inbox.root / "a" / "b" / "deep.png").write_bytes(b"synthetic")
    (inbox.root / "wait.part").write_bytes(b"synthetic")
    found = {p.relative_to(inbox.root).as_posix() for p in inbox.scan()}
    assert found == {"x.dcm/inside.dcm", "a/b/deep.png"}


def test_scan_yields_symlinks_but_never_walks_into_linked_folders(inbox: Inbox, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"synthetic")
    os.symlink(outside, inbox.root / "linked_folder")
    os.symlink(outside / "secret.png", inbox.root / "link.png")
    found = {p.relative_to(inbox.root).as_posix() for p in inbox.scan()}
    assert found == {"link.png", "linked_folder"}
