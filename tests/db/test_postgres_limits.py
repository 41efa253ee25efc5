"""The bounds on every wait of a daemon's PostgreSQL connections (``ConnectionLimits``): a lock held
by a frozen transaction is waited for at most the lock timeout, a session idle inside a transaction
is ended by the server, and keepalives are on at both ends.

No image is read; the rows are SYNTHETIC inbox claims.
"""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from meddaemon.db.engine import ConnectionLimits, create_db_engine, is_lock_error, is_lock_timeout

pytestmark = pytest.mark.postgres


@pytest.fixture
def url(migrated_postgres_url: str) -> str:
    return migrated_postgres_url


def test_the_limits_are_set_on_every_connection_of_the_engine(url):
    engine = create_db_engine(url, limits=ConnectionLimits(lock_timeout=1.5, idle_in_transaction=20, keepalive=9))
    with engine.connect() as conn:
        shown = {
            name: conn.execute(text(f"SHOW {name}")).scalar()
            for name in (
                "lock_timeout",
                "idle_in_transaction_session_timeout",
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
                "tcp_user_timeout",
                "application_name",
            )
        }
    engine.dispose()
    assert shown == {
        "lock_timeout": "1500ms",
        "idle_in_transaction_session_timeout": "20s",
        "tcp_keepalives_idle": "9",
        "tcp_keepalives_interval": "3",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "18000",
        "application_name": f"meddaemon[{os.getpid()}]",
    }


def test_a_statement_waits_for_a_lock_a_frozen_transaction_holds_no_longer_than_the_lock_timeout(url):
    frozen_engine = create_db_engine(url)
    peer = create_db_engine(url, limits=ConnectionLimits(lock_timeout=1.0))
    insert = "INSERT INTO inbox_claims (path, size, mtime_ns, inode, claimed_at) VALUES (:p, 1, 1, 1, 0)"
    with frozen_engine.connect() as frozen:
        frozen.execute(text(insert), {"p": "/inbox/synthetic_1.png"})  # open transaction, never committed
        started = time.monotonic()
        with pytest.raises(OperationalError) as raised, peer.begin() as conn:
            conn.execute(text(insert + " ON CONFLICT (path) DO NOTHING"), {"p": "/inbox/synthetic_1.png"})
        waited = time.monotonic() - started
        frozen.rollback()
    frozen_engine.dispose()
    peer.dispose()
    assert 0.9 < waited < 3.0
    assert is_lock_timeout(raised.value) and is_lock_error(raised.value), "retried like any lock, not a crash"


def test_the_server_ends_a_session_idle_inside_a_transaction_after_the_timeout(url):
    engine = create_db_engine(url, limits=ConnectionLimits(idle_in_transaction=1.0))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # a transaction is open from here
        time.sleep(2.0)  # frozen (SIGSTOP, a swap storm) with it open
        with pytest.raises(DBAPIError):
            conn.execute(text("SELECT 1"))
    engine.dispose()
