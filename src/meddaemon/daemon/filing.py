"""Where files go once the database says so: ``work/`` while in flight, ``archive/`` when done or a
duplicate, ``failed/`` with a ``.reason.json`` beside it.

Every move is committed in the database first (the row's ``pending_move_from``) and carried out
after; ``finish_move`` is idempotent, so recovery after a crash simply calls it again.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import shutil
from datetime import datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath


class MoveOutcome(StrEnum):
    MOVED = "moved"
    ALREADY_DONE = "already_done"
    LOST = "lost"


def work_path(work_dir: Path, sha256: str, source_name: PurePosixPath) -> Path:
    return work_dir / sha256[:2] / f"{sha256}{_suffix(source_name)}"


def archive_path(
    archive_dir: Path, source_name: PurePosixPath, sha256: str, day: datetime, taken: set[Path] | None = None
) -> Path:
    """``archive/<YYYY-MM-DD>/<name as received>``; the SHA-256 prefix keeps same-named files apart,
    on disk and among the ``taken`` targets of the same transaction."""
    target = archive_dir / day.strftime("%Y-%m-%d") / source_name
    if target.exists() or target.is_symlink() or (taken is not None and target in taken):
        target = target.with_name(f"{_stem(source_name)}__{sha256[:12]}{_suffix(source_name)}")
    if taken is not None:
        taken.add(target)
    return target


def failed_path(failed_dir: Path, source_name: PurePosixPath, taken: set[Path]) -> Path:
    """``failed/<name as received>``, numbered when that name is already there."""
    target = failed_dir / source_name
    n = 1
    while target in taken or target.exists() or target.is_symlink() or reason_path(target).exists():
        n += 1
        target = failed_dir / source_name.parent / f"{_stem(source_name)}__{n}{_suffix(source_name)}"
    taken.add(target)
    return target


def reason_path(failed_file: Path) -> Path:
    return failed_file.with_name(failed_file.name + ".reason.json")


def write_reason(failed_file: Path, document: dict[str, object]) -> None:
    """The ``.reason.json`` beside a failed file, written whole or not at all."""
    target = reason_path(failed_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    os.replace(tmp, target)


def finish_move(source: Path, target: Path) -> MoveOutcome:
    """Make the file that was at ``source`` be at ``target``, however far an earlier attempt got."""
    source_there = os.path.lexists(source)
    target_there = os.path.lexists(target)
    if target_there and not source_there:
        return MoveOutcome.ALREADY_DONE
    if not source_there:
        return MoveOutcome.LOST
    if target_there:
        # a cross-device copy that completed its rename but not the unlink of its source
        if _same_bytes(source, target):
            os.unlink(source)
            return MoveOutcome.ALREADY_DONE
        raise FileExistsError(errno.EEXIST, "a different file already has the target name", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except FileNotFoundError:
        # another daemon finishing the same committed move (recovery) got there first
        if os.path.lexists(target) and not os.path.lexists(source):
            return MoveOutcome.ALREADY_DONE
        raise
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across_devices(source, target)
    return MoveOutcome.MOVED


def _copy_across_devices(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    if source.is_symlink():
        os.symlink(os.readlink(source), tmp)
    else:
        shutil.copy2(source, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, target)
    os.unlink(source)


def _same_bytes(a: Path, b: Path) -> bool:
    """Compared byte for byte: a same-sized different file must never cost the source its life."""
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    return filecmp.cmp(a, b, shallow=False)


def _suffix(name: PurePosixPath) -> str:
    """The extension, if it looks like one (DICOM files are often named by UID: 1.2.840.113...)."""
    return name.suffix if 1 < len(name.suffix) <= 6 and not name.suffix[1:].isdigit() else ""


def _stem(name: PurePosixPath) -> str:
    suffix = _suffix(name)
    return name.name[: len(name.name) - len(suffix)] if suffix else name.name


def heatmap_paths(heatmaps_dir: Path, sha256: str, version_id: int, label: str) -> tuple[Path, Path]:
    """``heatmaps/<sha[:2]>/<sha>/v<version id>_<label>.npy`` and ``.jpg``: named by what they are, so a
    replay after a crash overwrites instead of adding."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    base = heatmaps_dir / sha256[:2] / sha256 / f"v{version_id}_{safe}"
    return base.with_suffix(".npy"), base.with_suffix(".jpg")
