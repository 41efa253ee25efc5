"""The life of a scan (docs/design.md section 3) as a state machine.

``discovered`` and ``stable`` live in the daemon's memory: until a file is registered, the file in
the inbox is its own durable record, and a restart rediscovers it. From ``registered`` on, the row in
the database is the source of truth.
"""

from __future__ import annotations

from enum import StrEnum


class ScanState(StrEnum):
    DISCOVERED = "discovered"
    STABLE = "stable"
    REGISTERED = "registered"
    ROUTED = "routed"
    WAITING_MODEL = "waiting_model"
    INFERRED = "inferred"
    REPORTED = "reported"
    ARCHIVED = "archived"
    FAILED = "failed"
    #: read in place by ``medcli evaluate`` and scored there: never in the daemon's pipeline (no
    #: report, no archive; ``stored_path`` is None and ``source_path`` says where the file lies)
    EVALUATED = "evaluated"


S = ScanState

TRANSITIONS: dict[ScanState, frozenset[ScanState]] = {
    S.DISCOVERED: frozenset({S.STABLE, S.FAILED}),
    S.STABLE: frozenset({S.REGISTERED, S.FAILED}),
    S.REGISTERED: frozenset({S.ROUTED, S.FAILED}),
    S.ROUTED: frozenset({S.WAITING_MODEL, S.INFERRED, S.FAILED}),
    S.WAITING_MODEL: frozenset({S.ROUTED, S.FAILED}),
    S.INFERRED: frozenset({S.REPORTED, S.FAILED}),
    S.REPORTED: frozenset({S.ARCHIVED}),
    S.ARCHIVED: frozenset(),
    S.FAILED: frozenset(),
    S.EVALUATED: frozenset(),
}

#: States a scan rests in: nothing more happens to it without an outside change.
SETTLED = frozenset({S.ARCHIVED, S.FAILED, S.WAITING_MODEL, S.EVALUATED})
#: States stored in the database.
PERSISTED = frozenset(ScanState) - {S.DISCOVERED, S.STABLE}


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: ScanState, new: ScanState) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a scan cannot go from {current.value} to {new.value}")
