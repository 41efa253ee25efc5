"""Sending failed scans back through the inbox, once their cause is fixed (``medcli retry``).

The kept original (``failed/<name>``) is copied back into the watch folder under the name it
arrived with (so a task folder routes it the same way), whole (a dot name linked into place). The
failed scan stays failed, with ``retried_at`` and a step in its history saying where its file went;
the daemon then records the arrival as a new attempt (new arrivals are not de-duplicated against
failed scans, ``bookkeeper.record_batch``).

Each scan is one transaction: its row locked and marked, the original read whole and checked
against the scan's SHA-256 (``original_unreadable``, ``original_changed``), the copy placed in the
inbox, the commit; then the original and its ``.reason.json`` removed from ``failed/``, then its
``stored_path`` cleared. A crash before the commit leaves the original in ``failed/`` and at worst a
copy in the inbox (a new attempt; a second retry of the same scan then arrives as its duplicate); a
crash after it leaves the original named by its row, and the next retry removes it first
(``finish_interrupted_retries``). Nothing is ever lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from meddaemon.config import Settings
from meddaemon.daemon import bookkeeper, filing
from meddaemon.db.engine import transaction, with_lock_retry
from meddaemon.db.models import Scan, ScanEvent, row_id, utcnow
from meddaemon.failures import FailureReason
from meddaemon.states import ScanState

log = logging.getLogger("meddaemon.daemon")

#: names tried in the inbox before giving up (the name it arrived with, then ``__retry<id>[_n]``)
NAME_ATTEMPTS = bookkeeper.RETURN_NAMES


class Refusal(StrEnum):
    UNKNOWN_SCAN = "unknown_scan"
    UNKNOWN_REASON = "unknown_reason"
    NOT_FAILED = "not_failed"
    ALREADY_RETRIED = "already_retried"
    ORIGINAL_GONE = "original_gone"
    ORIGINAL_IS_A_LINK = "original_is_a_link"
    ORIGINAL_NOT_A_FILE = "original_not_a_file"
    FAILED_AGAIN = "failed_again"
    ORIGINAL_UNREADABLE = "original_unreadable"
    ORIGINAL_CHANGED = "original_changed"
    MOVE_PENDING = "move_pending"
    INBOX_MISSING = "inbox_missing"
    INBOX_UNWRITABLE = "inbox_unwritable"


#: refusals no later retry can overcome by itself: the kept original is a link, gone, no regular
#: file (a FIFO) or changed (``Selector.bulk`` leaves such scans alone rather than failing every
#: scheduled run on them)
LASTING_REFUSALS = frozenset(
    {Refusal.ORIGINAL_IS_A_LINK, Refusal.ORIGINAL_GONE, Refusal.ORIGINAL_NOT_A_FILE, Refusal.ORIGINAL_CHANGED}
)
#: what a bulk selection leaves alone: those, and a scan another retry sent back since it was
#: selected (two scheduled runs, or a run and a click in the console, at once: both exited 2)
LEFT_ALONE_IN_BULK = LASTING_REFUSALS | {Refusal.ALREADY_RETRIED}


@dataclass(frozen=True)
class Selector:
    """Which failed scans to retry: one scan (``scan``: its id or SHA-256), those that failed with one
    reason code (``reason``), or all of them (``all_failed``). Exactly one is given."""

    scan: str | None = None
    reason: str | None = None
    all_failed: bool = False
    #: a bulk selection also takes the scans whose file (its bytes; by name, one never read) already
    #: failed the same way after a retry
    #: (left alone otherwise: a schedule sent a corrupt file back at every run, a new failed row each time)
    again: bool = False

    def __post_init__(self) -> None:
        given = (self.scan is not None) + (self.reason is not None) + self.all_failed
        if given != 1:
            raise ValueError("give exactly one of a scan (id or SHA-256), a reason code, or all_failed")
        if self.again and not self.bulk:
            raise ValueError("again is for a reason code or all_failed: a scan named is retried whatever it did before")

    @property
    def bulk(self) -> bool:
        """Every failed scan, or those of a reason code: what a scheduled retry selects."""
        return self.scan is None


@dataclass(frozen=True)
class Requeued:
    scan_id: int
    source_name: str
    failure_reason: str | None
    #: where the kept original was (failed/) and where its copy now is (the inbox)
    original: Path
    inbox_path: Path
    #: why the original stays in failed/ after its copy went back (the next retry removes it); None: removed
    left_in_failed: str | None = None


@dataclass(frozen=True)
class Refused:
    code: Refusal
    message: str
    scan_id: int | None = None


@dataclass
class RetryResult:
    requeued: list[Requeued] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    #: failed scans a bulk selection left alone: their file was never kept (``vanished``)
    without_original: int = 0
    #: failed scans a bulk selection left alone as no retry can send them back (``LASTING_REFUSALS``):
    #: a scheduled ``--all-failed`` exited 2 at every run once there was one, for ever
    left_alone: list[Refused] = field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        """Everything selected was requeued (or, with ``dry_run``, would be), or left alone."""
        return not self.refused

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "requeued": [
                {
                    "scan_id": r.scan_id,
                    "source_name": r.source_name,
                    "failure_reason": r.failure_reason,
                    "original": str(r.original),
                    "inbox_path": str(r.inbox_path),
                    "left_in_failed": r.left_in_failed,
                }
                for r in self.requeued
            ],
            "refused": [{"scan_id": r.scan_id, "code": r.code.value, "message": r.message} for r in self.refused],
            "left_alone": [{"scan_id": r.scan_id, "code": r.code.value, "message": r.message} for r in self.left_alone],
            "without_original": self.without_original,
        }


def retry_failed(
    sessions: sessionmaker[Session],
    settings: Settings,
    selector: Selector,
    dry_run: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> RetryResult:
    """Send the failed scans ``selector`` names back into ``settings.watch``; with ``dry_run``, only
    say what would happen. Scans that cannot be retried are refused with a named reason; a bulk
    selection leaves those no retry can send back alone (``LASTING_REFUSALS``), named. Unless
    ``dry_run``, the removals a killed retry left unfinished are done first. ``should_stop``: when to
    stop waiting for another writer's lock (the lock error is raised then)."""
    result = RetryResult(dry_run=dry_run)
    if not dry_run:
        with_lock_retry(lambda: finish_interrupted_retries(sessions, settings), should_stop=should_stop)
    scan_ids = with_lock_retry(lambda: _selected(sessions, selector, result), should_stop=should_stop)
    for scan_id in scan_ids:
        outcome = with_lock_retry(
            lambda scan_id=scan_id: _requeue(sessions, settings, scan_id, dry_run), should_stop=should_stop
        )
        if isinstance(outcome, Requeued):
            result.requeued.append(outcome)
        elif selector.bulk and outcome.code in LEFT_ALONE_IN_BULK:
            result.left_alone.append(outcome)
        else:
            result.refused.append(outcome)
    return result


