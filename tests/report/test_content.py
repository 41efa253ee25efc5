"""Which scan a report is asked for: by id, SHA-256 or a prefix of it."""

from __future__ import annotations

from daemon_rows import add_scan
from meddaemon.daemon import bookkeeper
from meddaemon.db.engine import session_factory, transaction
from meddaemon.engine.tasks import all_tasks
from meddaemon.report.content import find_scan
from meddaemon.states import ScanState


def test_a_hash_with_a_failed_attempt_and_a_new_one_finds_the_new_one(migrated_engine):
    sessions = session_factory(migrated_engine)
    sha = "cd" * 32
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        failed = add_scan(session, 1, ScanState.FAILED, sha256=sha, stored_path=None).id
        new = add_scan(session, 2, ScanState.INFERRED, sha256=sha).id
    with sessions() as session:
        assert [find_scan(session, key).id for key in (sha, sha[:8], str(failed))] == [new, new, failed]


def test_a_prefix_of_digits_only_is_a_prefix_when_no_scan_has_that_id(migrated_engine):
    sessions = session_factory(migrated_engine)
    sha = "7597604971" + "ab" * 27
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        scan = add_scan(session, 1, ScanState.INFERRED, sha256=sha).id
    with sessions() as session:
        assert find_scan(session, sha[:10]).id == scan
        assert find_scan(session, sha[:8]).id == scan
        assert find_scan(session, str(scan)).id == scan
        assert find_scan(session, "1234567") is None
        assert find_scan(session, "9" * 11) is None  # past an INTEGER key: no id, and no such prefix
