"""The outbox sender against peers that refuse: nothing is lost, every refusal is retried (and
visible in ``medcli outbox list`` meanwhile) until the peer stores the object, once; a permanent
refusal is dead at once with the peer's status. A C-STORE association stays open while objects
keep coming and is released once idle."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from dicom_factory import write_dicom
from sqlalchemy import select, text, update

from daemon_harness import wait_until
from daemon_rows import add_scan, dead_pid, join
from dicom_peers import DROP, HttpAnswer, ScriptedScp, ScriptedStow
from meddaemon.cli.medcli import cli as medcli
from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, lease
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade
from meddaemon.db.models import DaemonInstance, OutboxItem
from meddaemon.dicom import outbox
from meddaemon.dicom.outbox import DEAD, DELIVERED, PENDING, NewItem, OutboxSender
from meddaemon.engine.tasks import all_tasks
from meddaemon.states import ScanState


def queued(settings: Settings, objects: int, destinations: list[str]):  # type: ignore[no-untyped-def]
    """A migrated database with one reported SYNTHETIC scan whose ``objects`` DICOM files are queued
    for each of ``destinations``; returns (sessions, SOP Instance UIDs)."""
    engine = create_db_engine(settings.db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    rng = np.random.default_rng(2)
    uids = []
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        scan = add_scan(session, 1, ScanState.REPORTED, format="dicom")
        items = []
        for i in range(objects):
            path = write_dicom(settings.dicom_dir / f"synthetic_{i}.dcm", pixels=rng.integers(0, 255, (8, 8), np.uint8))
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            uids.append(uid)
            items += [NewItem(f"sc:{i}", d, None, uid, settings.stored_name(path)) for d in destinations]
        outbox.enqueue(session, scan.id, items)
    return sessions, uids


def statuses(sessions) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        return {(r.object_key, r.destination): r.status for r in session.scalars(select(OutboxItem))}


def drain(sender: OutboxSender, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sender.sessions() as session:
            if outbox.summary(session).counts[PENDING] == 0:
                return
        sender.round()
        time.sleep(0.02)
    raise AssertionError("the outbox did not empty")


def test_refusals_and_drops_are_retried_until_each_object_is_stored_once_and_shown_meanwhile(make_settings):
    scp = ScriptedScp([0xA700, 0xC000, DROP])
    stow = ScriptedStow([409, 500])
    try:
        settings = make_settings(
            destination=[{**scp.destination("pacs"), "timeout_seconds": 3.0}, stow.destination("web")],
            outbox_retry_seconds=0.05,
            outbox_max_retry_seconds=0.2,
        )
        sessions, uids = queued(settings, 3, ["pacs", "web"])
        sender = OutboxSender(settings, sessions, None)
        sender.round()

        listed = CliRunner().invoke(medcli, ["outbox", "list", "--json", "--state-dir", str(settings.state_dir)])
        items = json.loads(listed.stdout)["items"]
        errors = {i["last_error"] for i in items if i["status"] == PENDING}
        assert {"C-STORE status 0xA700", "STOW-RS HTTP 409"} <= errors

        drain(sender)
    finally:
        scp.stop()
        stow.stop()
    assert set(statuses(sessions).values()) == {DELIVERED}
    assert sorted(scp.stored) == sorted(uids)  # each stored once: a refused send stores nothing
    assert stow.stored == 3 and stow.requests == 5
    with sessions() as session:
        attempts = {(r.object_key, r.destination): r.attempts for r in session.scalars(select(OutboxItem))}
    assert sum(attempts.values()) == 6 + 3 + 2  # one success each, plus every refusal


def test_a_destination_that_hangs_holds_up_no_other_and_costs_one_timeout(make_settings):
    """The destinations of a round were sent one after another, each object of one that hangs after
    its timeout: results for a PACS that answered waited 4 x 5 s behind a hung one."""
    hung, fine = ScriptedStow([HttpAnswer(200, delay=10.0)]), ScriptedStow()
    try:
        settings = make_settings(
            destination=[{**hung.destination("hung"), "timeout_seconds": 3.0}, fine.destination("fine")],
            outbox_retry_seconds=30.0,
        )
        sessions, _ = queued(settings, 4, ["hung", "fine"])
        sender = OutboxSender(settings, sessions, None)
        started = time.monotonic()
        stored_at: list[float] = []

        def watch() -> None:
            wait_until(lambda: fine.stored == 4, 30, "the fine destination's objects", every=0.02)
            stored_at.append(time.monotonic() - started)

        watcher = threading.Thread(target=watch)
        watcher.start()
        sender.round()
        took = time.monotonic() - started
        watcher.join()
    finally:
        hung.stop()
        fine.stop()
    assert stored_at[0] < 2.0, f"the fine destination's objects were stored {stored_at[0]:.1f} s in"
    assert took < 6.0 and hung.requests == 1  # one timeout for the hung one, its other objects untried
    rows = statuses(sessions)
    assert {rows[(f"sc:{i}", "fine")] for i in range(4)} == {DELIVERED}
    assert {rows[(f"sc:{i}", "hung")] for i in range(4)} == {PENDING}


def test_a_permanent_refusal_is_dead_at_once_with_the_peers_status(make_settings):
    scp = ScriptedScp([0xA900])
    try:
        settings = make_settings(destination=[scp.destination("pacs")], outbox_retry_seconds=0.05)
        sessions, _ = queued(settings, 2, ["pacs"])
        sender = OutboxSender(settings, sessions, None)
        drain(sender)
    finally:
        scp.stop()
    with sessions() as session:
        rows = {r.object_key: (r.status, r.attempts, r.last_error) for r in session.scalars(select(OutboxItem))}
    assert rows == {"sc:0": (DEAD, 1, "C-STORE status 0xA900"), "sc:1": (DELIVERED, 1, None)}


def test_a_round_s_stored_objects_are_delivered_each_with_the_peers_warning_if_any(make_settings):
    scp = ScriptedScp([0x0000, 0xB007, 0x0000, 0xA700])  # the third stored, the fourth refused for now
    try:
        settings = make_settings(destination=[scp.destination("pacs")], outbox_retry_seconds=30.0)
        sessions, _ = queued(settings, 4, ["pacs"])
        assert OutboxSender(settings, sessions, None).round() == 4  # one round, one transaction to record
    finally:
        scp.stop()
    with sessions() as session:
        rows = {r.object_key: (r.status, r.attempts, r.last_error) for r in session.scalars(select(OutboxItem))}
    assert rows == {
        "sc:0": (DELIVERED, 1, None),
        "sc:1": (DELIVERED, 1, "C-STORE status 0xB007"),
        "sc:2": (DELIVERED, 1, None),
        "sc:3": (PENDING, 1, "C-STORE status 0xA700"),
    }


def test_a_stow_rs_success_whose_answer_cannot_be_read_is_delivered_and_the_objects_after_it_go_on(make_settings):
    """A 200 whose body is not DICOM JSON (dicomweb-client raises reading it): the instance was stored.
    It failed the whole round: the objects stored before it were sent again, those after it never
    sent yet counted as attempts, and went dead that way."""
    stow = ScriptedStow([200, b'{"status": "stored"}'])
    try:
        settings = make_settings(destination=[stow.destination("web")], outbox_retry_seconds=30.0)
        sessions, _ = queued(settings, 4, ["web"])
        assert OutboxSender(settings, sessions, None).round() == 4
    finally:
        stow.stop()
    with sessions() as session:
        rows = {r.object_key: (r.status, r.attempts) for r in session.scalars(select(OutboxItem))}
        unread = session.scalar(select(OutboxItem.last_error).where(OutboxItem.object_key == "sc:1"))
    assert rows == {f"sc:{i}": (DELIVERED, 1) for i in range(4)}
    assert stow.requests == 4
    assert unread is not None and unread.startswith("STOW-RS HTTP 200, an answer that could not be read")


def test_a_sender_asked_to_stop_sends_no_other_object_and_gives_the_rest_back_unattempted(make_settings):
    """What the outbox process does when its daemon is killed with -9: it finishes the object in hand
    and sends no other (the restarted daemon takes over the claims at once: both sent the same objects)."""
    scp = ScriptedScp()
    try:
        settings = make_settings(destination=[scp.destination("pacs")], outbox_retry_seconds=30.0)
        sessions, uids = queued(settings, 4, ["pacs"])
        sender = OutboxSender(settings, sessions, None)
        scp.on_store = lambda: sender.stop_event.set()
        assert sender.round() == 4
        sender.close_senders()
    finally:
        scp.stop()
    with sessions() as session:
        rows = {r.object_key: (r.status, r.attempts, r.claimed_by) for r in session.scalars(select(OutboxItem))}
    assert scp.received == uids[:1]
    assert rows == {"sc:0": (DELIVERED, 1, None), **{f"sc:{i}": (PENDING, 0, None) for i in (1, 2, 3)}}


def test_a_sender_whose_daemon_is_declared_lost_mid_round_sends_no_other_object(make_settings):
    """Frozen past its lease, or its main loop stalled, the daemon is declared lost and another takes
    its claims: its sender went on with the round, and after a SIGCONT sent again objects the other
    had delivered. It finishes the object in hand and gives back no claim that is not its own."""
    scp = ScriptedScp()
    try:
        settings = make_settings(destination=[scp.destination("pacs")], outbox_retry_seconds=30.0)
        sessions, uids = queued(settings, 4, ["pacs"])
        me, other = join(sessions, "node-a").daemon_id, join(sessions, "node-b").daemon_id
        sender = OutboxSender(settings, sessions, me)
        taken: list[outbox.Claimed] = []

        def declared_lost_and_taken_over() -> None:
            with transaction(sessions) as session:
                session.execute(update(DaemonInstance).where(DaemonInstance.id == me).values(state="lost"))
                taken.extend(outbox.claim_due(session, other, 10))

        scp.on_store = declared_lost_and_taken_over
        assert sender.round() == 4
        sender.close_senders()
    finally:
        scp.stop()
    with sessions() as session:
        rows = {r.object_key: (r.status, r.claimed_by) for r in session.scalars(select(OutboxItem))}
    assert scp.received == uids[:1] and len(taken) == 4  # the object in hand too: its answer was not in yet
    assert rows == {"sc:0": (DELIVERED, None), **{f"sc:{i}": (PENDING, other) for i in (1, 2, 3)}}


def test_a_sender_leaves_the_rows_of_a_destination_another_daemon_configures_alone(make_settings, tmp_path: Path):
    """Daemons sharing a database may configure different destinations (one host sending for all):
    a sender claimed every destination's rows and made those of the other's dead ("not configured"),
    their outputs never sent. Rows no running daemon configures are settled at a daemon's start
    (``test_rows_queued_for_destinations_none_of_which_is_configured_any_more_are_dead_at_the_daemon_s_start``)."""
    (tmp_path / "share").mkdir()
    settings = make_settings(destination=[{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}])
    sessions, _ = queued(settings, 1, ["share", "pacs"])
    join(sessions, "node-b")  # the daemon that sends to "pacs"
    me = join(sessions, "node-a")
    sender = OutboxSender(settings, sessions, me.daemon_id)
    for _ in range(3):
        sender.round()
    assert statuses(sessions) == {("sc:0", "share"): DELIVERED, ("sc:0", "pacs"): PENDING}
    with sessions() as session:
        pacs = session.scalars(select(OutboxItem).where(OutboxItem.destination == "pacs")).one()
    assert (pacs.claimed_by, pacs.attempts, pacs.last_error) == (None, 0, None)


def test_each_acknowledgement_is_recorded_before_the_next_object_is_sent(make_settings):
    """They were recorded together once the round's last object was answered: a daemon killed in
    between left acknowledged objects pending, and its successor sent them again."""
    delivered_when_asked: list[int] = []
    held: dict[str, object] = {}

    def count_delivered() -> None:
        delivered_when_asked.append(list(statuses(held["sessions"]).values()).count(DELIVERED))

    scp = ScriptedScp(on_store=count_delivered)
    try:
        settings = make_settings(destination=[scp.destination("pacs")])
        held["sessions"], _ = queued(settings, 3, ["pacs"])
        drain(OutboxSender(settings, held["sessions"], None))
    finally:
        scp.stop()
    assert delivered_when_asked == [0, 1, 2]
    assert set(statuses(held["sessions"]).values()) == {DELIVERED}


def test_an_acknowledgement_the_database_fails_to_record_at_once_is_recorded_with_the_round(
    make_settings, tmp_path: Path, monkeypatch
):
    """The first version let the error out of the send: the objects acknowledged were logged as not
    delivered, and those never sent counted a failed attempt each."""
    from sqlalchemy.exc import OperationalError

    (tmp_path / "share").mkdir()
    settings = make_settings(destination=[{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}])
    sessions, _ = queued(settings, 4, ["share"])
    calls = itertools.count(1)
    real = outbox.record_delivered

    def dropped_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        if next(calls) == 2:
            raise OperationalError("UPDATE outbox", {}, Exception("SYNTHETIC: server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(outbox, "record_delivered", dropped_once)
    sender = OutboxSender(settings, sessions, None)
    sender.round()
    assert set(statuses(sessions).values()) == {DELIVERED}
    with sessions() as session:
        assert {r.attempts for r in session.scalars(select(OutboxItem))} == {1}  # the delivering one
    assert (sender.delivered, sender.failed) == (4, 0)


def test_an_acknowledgement_not_yet_recorded_stays_one_when_the_sender_fails_after_it(
    make_settings, tmp_path: Path, monkeypatch
):
    from sqlalchemy.exc import OperationalError

    from meddaemon.dicom import senders

    (tmp_path / "share").mkdir()
    settings = make_settings(destination=[{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}])
    sessions, _ = queued(settings, 3, ["share"])
    records, reads = itertools.count(1), itertools.count(1)
    real_record, real_read = outbox.record_delivered, senders.read_object

    def dropped_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        if next(records) == 1:
            raise OperationalError("UPDATE outbox", {}, Exception("SYNTHETIC: server closed the connection"))
        return real_record(*args, **kwargs)

    def broken_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        if next(reads) == 2:
            raise RuntimeError("SYNTHETIC: a bug in the sender")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(outbox, "record_delivered", dropped_first)
    monkeypatch.setattr(senders, "read_object", broken_second)
    OutboxSender(settings, sessions, None).round()
    assert statuses(sessions) == {("sc:0", "share"): DELIVERED, ("sc:1", "share"): PENDING, ("sc:2", "share"): PENDING}


@pytest.mark.postgres
def test_on_postgresql_a_daemon_registering_waits_for_another_s_settling_of_unconfigured_outputs(
    make_settings, postgres_url: str
):
    """Its count of running daemons and its update were two statements at READ COMMITTED: a daemon
    registering between them (configured with the destination) had its rows made dead unseen."""
    from sqlalchemy.exc import OperationalError

    settings = make_settings(db=postgres_url)
    sessions, _ = queued(settings, 1, ["pacs"])
    alone = join(sessions, "node-a")
    settling = sessions()
    settling.begin()
    assert outbox.settle_unconfigured(settling, [], alone.daemon_id) == {"pacs": 1}
    try:
        with pytest.raises(OperationalError, match="lock timeout"), transaction(sessions) as session:
            session.execute(text("SET LOCAL lock_timeout = '300ms'"))
            lease.register(session, "node-b", 30.0)
    finally:
        settling.rollback()
        settling.close()
    with transaction(sessions) as session:
        lease.register(session, "node-b", 30.0)  # once it is done
        assert outbox.settle_unconfigured(session, [], alone.daemon_id) == {}  # and it now sees node-b


def test_rows_queued_for_destinations_none_of_which_is_configured_any_more_are_dead_at_the_daemon_s_start(
    make_settings,
):
    """With no destination configured no sender runs, and no sender ever made them dead: they stayed
    pending, and their scans reported, never archived, for ever. Where another daemon runs, they are
    left to it: daemons sharing a database may configure different destinations (one sends for all)."""
    from meddaemon.daemon.service import Daemon

    settings = make_settings()
    sessions, _ = queued(settings, 2, ["pacs"])
    other = join(sessions, "node-b")
    first = Daemon(settings)
    first.prepare()
    assert statuses(sessions) == {("sc:0", "pacs"): PENDING, ("sc:1", "pacs"): PENDING}

    # then the other stopped, and the first was killed holding a row: its successor settles both
    crashed = join(sessions, lease.node_name(settings.node), pid=dead_pid())
    with transaction(sessions) as session:
        gone = [other.daemon_id, first.member.daemon_id]  # type: ignore[union-attr]
        session.execute(update(DaemonInstance).where(DaemonInstance.id.in_(gone)).values(state="stopped"))
        session.execute(update(OutboxItem).where(OutboxItem.object_key == "sc:1").values(claimed_by=crashed.daemon_id))
    Daemon(settings).prepare()
    assert statuses(sessions) == {("sc:0", "pacs"): DEAD, ("sc:1", "pacs"): DEAD}
    with sessions() as session:
        rows = session.scalars(select(OutboxItem)).all()
    assert {(r.last_error, r.claimed_by) for r in rows} == {("destination 'pacs' is not configured", None)}


def test_a_sender_that_cannot_be_made_fails_its_objects_as_attempts_not_the_round(
    make_settings, tmp_path: Path, monkeypatch
):
    """A DICOMweb client refusing its URL raised out of the round: a traceback every round, and the
    objects stayed pending with 0 attempts for ever (never backed off, never dead)."""
    (tmp_path / "share").mkdir()
    settings = make_settings(destination=[{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}])
    sessions, _ = queued(settings, 2, ["share"])

    def refused(destination):  # type: ignore[no-untyped-def]
        raise ValueError("SYNTHETIC: Malformed URL")

    monkeypatch.setattr(outbox, "make_sender", refused)
    OutboxSender(settings, sessions, None).round()
    with sessions() as session:
        rows = session.scalars(select(OutboxItem)).all()
    assert [(r.status, r.attempts) for r in rows] == [(PENDING, 1), (PENDING, 1)]
    assert all("ValueError in the sender" in (r.last_error or "") for r in rows), [r.last_error for r in rows]


def test_the_association_stays_open_while_objects_come_and_is_released_once_idle(make_settings):
    scp = ScriptedScp()
    try:
        # kept open 8 s: long enough for the look below to come first on a loaded machine
        settings = make_settings(destination=[{**scp.destination("pacs"), "keep_open_seconds": 8.0}])
        sessions, uids = queued(settings, 2, ["pacs"])
        sender = OutboxSender(settings, sessions, None)
        sender.start()
        try:
            wait_until(lambda: set(statuses(sessions).values()) == {DELIVERED}, 30, "the objects delivered")
            assert scp.open_associations() == 1
            wait_until(lambda: scp.open_associations() == 0, 30, "the idle association released")
        finally:
            sender.stop()
    finally:
        scp.stop()
    assert scp.associations == 1 and sorted(scp.stored) == sorted(uids)


def test_a_drain_leaves_no_association_open(make_settings):
    scp = ScriptedScp()
    try:
        settings = make_settings(destination=[{**scp.destination("pacs"), "keep_open_seconds": 60.0}])
        sessions, uids = queued(settings, 2, ["pacs"])
        OutboxSender(settings, sessions, None).drain()
        wait_until(lambda: scp.open_associations() == 0, 10, "the association released")
    finally:
        scp.stop()
    assert sorted(scp.stored) == sorted(uids)