def _selected(sessions: sessionmaker[Session], selector: Selector, result: RetryResult) -> list[int]:
    """``_select`` in a session of its own, to be tried again past a lock (a refusal is added only
    after the reads)."""
    with sessions() as session:
        return _select(session, selector, result)


def _select(session: Session, selector: Selector, result: RetryResult) -> list[int]:
    """The ids to try; a selection that names nothing retryable is refused here."""
    if selector.scan is not None:
        return _select_scan(session, selector.scan.strip().lower(), result)
    bulk = select(Scan.id, Scan.stored_path).where(Scan.state == ScanState.FAILED, Scan.retried_at.is_(None))
    if selector.reason is not None:
        if selector.reason not in {r.value for r in FailureReason}:
            result.refused.append(
                Refused(Refusal.UNKNOWN_REASON, f"no failure reason {selector.reason!r} (see `meddaemon status`)")
            )
            return []
        bulk = bulk.where(Scan.failure_reason == selector.reason)
    tried = aliased(Scan)
    # a file never read (too_large, unreadable: no SHA-256) is known by its name
    same_file = or_(
        tried.sha256 == Scan.sha256,
        and_(Scan.sha256.is_(None), tried.sha256.is_(None), tried.source_name == Scan.source_name),
    )
    retried_before = (  # the latest earlier attempt at the same file that failed the same way, sent back before
        select(func.max(tried.id))
        .where(same_file, tried.id < Scan.id, tried.state == ScanState.FAILED)
        .where(tried.failure_reason == Scan.failure_reason, tried.retried_at <= Scan.registered_at)
        .scalar_subquery()
    )
    rows = session.execute(bulk.add_columns(Scan.failure_reason, retried_before).order_by(Scan.id)).all()
    result.without_original = sum(1 for _, stored, _, _ in rows if stored is None)
    for scan_id, stored, reason, before in rows:
        if stored is not None and before is not None and not selector.again:
            message = (
                f"scan {scan_id} failed as {reason} again after scan {before} of the same file was sent back; "
                "retry it by its id (or medcli retry --again) once its cause is fixed"
            )
            result.left_alone.append(Refused(Refusal.FAILED_AGAIN, message, scan_id))
    left = {alone.scan_id for alone in result.left_alone}
    return [scan_id for scan_id, stored, _, _ in rows if stored is not None and scan_id not in left]


