"""Reports on disk: whole or not at all, even when the disk refuses the write."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from sqlalchemy import func, select

from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import Report
from meddaemon.files import temporary_path
from meddaemon.report.output import record_report, write_pdf


def test_a_write_the_file_size_limit_stops_leaves_no_partial_file(tmp_path: Path):
    # RLIMIT_FSIZE makes the kernel refuse the write past 4 KiB with EFBIG: a real OSError mid-file
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from meddaemon.report.output import write_pdf
        try:
            write_pdf(Path({str(tmp_path / "r" / "x.pdf")!r}), b"%PDF" + b"0" * 100_000)
        except OSError as exc:
            print("refused", exc.errno)
            sys.exit(0)
        sys.exit(1)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused 27")  # EFBIG
    assert list((tmp_path / "r").iterdir()) == []  # neither the PDF nor its temporary


def test_a_disk_full_error_removes_the_temporary(tmp_path: Path):
    target = tmp_path / "y.pdf"
    temporary_path(target).symlink_to("/dev/full")  # writes there fail with ENOSPC
    try:
        write_pdf(target, b"%PDF-1.4 data")
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("the write to /dev/full succeeded")
    assert list(tmp_path.iterdir()) == []


def test_a_written_report_replaces_the_old_one_whole_and_returns_its_hash(tmp_path: Path):
    target = tmp_path / "a" / "b.pdf"
    write_pdf(target, b"old")
    digest = write_pdf(target, b"new")
    assert target.read_bytes() == b"new"
    assert digest == "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd85c67c9b8431b36fff21c437"
    assert [p.name for p in target.parent.iterdir()] == ["b.pdf"]


def test_writing_the_same_report_again_updates_its_row(migrated_engine, tmp_path: Path):
    sessions = session_factory(migrated_engine)
    for digest in ("a" * 64, "b" * 64):
        with transaction(sessions) as session:
            record_report(
                session,
                kind="summary",
                path=tmp_path / "s.pdf",
                state_dir=tmp_path,
                sha256=digest,
                size=10,
                pages=1,
                with_phi=False,
            )
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 1
        assert session.scalar(select(Report.sha256)) == "b" * 64


def test_a_report_row_names_its_file_relative_to_the_state_dir_or_absolute_outside_it(migrated_engine, tmp_path: Path):
    sessions = session_factory(migrated_engine)
    state = tmp_path / "state"
    old = state / "reports" / "summaries" / "old.pdf"
    with transaction(sessions) as session:
        session.add(Report(kind="summary", path=str(old), sha256="a" * 64, size_bytes=1, pages=1, with_phi=False))
    with transaction(sessions) as session:
        for digest, path in (("b", old), ("c", state / "reports" / "summaries" / "new.pdf"), ("d", tmp_path / "x.pdf")):
            record_report(
                session, kind="summary", path=path, state_dir=state, sha256=digest * 64, size=1, pages=1, with_phi=False
            )
    with sessions() as session:
        rows = {r.sha256[0]: r.path for r in session.scalars(select(Report))}
    assert rows == {"b": str(old), "c": "reports/summaries/new.pdf", "d": str(tmp_path / "x.pdf")}
