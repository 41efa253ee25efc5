"""The outage guard: a database that stops answering is waited out, with backoff, logged once per
change of state, and given up on only past ``db_outage_seconds``. Time is injected (a fake clock
that the guard's own sleeps advance); the errors are real ones from SQLite and PostgreSQL drivers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from meddaemon.daemon.outage import BACKOFF_MAX, DatabaseUnavailable, OutageGuard, is_outage
from meddaemon.db.engine import create_db_engine, session_factory, transaction


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def refused() -> OperationalError:
    """What psycopg raises, wrapped, when the server refuses the connection."""
    return OperationalError(
        "SELECT 1", {}, Exception('connection to server at "127.0.0.1", port 1 failed: Connection refused')
    )


def failing(times: int, error: Exception | None = None):  # type: ignore[no-untyped-def]
    """Work that fails ``times`` times, then answers 42."""
    calls = {"n": 0}

    def work() -> int:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error or refused()
        return 42

    return work, calls


def guard(fake: FakeTime, limit: float = 120.0, **kw) -> OutageGuard:  # type: ignore[no-untyped-def]
    return OutageGuard(limit, clock=fake.clock, sleep=fake.sleep, jitter=lambda: 1.0, **kw)


def test_an_outage_is_waited_out_and_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    fake = FakeTime()
    changes: list[bool] = []
    g = guard(fake, on_change=changes.append)
    work, calls = failing(8)
    with caplog.at_level(logging.INFO, logger="meddaemon.daemon"):
        assert g.run(work) == 42
    assert calls["n"] == 9
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("database unreachable: connection to server")
    assert messages[0].endswith("retrying for up to 120 s (db_outage_seconds)")
    assert messages[1] == f"database back after {sum(fake.sleeps):.1f} s"
    assert changes == [False, True]
    assert g.up and g.down_for() == 0.0


def test_retries_back_off_exponentially_up_to_a_cap():
    fake = FakeTime()
    g = guard(fake)
    work, _ = failing(10)
    g.run(work)
    assert fake.sleeps[:5] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert fake.sleeps[5:] == [BACKOFF_MAX] * 5


def test_jitter_shortens_a_wait_to_between_half_and_all_of_it():
    fake = FakeTime()
    g = OutageGuard(120, clock=fake.clock, sleep=fake.sleep, jitter=lambda: 0.0)
    g.failed(refused())
    assert [g.delay(n) for n in (1, 4, 20)] == [0.125, 1.0, BACKOFF_MAX / 2]


def test_past_db_outage_seconds_it_gives_up_with_one_message_naming_the_limit():
    fake = FakeTime()
    g = guard(fake, limit=15)
    work, calls = failing(10_000)
    with pytest.raises(DatabaseUnavailable) as raised:
        g.run(work)
    assert sum(fake.sleeps) == pytest.approx(15.0), "no wait runs past the limit"
    assert str(raised.value).startswith(
        "the database has been unreachable for 15 s, longer than db_outage_seconds (15 s): connection to server"
    )
    assert "\n" not in str(raised.value)
    assert calls["n"] == len(fake.sleeps) + 1


def test_zero_seconds_gives_up_at_the_first_failure():
    fake = FakeTime()
    work, calls = failing(1)
    with pytest.raises(DatabaseUnavailable):
        guard(fake, limit=0).run(work)
    assert calls["n"] == 1 and fake.sleeps == []


@pytest.mark.parametrize(
    "error",
    [
        IntegrityError("INSERT", {}, Exception("duplicate key value violates unique constraint")),
        OperationalError("UPDATE", {}, Exception("database is locked")),
        OperationalError("UPDATE", {}, Exception("deadlock detected")),
        ValueError("not a database error"),
    ],
)
def test_errors_a_retry_would_not_cure_pass_straight_through(error):
    fake = FakeTime()
    g = guard(fake)
    work, calls = failing(1, error)
    with pytest.raises(type(error)):
        g.run(work)
    assert calls["n"] == 1 and g.up and fake.sleeps == []


def test_a_stop_requested_during_an_outage_ends_the_wait_with_the_error():
    fake = FakeTime()
    work, calls = failing(100)
    with pytest.raises(OperationalError):
        guard(fake).run(work, should_stop=lambda: True)
    assert calls["n"] == 1


def test_the_loop_is_kept_alive_between_tries():
    fake = FakeTime()
    beats: list[float] = []
    g = guard(fake, while_waiting=lambda: beats.append(fake.now))
    work, _ = failing(3)
    g.run(work)
    assert len(beats) == 3


def test_another_thread_seeing_the_outage_starts_the_clock_and_the_next_answer_ends_it(caplog):
    fake = FakeTime()
    g = guard(fake, limit=10)
    with caplog.at_level(logging.INFO, logger="meddaemon.daemon"):
        g.failed(refused())  # the heartbeat thread's beat failed
        fake.now += 8
        g.failed(refused())  # and the next
        assert not g.up and g.down_for() == 8
        work, _ = failing(10_000)
        with pytest.raises(DatabaseUnavailable, match="unreachable for 10 s"):
            g.run(work)  # the main loop's transaction: only 2 s left of the 10
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["database unreachable"]
    g.succeeded()
    assert g.up


def test_a_sqlite_database_that_cannot_be_opened_is_an_outage_until_it_can(tmp_path: Path):
    """A real one: the database's folder is missing (an unmounted share), then comes back."""
    folder = tmp_path / "share"
    engine = create_db_engine(f"sqlite:///{folder / 'meddaemon.db'}")
    folder.rmdir()  # create_db_engine made it
    sessions = session_factory(engine)
    fake = FakeTime()

    def mount_after_three_waits(seconds: float) -> None:
        fake.sleep(seconds)
        if len(fake.sleeps) == 3:
            folder.mkdir()

    g = OutageGuard(120, clock=fake.clock, sleep=mount_after_three_waits)

    def work() -> int:
        with transaction(sessions) as session:
            return int(session.execute(text("SELECT 1")).scalar_one())

    with pytest.raises(OperationalError) as raised:
        work()
    assert is_outage(raised.value)
    assert g.run(work) == 1
    assert len(fake.sleeps) == 3 and g.up
    engine.dispose()


