"""The receiver stage: DICOM network in (``dicom/receiver.py``, a C-STORE and C-ECHO SCP).

Claims: nothing in the database; the SCP writes each instance durably into the inbox (temporary
name, fsync, rename) before it answers success, and the intake stage takes the file from there with
its own claims. Cadence: the receiver is a child process with its own event loop; the daemon starts
it with itself (live runs with a ``dicom_port`` only) and looks every ``model_poll_seconds`` whether
it died (then it is restarted, with a doubling wait). Recovery: nothing to recover: a transfer cut by
a crash left only a temporary name, which the intake never reads, and the sender was never told
success. Stop: associations in progress are finished or aborted (``ReceiverProcess.stop``).
"""

from __future__ import annotations

from meddaemon.config import Settings
from meddaemon.daemon import lease
from meddaemon.daemon.metrics import DaemonMetrics
from meddaemon.daemon.stages import Cadence, Stage
from meddaemon.dicom.receiver import ReceiverProcess


class ReceiverStage(Stage):
    name = "receiver"

    def __init__(self, settings: Settings, node: str, metrics: DaemonMetrics) -> None:
        self.settings = settings
        self.node = node
        self.metrics = metrics
        self.cadence = Cadence(settings.model_poll_seconds)
        self.receiver: ReceiverProcess | None = None

    def start(self) -> None:
        self.receiver = ReceiverProcess(self.settings, self.node, lease.connection_limits(self.settings))
        self.receiver.start()
        self.metrics.watch_receiver(self.receiver.stats)

    def tick(self, now: float, flush: bool) -> bool:
        if self.receiver is not None and self.cadence.due(now):
            self.cadence.done(now)
            self.receiver.keep()
        return False

    def next_deadline(self) -> float | None:
        return self.cadence.next if self.receiver is not None else None

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
