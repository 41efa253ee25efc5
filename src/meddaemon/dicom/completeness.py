"""When is a study received over DICOM complete? Its instances arrive one by one, over minutes, and
nothing in the protocol says which is the last: as mercure does, a series is complete when no new
instance of it arrived for ``series_quiet_seconds``, and a study when all its series are.

Arrival times are the receiver's rows (``ReceivedInstance.received_at``), by the database's clock, so
that every daemon sharing the database judges alike. A study none of whose instances came over the
network (files dropped in the inbox) has no rows here and is complete as far as this module knows.
Study-level work (the study report) waits for completeness; per-image work (inference) does not.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meddaemon.db.clock import db_clock
from meddaemon.db.models import ReceivedInstance


@dataclass(frozen=True)
class SeriesArrival:
    study_instance_uid: str
    series_instance_uid: str
    instances: int
    #: seconds since the last instance of the series arrived, by the database's clock
    quiet_for: float
    complete: bool


def series_arrivals(session: Session, study_uids: Collection[str], quiet_seconds: float) -> list[SeriesArrival]:
    """Each series the receiver got instances of, in these studies: how many, and whether it is complete."""
    if not study_uids:
        return []
    quiet_for = db_clock() - func.max(ReceivedInstance.received_at)
    rows = session.execute(
        select(
            ReceivedInstance.study_instance_uid,
            ReceivedInstance.series_instance_uid,
            func.count(func.distinct(ReceivedInstance.sha256)),
            quiet_for,
        )
        .where(ReceivedInstance.study_instance_uid.in_(sorted(study_uids)))
        .group_by(ReceivedInstance.study_instance_uid, ReceivedInstance.series_instance_uid)
        .order_by(ReceivedInstance.study_instance_uid, ReceivedInstance.series_instance_uid)
    ).all()
    return [
        SeriesArrival(str(study), str(series or ""), int(count), float(quiet), float(quiet) >= quiet_seconds)
        for study, series, count, quiet in rows
    ]


def studies_still_arriving(session: Session, study_uids: Collection[str], quiet_seconds: float) -> dict[str, float]:
    """Of these studies, those with a series not yet complete: study UID -> seconds until it may be."""
    left: dict[str, float] = {}
    for series in series_arrivals(session, study_uids, quiet_seconds):
        if not series.complete:
            wait = quiet_seconds - series.quiet_for
            left[series.study_instance_uid] = max(left.get(series.study_instance_uid, 0.0), wait)
    return left


@dataclass(frozen=True)
class ArrivalSummary:
    """What the receiver got lately, for ``meddaemon health``."""

    instances_last_hour: int
    #: seconds since the last instance arrived; None: none ever did
    last_arrival_seconds: float | None
    series_arriving: int
    studies_arriving: int


def arrival_summary(session: Session, quiet_seconds: float) -> ArrivalSummary:
    now = db_clock()
    recent, last = session.execute(
        select(
            func.count().filter(ReceivedInstance.received_at >= now - 3600.0),
            now - func.max(ReceivedInstance.received_at),
        )
    ).one()
    arriving = session.execute(
        select(ReceivedInstance.study_instance_uid, ReceivedInstance.series_instance_uid)
        .where(ReceivedInstance.received_at >= now - quiet_seconds)
        .distinct()
    ).all()
    return ArrivalSummary(
        instances_last_hour=int(recent or 0),
        last_arrival_seconds=None if last is None else float(last),
        series_arriving=len(arriving),
        studies_arriving=len({study for study, _ in arriving}),
    )
