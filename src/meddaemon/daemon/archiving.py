"""The archive stage: reported scans leave work/ for archive/ (commit, then move, then mark done).

Claims: the reported scans of a batch (``bookkeeper.claim_for_archive``, under this daemon's id),
from the commit that says ``archived`` until their move is carried out. Cadence: every
``model_poll_seconds``, up to ``ARCHIVE_BATCHES_PER_POLL`` batches, before the loop turns to new
files again; with ``--once``, everything reported once the reports are drained. Recovery: a move
committed and not carried out (a crash, a failed move) is finished by ``Daemon.recover`` with the
other committed moves. Stop: nothing in hand between turns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from meddaemon.daemon import bookkeeper
from meddaemon.daemon.bookkeeper import Destinations, PlannedMove
from meddaemon.daemon.filing import CarriedOut
from meddaemon.daemon.inference import Commit
from meddaemon.daemon.stages import Cadence, Stage

log = logging.getLogger("meddaemon.daemon")

#: batches of reported scans archived per poll at most, before the loop turns to new files again
ARCHIVE_BATCHES_PER_POLL = 8


class ArchiveStage(Stage):
    name = "archive"

    def __init__(
        self,
        destinations: Destinations,
        batch_size: int,
        commit: Commit,
        carry_out: Callable[[list[PlannedMove]], CarriedOut],
        daemon_id: int | None,
        poll_seconds: float,
        after_reports: bool,
    ) -> None:
        self.destinations = destinations
        self.batch_size = batch_size
        self.commit = commit
        self.carry_out = carry_out
        self.daemon_id = daemon_id
        self.polls = Cadence(poll_seconds)
        #: ``--once`` archives everything at the end only after a drain of the reports
        self.after_reports = after_reports

    def tick(self, now: float, flush: bool) -> bool:
        if self.polls.due(now):
            self.polls.done(now)
            for _ in range(ARCHIVE_BATCHES_PER_POLL):
                if self.archive_reported() < self.batch_size:
                    break
        return False

    def next_deadline(self) -> float | None:
        return self.polls.next

    def drain(self) -> None:
        if self.after_reports:
            while self.archive_reported():
                pass

    def archive_reported(self) -> int:
        """Move up to a batch of reported scans from work/ to archive/ (commit, then move); returns how many."""

        def claim(session: Session) -> list[PlannedMove]:
            return bookkeeper.claim_for_archive(session, self.destinations, self.batch_size, self.daemon_id)

        moves = self.commit(claim)
        if moves:
            moved = self.carry_out(moves).moved
            held_back = f"; {len(moves) - moved} held back (each named above, tried again at each rescan)"
            log.info("archived %d reported scans%s", moved, held_back if moved < len(moves) else "")
        return len(moves)
