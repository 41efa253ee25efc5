"""Which sender sent a scan, and which version of its instance it is (``medcli scans``).

A scan is joined to the receiver's rows (``ReceivedInstance``) by the SHA-256 of its bytes: the
identity the intake registers it under, which no move (inbox, work/, archive/) changes. The same
bytes received twice are one scan (the second a duplicate arrival) with two rows; the first row says
who sent it first. Versions: the distinct contents received for one SOP Instance UID, numbered in
the order they first arrived; a correction resent by a PACS is version 2, and both keep their results.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meddaemon.db.models import ReceivedInstance


@dataclass(frozen=True)
class Provenance:
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int
    association_at: datetime
    received_at: datetime
    sop_instance_uid: str
    #: this content's number among the distinct contents received for its SOP Instance UID
    version: int
    versions: int
    #: how many times these very bytes were received
    receptions: int

    def describe(self) -> str:
        text = f"from {self.calling_ae}@{self.peer_address}"
        if self.versions > 1:
            text += f", version {self.version} of {self.sop_instance_uid}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def provenance(session: Session, shas: Collection[str]) -> dict[str, Provenance]:
    """The first reception of each of these contents (SHA-256) that came over the network."""
    shas = sorted({s for s in shas if s})
    if not shas:
        return {}
    first = select(func.min(ReceivedInstance.id)).where(ReceivedInstance.sha256.in_(shas))
    rows = session.scalars(
        select(ReceivedInstance).where(ReceivedInstance.id.in_(first.group_by(ReceivedInstance.sha256)))
    ).all()
    counts = dict(
        session.execute(
            select(ReceivedInstance.sha256, func.count())
            .where(ReceivedInstance.sha256.in_(shas))
            .group_by(ReceivedInstance.sha256)
        ).all()
    )
    versions = _versions(session, {row.sop_instance_uid for row in rows})
    out: dict[str, Provenance] = {}
    for row in rows:
        contents = versions[row.sop_instance_uid]
        out[row.sha256] = Provenance(
            calling_ae=row.calling_ae,
            called_ae=row.called_ae,
            peer_address=row.peer_address,
            peer_port=row.peer_port,
            association_at=row.association_at,
            received_at=datetime.fromtimestamp(row.received_at, UTC),
            sop_instance_uid=row.sop_instance_uid,
            version=contents.index(row.sha256) + 1,
            versions=len(contents),
            receptions=int(counts.get(row.sha256, 1)),
        )
    return out


def _versions(session: Session, uids: Collection[str]) -> dict[str, list[str]]:
    """For each SOP Instance UID, its distinct contents (SHA-256) in the order they first arrived."""
    if not uids:
        return {}
    rows = session.execute(
        select(ReceivedInstance.sop_instance_uid, ReceivedInstance.sha256, func.min(ReceivedInstance.id))
        .where(ReceivedInstance.sop_instance_uid.in_(sorted(uids)))
        .group_by(ReceivedInstance.sop_instance_uid, ReceivedInstance.sha256)
        .order_by(func.min(ReceivedInstance.id))
    ).all()
    versions: dict[str, list[str]] = {uid: [] for uid in uids}
    for uid, sha, _ in rows:
        versions[uid].append(sha)
    return versions
