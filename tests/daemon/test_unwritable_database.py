"""A real daemon whose SQLite database stops taking writes while it runs: the file made immutable
(``chattr +i``), as a failing disk or a file system remounted read-only leaves it. Reads still
answer, so the daemon must not take one for the database back: one outage, logged once, the metric
down all along, and exit 3 past ``db_outage_seconds`` though the idle daemon's own loop only reads.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from daemon_harness import TASK, Daemons, Layout, drop, one, scrape, synthetic_png, wait_until
from permissions import immutable
from ports import free_port

pytestmark = pytest.mark.slow


def test_an_unwritable_sqlite_database_is_one_outage_metric_down_then_exit_3(daemons: Daemons, layout: Layout):
    """It logged "database back after 0.0 s" every heartbeat (a read had succeeded), the metric read
    up, and an idle daemon never gave up: its clock towards the limit started again each time."""
    port = free_port()
    env = {"MEDDAEMON_METRICS_PORT": str(port), "MEDDAEMON_DB_OUTAGE_SECONDS": "8", "MEDDAEMON_LEASE_SECONDS": "2"}
    daemon = daemons.start(env=env)
    daemon.wait_ready(60)
    metrics = f"http://127.0.0.1:{port}/metrics"
    database = [p for p in (layout.db, layout.db.with_name("meddaemon.db-wal")) if p.exists()]
    with immutable(*database):
        wait_until(lambda: "meddaemon.daemon: database unwritable" in daemon.log_text(), 20, "the outage", daemon)
        assert one(scrape(metrics), "meddaemon_database_up") == 0
        code = daemon.wait(60)
    log = daemon.log_text()
    assert code == 3, daemon.tail()
    assert log.count("meddaemon.daemon: database unwritable") == 1 and "meddaemon.daemon: database back" not in log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(
        r"error: the database has been unwritable \((read-only|disk I/O error)\) for \d+ s, "
        r"longer than db_outage_seconds \(8 s\)",
        errors[0],
    ), errors
    assert "Traceback" not in log


def test_a_brief_unwritable_spell_is_over_at_the_first_write_that_goes_through_whatever_the_lease(
    daemons: Daemons, layout: Layout
):
    """Only a write ends an unwritable outage, and the heartbeat's came a quarter lease apart: with a
    200 s lease, a 2 s spell long over outlasted ``db_outage_seconds`` and the daemon exited 3 on a
    database that took its writes. The loop tries a write itself while the database is unwritable."""
    daemon = daemons.start(env={"MEDDAEMON_DB_OUTAGE_SECONDS": "6", "MEDDAEMON_LEASE_SECONDS": "200"})
    daemon.wait_ready(60)
    database = [p for p in (layout.db, layout.db.with_name("meddaemon.db-wal")) if p.exists()]
    with immutable(*database):
        drop(layout.inbox / TASK, "synthetic_0000.png", synthetic_png(layout.root, 0), rename=True)  # a write
        wait_until(lambda: "meddaemon.daemon: database unwritable" in daemon.log_text(), 20, "the outage", daemon)
        time.sleep(2.0)
    wait_until(lambda: "meddaemon.daemon: database back after" in daemon.log_text(), 10, "the way back", daemon)
    wait_until(lambda: "synthetic_0000.png (sha256" in daemon.log_text(), 10, "the file recorded", daemon)
    time.sleep(6.0)  # past db_outage_seconds from the spell's start
    assert daemon.alive(), daemon.tail()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0, daemon.tail()
