"""Is the service healthy? A few checks, each ok, degraded or down, for ``meddaemon health``.

Meant for supervisors and probes (a systemd timer, Docker's HEALTHCHECK, a load balancer): it reads
the shared database through a read-only engine (``db.readonly``) and writes nothing, not even a
schema upgrade; a schema that is behind is reported, not fixed. Daemon liveness is judged by the
database's clock (``db.clock``), as the daemons judge each other, so a node with a wrong clock
reports what the other daemons see. Other row times (``registered_at``, ``updated_at``) were written
by the nodes' own clocks and are compared with this node's.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, or_, select
from sqlalchemy.orm import Session

from meddaemon.config import Settings
from meddaemon.daemon.lease import RunningDaemon, node_name, pid_namespace, running_daemons
from meddaemon.db.clock import db_clock
from meddaemon.db.migrate import (
    OUR_REVISION,
    ForeignDatabase,
    alembic_config,
    current_revision,
    head_revision,
    refuse_a_revision_without_our_tables,
    refuse_others_tables,
)
from meddaemon.db.models import DaemonInstance, Scan, utcnow
from meddaemon.db.queries import moves_waiting, refused_active_versions, waiting_for_an_active_model, waiting_since
from meddaemon.failures import NOT_AN_IMAGE
from meddaemon.logs import error_line
from meddaemon.processes import process_alive

Status = Literal["ok", "degraded", "down"]
OK: Status = "ok"
DEGRADED: Status = "degraded"
DOWN: Status = "down"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}
#: Exit codes of ``meddaemon health`` by the report's overall status.
EXIT_CODES = {OK: 0, DEGRADED: 1, DOWN: 2}
#: the time the checks that read the database may take together: each statement is bounded (5 s on
#: PostgreSQL), but six checks each waiting on a locked table took 32 s, past the 20 s a container's
#: HEALTHCHECK waits (deploy/Dockerfile), which then counts a healthy daemon's check as failed
DATABASE_CHECKS_SECONDS = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check]

    @property
    def status(self) -> Status:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.exit_code, "checks": [asdict(c) for c in self.checks]}


@dataclass(frozen=True)
class HealthLimits:
    """Where healthy ends. The defaults suit a daemon that keeps up with its inbox."""

    #: require a live daemon on this node (None: any node will do)
    node: str | None = None
    #: a scan waiting in routed (or inferred, when reports are on) longer than this: a stuck queue
    stuck_seconds: float = 600.0
    #: free space on the state directory's file system below this: degraded
    min_free_bytes: int = 1024**3
    #: of the scans registered in the last ``failure_window_seconds``, a failed fraction above this
    failure_window_seconds: float = 900.0
    max_failure_fraction: float = 0.5
    #: ... judged only once at least this many scans were registered in the window
    min_scans_for_failure_rate: int = 10
    #: a daemon declared lost within this long ago is reported
    lost_window_seconds: float = 3600.0


def this_node(settings: Settings) -> str:
    """The node name a daemon started with these settings registers under."""
    return node_name(settings.node)


def check_health(
    engine: Engine,
    settings: Settings,
    limits: HealthLimits | None = None,
    disk_usage: Callable[[Path], Any] = shutil.disk_usage,
    echo: Callable[[Settings], Any] | None = None,
) -> HealthReport:
    """Run every check; ``engine`` should be read-only (``db.readonly.read_only_engine``). With a
    ``dicom_port``, the DICOM receiver is probed with a C-ECHO (``echo``: ``dicom.receiver.echo``)."""
    limits = limits or HealthLimits()
    database = _database(engine)
    checks = [database]
    if database.status == DOWN:
        checks.append(Check("daemons", DOWN, "cannot tell whether any daemon is alive: the database is down"))
    else:
        deadline = time.monotonic() + DATABASE_CHECKS_SECONDS

        def guarded(name: str, check: Callable[[Session], Check]) -> Check:
            if time.monotonic() >= deadline:
                why = f"the checks before it waited {DATABASE_CHECKS_SECONDS:g} s on the database (a table locked?)"
                return Check(name, DEGRADED, f"not checked: {why}")
            return _guarded(name, engine, check)

        daemons = guarded("daemons", lambda s: _daemons(s, limits, this_node(settings)))
        checks += [
            daemons,
            guarded("lost_daemons", lambda s: _lost(s, limits)),
            guarded("queue", lambda s: _queue(s, settings, limits, daemons.details.get("alive", 0))),
            guarded("models", _models),
            guarded("failures", lambda s: _failures(s, limits)),
            guarded("outbox", lambda s: _outbox(s, limits)),
            guarded("moves", lambda s: _moves(s, limits, daemons.details.get("alive", 0))),
        ]
    if settings.dicom_port:
        checks.append(_dicom(engine, settings, echo, disk_usage))
    if settings.sources.get("watch") != "default" or settings.watch.exists():
        checks.append(_inbox(settings.watch))
    checks.append(_disk(settings.state_dir, limits.min_free_bytes, disk_usage))
    return HealthReport(checks)


def _inbox(watch: Path) -> Check:
    """The watch folder, as the daemons of this node see it: gone (removed, a share unmounted),
    nothing dropped there is read until it is back, and the daemons wait for it without a word in the
    database."""
    details = {"watch": str(watch)}
    if not watch.is_dir():
        why = "is not a folder" if watch.exists() else "is gone: removed, or its share unmounted"
        return Check("inbox", DEGRADED, f"the watch folder {watch} {why}; nothing dropped there is read", details)
    return Check("inbox", OK, f"the watch folder {watch} is there", details)


def _guarded(name: str, engine: Engine, check: Callable[[Session], Check]) -> Check:
    """One check in a read-only transaction of its own; a query that fails degrades only that check."""
    try:
        with Session(engine) as session, session.begin():
            return check(session)
    except Exception as exc:
        return Check(name, DEGRADED, f"could not be checked: {error_line(exc)}")


def _database(engine: Engine) -> Check:
    head = head_revision()
    try:
        current = current_revision(engine)
    except Exception as exc:
        file = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if file and not Path(file).exists():  # said as every other command says it
            why = f"no meddaemon database at {file} (run `medcli db upgrade` or start the daemon)"
            return Check("database", DOWN, why, {"head": head})
        return Check("database", DOWN, f"the database is unreachable: {error_line(exc)}", {"head": head})
    details = {"revision": current, "head": head}
    if current is None:
        foreign = _others_tables(engine, None)
        if foreign:
            return Check("database", DOWN, foreign, details)
        return Check("database", DOWN, "the database has no meddaemon schema (no daemon ever started on it)", details)
    foreign = _others_tables(engine, current)
    if foreign:
        return Check("database", DOWN, foreign, details)
    if not OUR_REVISION.fullmatch(current):
        return Check(
            "database",
            DOWN,
            f"the database is another application's (its Alembic revision {current} is none of meddaemon's); "
            "point the settings (--db, MEDDAEMON_DB) at meddaemon's database",
            details,
        )
    if current == head:
        return Check("database", OK, f"reachable, schema at {head} (this meddaemon's head)", details)
    if _is_older(current, head):
        return Check(
            "database",
            DEGRADED,
            f"schema at {current}, behind this meddaemon's {head}: `medcli db upgrade` or a daemon start upgrades it",
            details,
        )
    return Check(
        "database",
        DOWN,
        f"schema at {current}, unknown to this meddaemon ({head}): upgrade meddaemon",
        details,
    )


def _others_tables(engine: Engine, revision: str | None) -> str | None:
    """Why the database is another application's, or None: tables and no meddaemon schema, or a
    revision numbered as meddaemon's without meddaemon's tables."""
    url = engine.url.render_as_string(hide_password=False)
    try:
        with engine.connect() as conn:
            if revision is None:
                refuse_others_tables(conn, url)
            elif OUR_REVISION.fullmatch(revision):
                refuse_a_revision_without_our_tables(conn, url, revision)
    except ForeignDatabase as exc:
        return str(exc)
    return None


def _is_older(current: str, head: str) -> bool:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    try:
        return any(rev.revision == current for rev in script.iterate_revisions(head, "base"))
    except Exception:
        return False


def _crashed_here(daemon: RunningDaemon, here: str) -> bool:
    """A daemon of this node and PID namespace whose process is gone (killed, crashed) while its
    lease runs: the daemons declare such a one lost at once (``lease.release_lost``), and health
    called it alive until its lease ran out."""
    return (
        daemon.node == here
        and daemon.pid_namespace is not None
        and daemon.pid_namespace == pid_namespace()
        and not process_alive(daemon.pid)
    )


def _daemons(session: Session, limits: HealthLimits, here: str) -> Check:
    rows = running_daemons(session)
    crashed = [r for r in rows if r.alive and _crashed_here(r, here)]
    alive = [r for r in rows if r.alive and r not in crashed]
    expired = [r for r in rows if not r.alive]
    gone = "; ".join(
        f"daemon {r.id} (pid {r.pid}) on this node is marked running but its process is gone" for r in crashed
    )
    details: dict[str, Any] = {
        "alive": len(alive),
        "expired": len(expired),
        "crashed": len(crashed),
        "nodes": sorted({r.node for r in alive}),
        "daemons": [
            {
                "id": r.id,
                "node": r.node,
                "pid": r.pid,
                "heartbeat_age": round(r.heartbeat_age, 3),
                "lease": r.lease_seconds,
            }
            for r in rows
        ],
    }
    if limits.node is not None:
        details["node"] = limits.node
        on_node = [r for r in alive if r.node == limits.node]
        if not on_node:
            elsewhere = f" ({len(alive)} alive on other nodes)" if alive else ""
            crash = f": {gone}" if gone else ""
            return Check("daemons", DOWN, f"no daemon alive on node {limits.node}{elsewhere}{crash}", details)
    if not alive:
        if crashed:
            message = f"no daemon alive: {gone}"
        elif expired:
            newest = min(r.heartbeat_age for r in expired)
            message = (
                f"no daemon alive: {len(expired)} marked running, all past their lease "
                f"(the newest heartbeat is {newest:.0f} s old)"
            )
        else:
            message = "no daemon alive: none is running"
        return Check("daemons", DOWN, message, details)
    summary = f"{len(alive)} alive on {_plural(len(details['nodes']), 'node')} ({', '.join(details['nodes'])})"
    if crashed:
        return Check("daemons", DEGRADED, f"{summary}; {gone}", details)
    if expired:
        return Check(
            "daemons",
            DEGRADED,
            f"{summary}; {len(expired)} past their lease, not yet declared lost: "
            + ", ".join(f"{r.id} on {r.node}" for r in expired),
            details,
        )
    return Check("daemons", OK, summary, details)


def _lost(session: Session, limits: HealthLimits) -> Check:
    since = db_clock() - limits.lost_window_seconds
    rows = session.execute(
        select(DaemonInstance.id, DaemonInstance.node, DaemonInstance.pid)
        .where(DaemonInstance.state == "lost")
        .where(func.coalesce(DaemonInstance.stopped_at, DaemonInstance.heartbeat_at) >= since)
        .order_by(DaemonInstance.id)
    ).all()
    window = _duration(limits.lost_window_seconds)
    details = {"lost": [{"id": r.id, "node": r.node, "pid": r.pid} for r in rows]}
    if rows:
        names = ", ".join(f"{r.id} (node {r.node}, pid {r.pid})" for r in rows)
        return Check(
            "lost_daemons", DEGRADED, f"{_plural(len(rows), 'daemon')} lost in the last {window}: {names}", details
        )
    return Check("lost_daemons", OK, f"no daemon lost in the last {window}", details)


def _queue(session: Session, settings: Settings, limits: HealthLimits, alive: int) -> Check:
    # with reports off, inferred is where scans rest: only routed is a queue then
    states: Sequence[str] = ("routed", "inferred") if settings.reports else ("routed",)
    rows = session.execute(select(Scan.state, func.count()).where(Scan.state.in_(states)).group_by(Scan.state)).all()
    now = utcnow()
    waiting = {str(state): int(count) for state, count in rows}
    oldest = {state: (now - _aware(at)).total_seconds() for state, at in waiting_since(session, states).items()}
    unserved = {
        task: (count, (now - _aware(at)).total_seconds())
        for task, (count, at) in waiting_for_an_active_model(session).items()
    }
    details: dict[str, Any] = {
        "waiting": waiting,
        "oldest_seconds": {k: round(v, 1) for k, v in oldest.items()},
        "waiting_for_active_model": {t: {"scans": n, "oldest_seconds": round(a, 1)} for t, (n, a) in unserved.items()},
    }
    limit = _duration(limits.stuck_seconds)
    stuck_models = sorted(t for t, (_, age) in unserved.items() if age > limits.stuck_seconds)
    if stuck_models and alive:
        named = ", ".join(f"{t} ({_plural(unserved[t][0], 'scan')}, the oldest for {_duration(unserved[t][1])})"
                          for t in stuck_models)  # fmt: skip
        return Check(
            "queue",
            DEGRADED,
            f"stuck: scans wait for the active model of {named} (limit {limit}), which no daemon serves: "
            "refused or failing to load (the daemon's log says why; a refused version is tried again once "
            "promoted again, or at a restart)",
            details,
        )
    if not oldest:
        return Check("queue", OK, "nothing waiting for inference or a report", details)
    state, age = max(oldest.items(), key=lambda kv: kv[1])
    total = sum(waiting.values())
    if age > limits.stuck_seconds and alive:
        return Check(
            "queue",
            DEGRADED,
            f"stuck: the oldest {state} scan has waited {_duration(age)} (limit {limit}) "
            f"with {_plural(alive, 'daemon')} alive",
            details,
        )
    return Check("queue", OK, f"{_plural(total, 'scan')} waiting, the oldest for {_duration(age)}", details)


def _models(session: Session) -> Check:
    """An active version a daemon refused: the registry names it active while its predecessor
    serves, or its scans wait; nothing else would tell while the predecessor keeps the queue moving."""
    refused = refused_active_versions(session)
    details = {"refused": {r.task_name: {"version": r.version, "refusal": r.refusal} for r in refused}}
    if refused:
        named = "; ".join(f"{r.task_name}/{r.version} ({r.refusal})" for r in refused)
        return Check(
            "models",
            DEGRADED,
            f"an active model was refused by a daemon: {named}; mend its files and promote it again, or promote "
            "another",
            details,
        )
    return Check("models", OK, "no active model refused", details)


def _moves(session: Session, limits: HealthLimits, alive: int) -> Check:
    """Files whose move the daemons committed and could not carry out (the log names each): degraded
    once the oldest has waited past ``stuck_seconds`` while a daemon is alive to try again."""
    count, since = moves_waiting(session)
    details: dict[str, Any] = {"waiting": count}
    if not count or since is None:
        return Check("moves", OK, "no file move waiting", details)
    age = (utcnow() - _aware(since)).total_seconds()
    details["oldest_seconds"] = round(age, 1)
    if age > limits.stuck_seconds and alive:
        return Check(
            "moves",
            DEGRADED,
            f"{_plural(count, 'file move')} held back, the oldest for {_duration(age)} (limit "
            f"{_duration(limits.stuck_seconds)}): a folder the daemons cannot write (archive/, failed/) or a disk "
            "below its reserve; the daemon's log names each file, and each is tried again at every rescan",
            details,
        )
    return Check("moves", OK, f"{_plural(count, 'file move')} waiting, the oldest for {_duration(age)}", details)


def _outbox(session: Session, limits: HealthLimits) -> Check:
    """The DICOM outputs waiting for their destinations (issue 14): degraded when the oldest has
    waited past ``stuck_seconds`` (a destination down for that long)."""
    from meddaemon.dicom.outbox import recently_dead, summary

    queue = summary(session)
    details: dict[str, Any] = queue.as_dict()
    counts, oldest = queue.counts, queue.oldest_pending_seconds
    dead = f"; {_plural(counts['dead'], 'object')} dead (medcli outbox list --status dead)" if counts["dead"] else ""
    lately = recently_dead(session, limits.failure_window_seconds)
    details["dead_lately"] = [asdict(d) for d in lately]
    if lately:  # refused for good (a password changed: 401): dead at once, nothing ever pending
        named = "; ".join(f"{d.destination}: {d.count} ({d.last_error})" for d in lately)
        return Check(
            "outbox",
            DEGRADED,
            f"{_plural(sum(d.count for d in lately), 'DICOM output')} went dead in the last "
            f"{_duration(limits.failure_window_seconds)}: {named}; once fixed, medcli outbox retry --all-dead",
            details,
        )
    if oldest is None:
        return Check("outbox", OK, f"no DICOM output waiting{dead}", details)
    if oldest > limits.stuck_seconds:
        return Check(
            "outbox",
            DEGRADED,
            f"{_plural(counts['pending'], 'DICOM output')} waiting, the oldest for {_duration(oldest)} "
            f"(limit {_duration(limits.stuck_seconds)}): is a destination down?{dead}",
            details,
        )
    return Check(
        "outbox",
        OK,
        f"{_plural(counts['pending'], 'DICOM output')} waiting, the oldest for {_duration(oldest)}{dead}",
        details,
    )


def _dicom(
    engine: Engine, settings: Settings, echo: Callable[[Settings], Any] | None, disk_usage: Callable[[Path], Any]
) -> Check:
    """The DICOM receiver (issue 18): down when nothing answers a C-ECHO on its port, or another
    program than the daemon's receiver does (``receiver.implementation_version_name``); degraded when
    it answers but refuses every instance for want of disk (``dicom_min_free_bytes``); what it
    received lately, and the studies still arriving, in the details."""
    from meddaemon.dicom.completeness import arrival_summary

    if echo is None:
        from meddaemon.dicom.receiver import echo
    try:
        answer = echo(settings)
    except Exception as exc:
        return Check("dicom", DOWN, f"the DICOM receiver could not be probed: {error_line(exc)}")
    details: dict[str, Any] = {"ae_title": settings.ae_title, "port": settings.dicom_port, "probe": answer.outcome}
    received = ""
    try:
        with Session(engine) as session, session.begin():
            summary = arrival_summary(session, settings.series_quiet_seconds)
        details.update(asdict(summary))
        received = f"; {_plural(summary.instances_last_hour, 'instance')} received in the last hour"
        if summary.studies_arriving:
            n = summary.studies_arriving
            received += f", {n} {'study' if n == 1 else 'studies'} still arriving"
    except Exception as exc:
        details["received"] = f"could not be read: {error_line(exc)}"
    if answer.outcome == "none":
        return Check("dicom", DOWN, f"{answer.message}: is the daemon's DICOM receiver running?{received}", details)
    if answer.outcome == "foreign":
        return Check("dicom", DOWN, f"{answer.message}{received}", details)
    inbox = _existing(settings.received_dir)
    with contextlib.suppress(OSError):  # the disk check says why the free space cannot be read
        free = int(disk_usage(inbox).free)
        details["free_bytes"] = free
        if free < settings.dicom_min_free_bytes:
            minimum = _size(settings.dicom_min_free_bytes)
            short = f"{_size(free)} free under {inbox}, under dicom_min_free_bytes ({minimum})"
            message = f"{answer.message}, but every instance is refused (0xA700): {short}{received}"
            return Check("dicom", DEGRADED, message, details)
    return Check("dicom", OK, answer.message + received, details)


def _failures(session: Session, limits: HealthLimits) -> Check:
    """The failed share of the scans registered lately, leaving out the files that are no image at all
    (``NOT_AN_IMAGE``): a PACS forwarding whole studies sends their SRs, key-object notes and
    meddaemon's own results with the images, and they say nothing of the inputs or the daemon."""
    since = utcnow() - timedelta(seconds=limits.failure_window_seconds)
    images = or_(Scan.failure_reason.is_(None), Scan.failure_reason.not_in([r.value for r in NOT_AN_IMAGE]))
    total, failed = session.execute(
        select(func.count(), func.count().filter(Scan.state == "failed")).where(Scan.registered_at >= since, images)
    ).one()
    total, failed = int(total or 0), int(failed or 0)
    window = _duration(limits.failure_window_seconds)
    details = {"registered": total, "failed": failed, "window_seconds": limits.failure_window_seconds}
    if total == 0:
        return Check("failures", OK, f"no scan registered in the last {window}", details)
    fraction = failed / total
    details["fraction"] = round(fraction, 4)
    message = f"{failed} of {total} scans registered in the last {window} failed ({fraction:.0%})"
    if total >= limits.min_scans_for_failure_rate and fraction > limits.max_failure_fraction:
        return Check("failures", DEGRADED, f"{message}, over {limits.max_failure_fraction:.0%}", details)
    return Check("failures", OK, message, details)


def _existing(path: Path) -> Path:
    """``path``, or the nearest folder above it that exists: the file system it will be made on."""
    folder = Path(path).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _disk(state_dir: Path, min_free_bytes: int, disk_usage: Callable[[Path], Any]) -> Check:
    folder = _existing(state_dir)
    try:
        usage = disk_usage(folder)
    except OSError as exc:
        return Check("disk", DEGRADED, f"cannot read the free space of {folder}: {exc}")
    details = {"path": str(folder), "free_bytes": int(usage.free), "total_bytes": int(usage.total)}
    message = f"{_size(usage.free)} free of {_size(usage.total)} under {folder}"
    if usage.free < min_free_bytes:
        return Check("disk", DEGRADED, f"{message}, under the {_size(min_free_bytes)} minimum", details)
    return Check("disk", OK, message, details)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # SQLite: naive UTC


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
