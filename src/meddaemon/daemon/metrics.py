"""A Prometheus endpoint: what the database says about all the daemons, and what this daemon did.

Two sources, one registry per server (never the process-wide default, so that two servers in one
process, as in the tests, do not collide):

- ``DatabaseCollector`` reads the shared database on every scrape, in one short read-only session
  (``db.readonly``): scans per state (the queue depth of each stage), failed scans by reason, the
  active model versions, the daemons and the age of their heartbeats by the database's clock,
  throughput over the last minute and latency quantiles over recent results. Every daemon exposes
  the same numbers: aggregate these with ``max``, never ``sum``. A database that cannot be read
  gives ``meddaemon_database_up 0`` and a 200, so the scrape itself still tells what is wrong.
- ``DaemonMetrics``: counters this daemon updates as it works (files recorded by outcome, scans
  inferred, their latencies, files waiting in the inbox) and those of its DICOM receiver
  (associations, instances stored or refused, bytes); these are per daemon and sum across them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import URL, Engine, distinct, func, select
from sqlalchemy.orm import Session

from meddaemon.config import ConfigError
from meddaemon.daemon.lease import RunningDaemon, running_daemons
from meddaemon.daemon.stages import Stage
from meddaemon.db.models import DaemonInstance, InboxClaim, ModelVersion, Report, Result, Scan, utcnow
from meddaemon.db.queries import moves_waiting, waiting_since
from meddaemon.db.readonly import OBSERVER_STATEMENT_SECONDS, read_only_engine
from meddaemon.dicom.outbox import QueueSummary
from meddaemon.dicom.outbox import summary as outbox_summary
from meddaemon.dicom.receiver import ReceiverStats
from meddaemon.failures import FailureReason
from meddaemon.logs import error_line
from meddaemon.states import PERSISTED

log = logging.getLogger("meddaemon.metrics")

#: Drop-to-result latency buckets, in seconds: an idle daemon answers in well under a second, a
#: backlog in minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
QUANTILES = (0.5, 0.9, 0.99)
#: States a scan waits in for a daemon to act on it; their oldest member's age shows a stuck stage.
WAITING_STATES = ("registered", "waiting_model", "routed", "inferred", "reported")
#: Time windows over results and reports look at most this many of their latest rows (by id): neither
#: table has an index on ``created_at``, and a scrape must not scan them whole. 200,000 result rows
#: are over 14,000 scans of the 14-label task, far more than a minute's work.
RECENT_ROWS = 200_000


class DaemonMetrics:
    """What one daemon counts as it works; the daemon calls these from its main loop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._files = Counter(
            "meddaemon_files_recorded",
            "Inbox files this daemon recorded, by outcome (the state the scan was recorded in, 'duplicate', "
            "or 'failed') and failure reason ('' when it did not fail).",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self._inferred = Counter(
            "meddaemon_scans_inferred",
            "Scans this daemon ran through a model and stored results for.",
            registry=self.registry,
        )
        self._latency = Histogram(
            "meddaemon_inference_latency_seconds",
            "Time from a scan's discovery in the inbox to its stored result, for scans this daemon inferred.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        #: this daemon's own view of the database (``daemon.outage``): False while it waits out an outage
        self.database_up = True
        self._waiting = Gauge(
            "meddaemon_inbox_waiting_files",
            "Files this daemon has seen in the inbox but not yet read (waiting to be complete or for a worker).",
            registry=self.registry,
        )
        self._unlisted = Gauge(
            "meddaemon_inbox_unlisted_folders",
            "Folders of the inbox this daemon's last full scan could not list (their files wait unread).",
            registry=self.registry,
        )
        self._restarts = Counter(
            "meddaemon_child_process_restarts",
            "Child processes of this daemon (report, outbox) that died and were started again: a crash loop "
            "shows here as well as in the log.",
            ["process"],
            registry=self.registry,
        )
        self._receiver = ReceiverCollector()
        self.registry.register(self._receiver)

    def watch_receiver(self, stats: ReceiverStats) -> None:
        """Expose the counters of this daemon's DICOM receiver (``dicom.receiver``)."""
        self._receiver.stats = stats

    def files_recorded(self, state: str, reason: str | None = None) -> None:
        self._files.labels(outcome=state, reason=reason or "").inc()

    def results_stored(self, count: int, latencies_ms: Sequence[float | None] = ()) -> None:
        """``count`` scans got their results; ``latencies_ms`` are their drop-to-result times (None: unknown)."""
        if count:
            self._inferred.inc(count)
        for latency in latencies_ms:
            if latency is not None:
                self._latency.observe(latency / 1000.0)

    def watch_child(self, kind: str) -> None:
        """A child process (``report``, ``outbox``) this daemon starts again if it dies: its restarts
        are counted from 0 (a series that appeared only at the first restart was "no data" to a rule
        or a dashboard until then)."""
        self._restarts.labels(process=kind)

    def child_restarted(self, kind: str) -> None:
        self._restarts.labels(process=kind).inc()

    def inbox_waiting(self, n: int) -> None:
        self._waiting.set(n)

    def inbox_unlisted(self, n: int) -> None:
        self._unlisted.set(n)

    def database_reachable(self, up: bool) -> None:
        self.database_up = up


class ReceiverCollector(Collector):
    """The DICOM receiver's counters, read from the memory its process shares with the daemon."""

    def __init__(self) -> None:
        self.stats: ReceiverStats | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            return
        s = self.stats.snapshot()
        up = GaugeMetricFamily(
            "meddaemon_dicom_receiver_up", "1 while this daemon's DICOM receiver (C-STORE SCP) listens, else 0."
        )
        up.add_metric([], s["up"])
        yield up
        active = GaugeMetricFamily("meddaemon_dicom_associations_open", "DICOM associations open now.")
        active.add_metric([], s["active"])
        yield active
        associations = CounterMetricFamily(
            "meddaemon_dicom_associations",
            "DICOM associations by outcome: accepted, rejected (calling_ae not allowed, called_ae not ours, "
            "limit reached) and aborted (of those accepted).",
            labels=["outcome"],
        )
        for outcome in ("accepted", "rejected_calling_ae", "rejected_called_ae", "rejected_limit", "aborted"):
            associations.add_metric([outcome], s[outcome])
        yield associations
        instances = CounterMetricFamily(
            "meddaemon_dicom_instances",
            "C-STORE requests by answer: stored (0x0000, the file durable in the inbox), out_of_resources "
            "(0xA700: low disk, database unavailable), does_not_match (0xA900: not the instance the request names), "
            "cannot_understand (0xC000), processing_failure (0x0110).",
            labels=["status"],
        )
        for status in ("stored", "out_of_resources", "does_not_match", "cannot_understand", "processing_failure"):
            instances.add_metric([status], s[status])
        yield instances
        received = CounterMetricFamily(
            "meddaemon_dicom_received_bytes", "Bytes of the instances stored (File Meta included)."
        )
        received.add_metric([], s["bytes"])
        yield received
        contexts = CounterMetricFamily(
            "meddaemon_dicom_presentation_contexts_rejected",
            "Presentation contexts refused to senders (a SOP class not accepted, or only transfer syntaxes not "
            "decodable here proposed): the instances they would carry cannot be sent; the log names each.",
        )
        contexts.add_metric([], s["contexts_rejected"])
        yield contexts


@dataclass
class DatabaseSnapshot:
    """Everything one scrape reads, in one read-only transaction."""

    states: dict[str, int]
    failures_by_reason: dict[str, int]
    active_models: list[tuple[str, str, str, str]]
    daemons_by_state: dict[str, int]
    running: list[RunningDaemon]
    inbox_claims: int
    throughput: dict[str, float]
    latency_quantiles: dict[float, float]
    latency_sample: int
    oldest_waiting: dict[str, float] = field(default_factory=dict)
    #: files whose move is committed and not carried out (``db.queries.moves_waiting``)
    moves_waiting: int = 0
    #: the DICOM outbox (issue 14): items per status and the oldest pending one's age
    outbox: QueueSummary | None = None


def read_snapshot(
    session: Session, window_seconds: float = 60.0, latency_window_seconds: float = 600.0, latency_limit: int = 10_000
) -> DatabaseSnapshot:
    """Read the numbers a scrape exposes; ``session`` should be read-only (nothing here writes).

    Row times (``registered_at``, ``created_at``) are written by each node's own clock, so windows
    over them use this node's clock; daemon heartbeats use the database's.
    """
    now = utcnow()
    states = {state.value: 0 for state in sorted(PERSISTED)}
    for state, count in session.execute(select(Scan.state, func.count()).group_by(Scan.state)):
        states[str(state)] = int(count)
    failures = {
        str(reason or "unknown"): int(count)
        for reason, count in session.execute(
            select(Scan.failure_reason, func.count()).where(Scan.state == "failed").group_by(Scan.failure_reason)
        )
    }
    models = [
        (str(t), str(v), str(a), str(s))
        for t, v, a, s in session.execute(
            select(ModelVersion.task_name, ModelVersion.version, ModelVersion.architecture, ModelVersion.sha256)
            .where(ModelVersion.status == "active")
            .order_by(ModelVersion.task_name)
        )
    ]
    daemons_by_state = {"running": 0, "stopped": 0, "lost": 0}
    for state, count in session.execute(select(DaemonInstance.state, func.count()).group_by(DaemonInstance.state)):
        daemons_by_state[str(state)] = int(count)
    running = running_daemons(session)
    claims = session.scalar(select(func.count()).select_from(InboxClaim).where(InboxClaim.done_at.is_(None))) or 0

    since = now - timedelta(seconds=window_seconds)
    registered = session.scalar(select(func.count()).where(Scan.registered_at >= since)) or 0
    recent_results = Result.id > _recent_floor(Result.id)  # created_at has no index: bound the rows by id
    inferred = (
        session.scalar(select(func.count(distinct(Result.scan_id))).where(recent_results, Result.created_at >= since))
        or 0
    )
    reported = (
        session.scalar(
            select(func.count()).where(
                Report.id > _recent_floor(Report.id), Report.kind == "scan", Report.created_at >= since
            )
        )
        or 0
    )
    throughput = {
        "registered": registered / window_seconds,
        "inferred": inferred / window_seconds,
        "reported": reported / window_seconds,
    }

    # one latency per inference call (a scan's labels share it), the most recent first
    latency = func.max(Result.latency_ms)
    latencies = [
        float(v)  # type: ignore[arg-type]  # the query keeps rows with a latency only
        for (v,) in session.execute(
            select(latency)
            .where(recent_results, Result.created_at >= now - timedelta(seconds=latency_window_seconds))
            .where(Result.latency_ms.is_not(None))
            .group_by(Result.scan_id, Result.model_version_id)
            .order_by(func.max(Result.created_at).desc())
            .limit(latency_limit)
        )
    ]
    oldest = {
        state: max(0.0, (now - _aware(at)).total_seconds())
        for state, at in waiting_since(session, WAITING_STATES).items()
    }
    return DatabaseSnapshot(
        states=states,
        failures_by_reason=failures,
        active_models=models,
        daemons_by_state=daemons_by_state,
        running=running,
        inbox_claims=int(claims),
        throughput=throughput,
        latency_quantiles={q: quantile(latencies, q) / 1000.0 for q in QUANTILES} if latencies else {},
        latency_sample=len(latencies),
        oldest_waiting=oldest,
        moves_waiting=moves_waiting(session)[0],
        outbox=outbox_summary(session),
    )


def _recent_floor(column: Any) -> Any:
    """``max(id) - RECENT_ROWS``: rows above it are the latest, found through the primary key."""
    return select(func.coalesce(func.max(column), 0) - RECENT_ROWS).scalar_subquery()


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written in UTC (``models.utcnow``)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class DatabaseCollector(Collector):
    """Reads the shared database on each scrape; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        window_seconds: float = 60.0,
        latency_window_seconds: float = 600.0,
        daemon: DaemonMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.daemon = daemon
        self.window_seconds = window_seconds
        self.latency_window_seconds = latency_window_seconds
        self._lock = threading.Lock()  # one scrape at a time: no pile-up of sessions on a slow database
        #: the reads, in a thread of their own so that a scrape answers by its deadline whatever they do
        self._reads = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meddaemon-metrics-read")

    def _read(self) -> DatabaseSnapshot:
        with Session(self.engine) as session, session.begin():
            return read_snapshot(session, self.window_seconds, self.latency_window_seconds)

    def close(self) -> None:
        self._reads.shutdown(wait=False)

    def describe(self) -> Iterable[Metric]:
        return []  # families are dynamic; registering must not read the database

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        snapshot = None
        if self.daemon is not None and not self.daemon.database_up:
            pass  # the daemon is waiting out an outage: said at once, without a read that would wait too
        elif self._lock.acquire(timeout=SCRAPE_WAIT_SECONDS):  # a scrape still reading: this one says down
            reading = self._reads.submit(self._read)
            try:
                snapshot = reading.result(timeout=SCRAPE_READ_SECONDS)
            except futures.TimeoutError:  # a link frozen mid-read, which no timeout of the server ends
                log.warning("metrics: the database did not answer within %.0f s", SCRAPE_READ_SECONDS)
            except Exception as exc:  # any failure to read is "down", reported in the scrape
                log.warning("metrics: cannot read the database: %s", error_line(exc))
            finally:  # the next scrape reads once this read has ended, however late
                reading.add_done_callback(lambda _: self._lock.release())
        up = GaugeMetricFamily(
            "meddaemon_database_up",
            "1 when the last scrape could read the database and this daemon's transactions get through "
            "(it is not waiting out an outage), else 0.",
        )
        daemon_up = self.daemon is None or self.daemon.database_up
        up.add_metric([], 1.0 if snapshot is not None and daemon_up else 0.0)
        yield up
        duration = GaugeMetricFamily(
            "meddaemon_database_scrape_seconds", "How long reading the database for this scrape took."
        )
        duration.add_metric([], time.perf_counter() - started)
        yield duration
        if snapshot is not None:
            yield from self._families(snapshot)

    def _families(self, snap: DatabaseSnapshot) -> Iterator[Metric]:
        scans = GaugeMetricFamily(
            "meddaemon_scans",
            "Scans in the database by state: the queue depth of each stage (routed: waiting for inference, "
            "inferred: waiting for a report, reported: waiting to be archived, waiting_model: no active model).",
            labels=["state"],
        )
        for state, count in sorted(snap.states.items()):
            scans.add_metric([state], count)
        yield scans

        failed = CounterMetricFamily(
            "meddaemon_scans_failed",
            "Failed scans in the database by reason code (failed is final: this only grows).",
            labels=["reason"],
        )
        every_reason = dict.fromkeys((reason.value for reason in FailureReason), 0)  # a series from the start
        for reason, count in sorted({**every_reason, **snap.failures_by_reason}.items()):
            failed.add_metric([reason], count)
        yield failed

        models = GaugeMetricFamily(
            "meddaemon_model_info",
            "The active model version of each task (value 1); its labels say which weights answer.",
            labels=["task", "version", "architecture", "sha256"],
        )
        for row in snap.active_models:
            models.add_metric(list(row), 1.0)
        yield models

        daemons = GaugeMetricFamily(
            "meddaemon_daemons",
            "Daemon runs recorded in the database by state (running, stopped, lost).",
            labels=["state"],
        )
        for state, count in sorted(snap.daemons_by_state.items()):
            daemons.add_metric([state], count)
        yield daemons

        alive = GaugeMetricFamily(
            "meddaemon_daemons_alive",
            "Running daemons whose heartbeat is within their lease by the database's clock.",
        )
        alive.add_metric([], sum(1 for d in snap.running if d.heartbeat_age < d.lease_seconds))
        yield alive

        labels = ["daemon", "node", "pid", "version"]
        age = GaugeMetricFamily(
            "meddaemon_daemon_heartbeat_age_seconds",
            "Seconds since each running daemon's last heartbeat, by the database's clock "
            "(past meddaemon_daemon_lease_seconds it counts as lost).",
            labels=labels,
        )
        lease = GaugeMetricFamily(
            "meddaemon_daemon_lease_seconds", "How long each running daemon's heartbeat stays valid.", labels=labels
        )
        for d in snap.running:
            values = [str(d.id), d.node, str(d.pid), d.version]
            age.add_metric(values, d.heartbeat_age)
            lease.add_metric(values, d.lease_seconds)
        yield age
        yield lease

        claims = GaugeMetricFamily(
            "meddaemon_inbox_claims", "Inbox files a daemon has claimed and is reading or moving right now."
        )
        claims.add_metric([], snap.inbox_claims)
        yield claims

        moves = GaugeMetricFamily(
            "meddaemon_moves_waiting",
            "Files whose move (into archive/ or failed/) is committed and not yet done: more than a moment, a folder "
            "the daemons cannot write or a disk below its reserve (each is tried again at every rescan).",
        )
        moves.add_metric([], snap.moves_waiting)
        yield moves

        throughput = GaugeMetricFamily(
            "meddaemon_throughput_scans_per_second",
            f"Scans per second over the last {self.window_seconds:g} s, all daemons together, by stage "
            "(registered, inferred, reported).",
            labels=["stage"],
        )
        for stage, rate in sorted(snap.throughput.items()):
            throughput.add_metric([stage], rate)
        yield throughput

        latency = GaugeMetricFamily(
            "meddaemon_recent_latency_seconds",
            f"Drop-to-result latency quantiles over the results of the last {self.latency_window_seconds:g} s, "
            "all daemons together (absent when there were none).",
            labels=["quantile"],
        )
        for q, value in sorted(snap.latency_quantiles.items()):
            latency.add_metric([f"{q:g}"], value)
        yield latency
        sample = GaugeMetricFamily(
            "meddaemon_recent_latency_scans", "How many inference results the latency quantiles were computed over."
        )
        sample.add_metric([], snap.latency_sample)
        yield sample

        oldest = GaugeMetricFamily(
            "meddaemon_oldest_waiting_seconds",
            "Age of the oldest scan in each state a scan waits in, since it entered it (a growing value: a stuck "
            "stage; waiting_model: no active model, or one no daemon could load).",
            labels=["state"],
        )
        for state in WAITING_STATES:
            oldest.add_metric([state], snap.oldest_waiting.get(state, 0.0))
        yield oldest
        if snap.outbox is not None:
            yield from _outbox_families(snap.outbox)


def _outbox_families(queue: QueueSummary) -> Iterator[Metric]:
    items = GaugeMetricFamily(
        "meddaemon_outbox_items",
        "DICOM outputs in the outbox, per status (pending, delivered, dead).",
        labels=["status"],
    )
    for status, count in sorted(queue.counts.items()):
        items.add_metric([status], count)
    yield items
    oldest = GaugeMetricFamily(
        "meddaemon_outbox_oldest_pending_seconds",
        "Seconds since the oldest pending DICOM output was queued or last retried (0: none).",
    )
    oldest.add_metric([], queue.oldest_pending_seconds or 0.0)
    yield oldest


class MetricsServer:
    """A running endpoint: ``port`` is the one bound (useful with port 0); ``stop()`` shuts it down."""

    def __init__(
        self, server: Any, thread: threading.Thread, registry: CollectorRegistry, collector: DatabaseCollector
    ) -> None:
        self._server = server
        self._thread = thread
        self._registry = registry
        self._collector = collector
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._registry.unregister(self._collector)
        self._collector.close()
        self._collector.engine.dispose()


#: the longest a scrape waits for the one before it to finish reading, then for its own read: the
#: scrape says the database is down after both (Prometheus gives up at 10 s)
SCRAPE_WAIT_SECONDS = 2.0
SCRAPE_READ_SECONDS = 5.0


def start_metrics_server(
    host: str,
    port: int,
    engine: Engine | URL | str,
    metrics: DaemonMetrics | None = None,
    window_seconds: float = 60.0,
    busy_timeout: float = 5.0,
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (0: any free port) from a thread of its own.

    The collector reads through a read-only engine of its own on the same database as ``engine``
    (the daemon's engine takes SQLite's write lock at every BEGIN; a scrape must not).
    """
    url = engine.url if isinstance(engine, Engine) else engine
    reader = read_only_engine(url, busy_timeout=busy_timeout, statement_timeout=OBSERVER_STATEMENT_SECONDS)
    registry = metrics.registry if metrics is not None else CollectorRegistry()
    collector = DatabaseCollector(reader, window_seconds=window_seconds, daemon=metrics)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except BaseException:
        registry.unregister(collector)
        reader.dispose()
        raise
    thread.name = "meddaemon-metrics"
    handle = MetricsServer(server, thread, registry, collector)
    log.info("metrics on %s", handle.url)
    return handle


class MetricsStage(Stage):
    """The endpoint as a stage of the daemon (``metrics_port``, not with ``--once``): served from a
    thread of its own from start to close. Claims nothing and has no cadence: a scrape reads the
    database then."""

    name = "metrics"

    def __init__(self, host: str, port: int, engine: Engine, metrics: DaemonMetrics, busy_timeout: float) -> None:
        self.host = host
        self.port = port
        self.engine = engine
        self.metrics = metrics
        self.busy_timeout = busy_timeout
        self.server: MetricsServer | None = None

    def start(self) -> None:
        try:
            self.server = start_metrics_server(
                self.host, self.port, self.engine, self.metrics, busy_timeout=self.busy_timeout
            )
        except OSError as exc:  # the port taken, a host that is not this machine's: a traceback, exit 1
            raise ConfigError(
                f"settings 'metrics_host' and 'metrics_port': the metrics endpoint cannot listen on "
                f"{self.host or '*'}:{self.port}: {exc.strerror or exc}"
            ) from exc
        logging.getLogger("meddaemon.daemon").info("metrics on %s", self.server.url)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