def _select_scan(session: Session, key: str, result: RetryResult) -> list[int]:
    scan_id = row_id(key)
    if scan_id is not None:
        if session.get(Scan, scan_id) is None:
            result.refused.append(Refused(Refusal.UNKNOWN_SCAN, f"no scan {key}"))
            return []
        return [scan_id]
    if len(key) == 64 and all(c in "0123456789abcdef" for c in key):
        attempts = session.scalars(select(Scan).where(Scan.sha256 == key).order_by(Scan.id)).all()
        if not attempts:
            result.refused.append(Refused(Refusal.UNKNOWN_SCAN, f"no scan with SHA-256 {key}"))
            return []
        waiting = [s.id for s in attempts if s.state == ScanState.FAILED and s.retried_at is None]
        # none waiting: the latest attempt says why (it is live, or already retried)
        return waiting or [attempts[-1].id]
    result.refused.append(Refused(Refusal.UNKNOWN_SCAN, f"{key!r} is neither a scan id nor a SHA-256"))
    return []


def _requeue(sessions: sessionmaker[Session], settings: Settings, scan_id: int, dry_run: bool) -> Requeued | Refused:
    watch = settings.watch
    placed: Path | None = None
    try:
        with transaction(sessions) as session:
            scan = session.scalar(select(Scan).where(Scan.id == scan_id).with_for_update())
            assert scan is not None
            refusal = _why_not(scan)
            if refusal is not None:
                return refusal
            original = _kept_original(scan, settings)
            if (refusal := _not_a_kept_file(scan.id, original)) is not None:
                return refusal
            if not watch.is_dir():  # an unmounted share: never made up here
                return Refused(
                    Refusal.INBOX_MISSING,
                    f"the watch folder {watch} does not exist (the daemon's inbox: give --watch, or set watch in "
                    "the config)",
                    scan.id,
                )
            if (refusal := _not_the_file_that_failed(scan, original)) is not None:
                return refusal
            name = PurePosixPath(scan.source_name)
            in_the_way = _not_a_folder(watch, name)
            if in_the_way is not None:  # a file named like its task folder: no name under it is free
                return Refused(
                    Refusal.INBOX_UNWRITABLE,
                    f"scan {scan.id}: {in_the_way} is not a folder, so {scan.source_name} cannot go back under it",
                    scan.id,
                )
            if dry_run:
                return Requeued(
                    scan.id, scan.source_name, scan.failure_reason, original, _free_name(watch, name, scan.id)
                )
            try:
                placed = _place(original, watch, name, scan.id)
            except OSError as exc:
                return Refused(
                    Refusal.INBOX_UNWRITABLE,
                    f"scan {scan.id}: cannot write into {watch}: {exc.strerror or exc}",
                    scan.id,
                )
            now = utcnow()
            scan.retried_at = now  # its stored_path goes once the original is removed (``_remove_original``)
            detail = f"sent for retry: {original} copied back into the inbox as {placed.relative_to(watch).as_posix()}"
            session.add(ScanEvent(scan_id=scan.id, state=ScanState.FAILED.value, detail=detail, at=now))
            requeued = Requeued(scan.id, scan.source_name, scan.failure_reason, original, placed)
    except BaseException:
        if placed is not None:  # not committed: the copy goes (unless the daemon has taken it already)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(placed)
        raise
    left = _remove_original(sessions, scan_id, original)
    return requeued if left is None else dataclasses.replace(requeued, left_in_failed=left)


def _not_a_kept_file(scan_id: int, original: Path) -> Refused | None:
    """Why the kept original at ``original`` cannot go back as it is, or None. One this user cannot
    reach (``failed/`` is the daemon's and may not be searched) is unreadable, not gone: a bulk retry
    leaves a gone one alone, and told every run that intact files were gone, exit 0."""
    try:
        kept = os.lstat(original)
    except (FileNotFoundError, NotADirectoryError):
        return Refused(Refusal.ORIGINAL_GONE, f"scan {scan_id}: its kept original {original} is gone", scan_id)
    except OSError as exc:
        return Refused(
            Refusal.ORIGINAL_UNREADABLE,
            f"scan {scan_id}: its kept original {original} cannot be reached: {exc.strerror or exc}",
            scan_id,
        )
    if stat.S_ISLNK(kept.st_mode):  # a symlink_not_followed scan keeps the link: copied, its target would be read
        return Refused(
            Refusal.ORIGINAL_IS_A_LINK,
            f"scan {scan_id}: its kept original {original} is a symbolic link, which the inbox never follows; "
            "put the file itself in the inbox",
            scan_id,
        )
    if not stat.S_ISREG(kept.st_mode):  # a FIFO or a device an unreadable scan kept: no bytes to send back
        return Refused(
            Refusal.ORIGINAL_NOT_A_FILE,
            f"scan {scan_id}: its kept original {original} is no regular file ({_kind(kept.st_mode)}), which no "
            "retry can send back; remove it and its .reason.json from failed/",
            scan_id,
        )
    return None


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "a special file")