@pytest.mark.postgres
def test_a_postgresql_server_that_refuses_connections_is_an_outage(postgres_url: str):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(port=1)  # nothing listens there
    engine = create_db_engine(url.render_as_string(hide_password=False))
    with pytest.raises(OperationalError) as raised, engine.connect():
        pass
    assert is_outage(raised.value)
    engine.dispose()


def test_a_sqlite_database_that_cannot_be_written_is_named_so_not_unreachable(tmp_path: Path, caplog):
    """A full state directory was logged "database unreachable", and the daemon gave up saying the
    database had been unreachable: SQLite's own error (SQLITE_FULL, here from a page limit) is what
    the guard says, and it still waits for room as for any outage."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'small.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x BLOB)"))

    def write() -> None:
        with engine.begin() as connection:
            connection.execute(text("PRAGMA max_page_count = 8"))
            connection.execute(text("INSERT INTO t VALUES (zeroblob(100000))"))

    with pytest.raises(OperationalError) as full:
        write()
    fake = FakeTime()
    with caplog.at_level(logging.ERROR, logger="meddaemon.daemon"), pytest.raises(DatabaseUnavailable) as gave_up:
        guard(fake, limit=10).run(write)
    assert is_outage(full.value)
    assert caplog.records[0].getMessage().startswith("database unwritable (disk full): database or disk is full")
    assert str(gave_up.value).startswith("the database has been unwritable (disk full) for 10 s")
    engine.dispose()


def test_an_unwritable_database_is_back_only_once_a_write_goes_through_not_at_a_read(tmp_path: Path, caplog):
    """The daemon's loop reads on a SQLite file that takes no write: each read ended the outage its
    heartbeat's write had begun ("database back after 0.0 s" every beat), and the clock towards the
    limit started again. A write reported ends it; past the limit the guard has given up, though no
    transaction of its own failed. An unreachable database is back at any answer, as before."""
    engine = create_db_engine(f"sqlite:///{tmp_path / 'small.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x BLOB)"))
        connection.execute(text("PRAGMA max_page_count = 8"))
    with pytest.raises(OperationalError) as full, engine.begin() as connection:
        connection.execute(text("PRAGMA max_page_count = 8"))
        connection.execute(text("INSERT INTO t VALUES (zeroblob(100000))"))

    def read() -> int:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM t")).scalar_one())

    fake = FakeTime()
    g = guard(fake, limit=10, writes_reported=True)
    with caplog.at_level(logging.INFO, logger="meddaemon.daemon"):
        g.failed(full.value)  # the heartbeat's write
        assert g.run(read) == 0 and not g.up and not g.given_up()
        fake.now += 10
        assert g.run(read) == 0 and g.given_up()
        assert str(g.unavailable()).startswith("the database has been unwritable (disk full) for 10 s, longer than")
        g.succeeded(wrote=True)
        assert g.up and not g.given_up()
        g.failed(refused())
        assert g.run(read) == 0 and g.up
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "database unwritable (disk full)",
        "database back after 10.0 s",
        "database unreachable",
        "database back after 0.0 s",
    ]
    engine.dispose()
