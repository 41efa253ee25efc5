"""The outbox stage: DICOM results out to the ``[[destination]]`` tables (``dicom/outbox.py``).

Claims: the due outbox rows a round is sending (``claim_due``, under this daemon's id) until the
peer's answer is committed. Cadence: the sender process has its own loop; the daemon starts it with
itself and looks every ``model_poll_seconds`` whether it died (then it is restarted). Recovery: rows
claimed by a daemon no longer running are claimed again; a crash between a peer's acknowledgement
and its commit sends the same object (same SOP Instance UID) once more. Stop: the round in hand is
finished (``OutboxProcess.stop``). With ``--once`` and reports on: sent here after the reports
(``drain``).
"""

from __future__ import annotations

from meddaemon.daemon.stages import ChildProcessStage
from meddaemon.db.engine import with_lock_retry
from meddaemon.dicom.outbox import PENDING, OutboxProcess, OutboxSender, summary


class OutboxStage(ChildProcessStage):
    name = "outbox"
    label = "the outbox sender"
    kind = "outbox"
    #: after ``drain``: the objects still pending in the outbox (a destination down, backing off)
    waiting = 0

    def make_child(self) -> OutboxProcess:
        return OutboxProcess(self.settings, self.daemon_id)

    def drain(self) -> None:
        if not self.settings.reports:  # the objects are queued with the reports: none sent here
            return
        OutboxSender(self.settings, self.sessions, self.daemon_id).drain(self.should_stop)

        def pending() -> int:
            with self.sessions() as session:
                return summary(session).counts[PENDING]

        self.waiting = with_lock_retry(pending, should_stop=self.should_stop)
