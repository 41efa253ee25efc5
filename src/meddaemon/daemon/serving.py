"""The models stage: which model version serves each task follows the database without a restart.

Claims nothing itself. Cadence: the active versions are read every ``model_poll_seconds``; a version
not served yet is loaded in the loader's thread (``daemon/loader.py``) while the one it replaces
keeps serving, and swapped in at the first turn after its load finished, if the database, read
again then, still says it is the active version. Each poll, and each
swap, sweeps the database for scans the inference stage can now run (``InferenceStage.sweep``:
scans left ``routed`` by a previous run, ``waiting_model`` scans of a task just served). Recovery:
the first poll, before the first turn; with ``--once`` the loads are waited for then (nothing is
served meanwhile, so no scan is decoded twice: once for waiting, once again for its model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from meddaemon.daemon.inference import InferenceStage
from meddaemon.daemon.stages import Cadence, Stage
from meddaemon.db.queries import tasks_without_model

log = logging.getLogger("meddaemon.daemon")


class ModelStage(Stage):
    name = "models"

    def __init__(
        self,
        inference: InferenceStage,
        sessions: sessionmaker[Session],
        guarded: Callable[[Callable[[], object]], object],
        should_stop: Callable[[], bool],
        poll_seconds: float,
        once: bool,
    ) -> None:
        self.inference = inference
        self.sessions = sessions
        #: runs a read past other processes' locks and database outages (``Daemon.guarded``)
        self.guarded = guarded
        self.should_stop = should_stop
        self.polls = Cadence(poll_seconds)
        self.once = once

    def recover(self) -> None:
        if not self.once:  # --once imports torch only when there is work (an empty inbox ends at once)
            self.inference.start_engine()
        self._log_tasks_without_model()
        self.guarded(self.inference.refresh_models)
        if self.once:
            self.guarded(lambda: self.inference.wait_for_loads(self.should_stop))

    def tick(self, now: float, flush: bool) -> bool:
        if self.inference.collect_loads() or self.polls.due(now):  # a finished load is adopted on a fresh read
            self.guarded(self.inference.refresh_models)
            self.inference.sweep()
            self.polls.done(now)
        return False

    def next_deadline(self) -> float | None:
        return self.polls.next

    def _log_tasks_without_model(self) -> None:
        """Say which tasks have no active model: their scans wait (``waiting_model``) until one is promoted."""

        def read() -> dict[str, int]:
            with self.sessions() as session:
                return tasks_without_model(session)

        waiting: dict[str, int] = self.guarded(read)  # type: ignore[assignment]
        if waiting:
            log.log(
                logging.WARNING if any(waiting.values()) else logging.INFO,
                "no active model for %d task(s), their scans wait until one is promoted "
                "(medcli models import/promote, or medcli retrain TASK --promote): %s",
                len(waiting),
                ", ".join(f"{task} ({count} waiting)" for task, count in waiting.items()),
            )