def _not_the_file_that_failed(scan: Scan, original: Path) -> Refused | None:
    """The kept original is read whole before anything is written into the inbox: a file that cannot
    be read is its fault, not the inbox's, and one changed by hand since it failed is not that scan's
    file (sent back, its new attempt was another scan's bytes, and the scan's own never came back).
    A scan that failed as changed_after_registration kept the changed bytes it failed for: those
    are what goes back."""
    try:
        with open(original, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        return Refused(
            Refusal.ORIGINAL_UNREADABLE,
            f"scan {scan.id}: its kept original {original} cannot be read: {exc.strerror or exc}",
            scan.id,
        )
    if scan.sha256 and digest != scan.sha256 and scan.failure_reason != FailureReason.CHANGED_AFTER_REGISTRATION:
        return Refused(
            Refusal.ORIGINAL_CHANGED,
            f"scan {scan.id}: its kept original {original} has changed since it failed (SHA-256 "
            f"{digest[:12]}..., not {scan.sha256[:12]}...); put the file itself in the inbox",
            scan.id,
        )
    return None


def _remove_original(sessions: sessionmaker[Session], scan_id: int, original: Path) -> str | None:
    """The copy is in the inbox and the scan marked retried: its original and reason file go from
    failed/, and then its stored_path. Killed in between, the next retry finishes it
    (``finish_interrupted_retries``): the row still names the file. One this user may not remove
    (failed/ is the daemon's) stays, named by the row for the next retry: why, or None once removed.
    It raised, after the copy had gone back, and every later retry raised on it again."""
    for leftover in (original, filing.reason_path(original)):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
        except OSError as exc:
            why = f"{leftover} cannot be removed: {exc.strerror or exc}"
            log.warning("scan %d was sent back, but %s; the next retry removes it", scan_id, why)
            return why

    def forget() -> None:
        with transaction(sessions) as session:
            session.execute(update(Scan).where(Scan.id == scan_id).values(stored_path=None))

    with_lock_retry(forget)
    return None


def finish_interrupted_retries(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Remove the originals of scans sent for retry whose removal a killed ``medcli retry`` did not
    finish (left in failed/ for good, named by no row once forgotten). Returns how many."""
    interrupted = (
        select(Scan)
        .where(Scan.state == ScanState.FAILED, Scan.retried_at.is_not(None), Scan.stored_path.is_not(None))
        .order_by(Scan.id)
    )
    with sessions() as session:
        originals = [(scan.id, _kept_original(scan, settings)) for scan in session.scalars(interrupted)]
    for scan_id, original in originals:
        _remove_original(sessions, scan_id, original)
    return len(originals)


def _why_not(scan: Scan) -> Refused | None:
    if scan.state != ScanState.FAILED:
        return Refused(Refusal.NOT_FAILED, f"scan {scan.id} is {scan.state}, not failed", scan.id)
    if scan.retried_at is not None:
        return Refused(
            Refusal.ALREADY_RETRIED,
            f"scan {scan.id} was sent for retry at {scan.retried_at:%Y-%m-%d %H:%M:%S}",
            scan.id,
        )
    if scan.stored_path is None:
        return Refused(
            Refusal.ORIGINAL_GONE, f"scan {scan.id} failed as {scan.failure_reason}: no file of it was kept", scan.id
        )
    if scan.pending_move_from is not None:
        return Refused(
            Refusal.MOVE_PENDING,
            f"scan {scan.id}: its move into failed/ is not done yet (the daemon finishes it)",
            scan.id,
        )
    return None


def _kept_original(scan: Scan, settings: Settings) -> Path:
    """Where the failed scan's file is: the one place this module reads ``stored_path``."""
    assert scan.stored_path is not None
    return settings.stored_file(scan.stored_path)


def _not_a_folder(watch: Path, name: PurePosixPath) -> Path | None:
    """The first of ``name``'s folders under ``watch`` that is there but is no folder (a file, a link)."""
    folder = watch
    for part in name.parent.parts:
        folder = folder / part
        if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
            return folder
    return None


def _free_name(watch: Path, name: PurePosixPath, scan_id: int) -> Path:
    for attempt in range(1, NAME_ATTEMPTS + 1):
        target = filing.inbox_return_path(watch, name, scan_id, attempt)
        if not os.path.lexists(target):
            return target
    raise FileExistsError(f"{NAME_ATTEMPTS} names for {name} are taken in {watch}")


def _place(original: Path, watch: Path, name: PurePosixPath, scan_id: int) -> Path:
    for attempt in range(1, NAME_ATTEMPTS + 1):
        target = filing.inbox_return_path(watch, name, scan_id, attempt)
        if os.path.lexists(target):
            continue
        try:
            filing.place_new_file(original, target)
        except FileExistsError:
            continue
        return target
    raise FileExistsError(f"{NAME_ATTEMPTS} names for {name} are taken in {watch}")
