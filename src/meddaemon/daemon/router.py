"""Which task a scan goes to: a task subfolder, else the DICOM routing rules, else the default task."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from meddaemon.config import RouteRule
from meddaemon.engine.decode.types import ScanMetadata


@dataclass(frozen=True)
class RoutingPolicy:
    rules: Sequence[RouteRule]
    known_tasks: Collection[str]
    default_task: str = ""


@dataclass(frozen=True)
class Route:
    task: str | None
    why: str


def route_scan(
    source_name: PurePosixPath,
    metadata: ScanMetadata,
    rules: Sequence[RouteRule],
    known_tasks: Collection[str],
    default_task: str = "",
) -> Route:
    folder = source_name.parts[0] if len(source_name.parts) > 1 else None
    if folder is not None:
        task = task_of_folder(folder, known_tasks)
        if task is not None:
            return Route(task, f"task folder {folder}/")
    if metadata.format == "dicom":
        for index, rule in enumerate(rules):
            if rule_matches(rule, metadata):
                return Route(rule.task, f"routing rule {index + 1}")
    if default_task:
        return Route(default_task, "default task")
    return Route(None, f"no task folder, no matching routing rule and no default task{_hint(folder, known_tasks)}")


def _hint(folder: str | None, known_tasks: Collection[str]) -> str:
    """What an unroutable file's owner may have meant: a task folder named almost like its folder,
    or, for a file at the inbox's top, the task folders there are."""
    if folder is None:
        folders = ", ".join(f"{task}/" for task in sorted(known_tasks))
        return f" (put it in a task folder: {folders}; or set default_task)"
    close = difflib.get_close_matches(folder.lower(), sorted(known_tasks), n=1)
    return f" ({folder}/ is not a task folder: did you mean {close[0]}/?)" if close else ""


def task_of_folder(folder: str, known_tasks: Collection[str]) -> str | None:
    """The task a first-level folder names: its own name, or the one task named so but for case
    (``BUSI/``, typed as the dataset spells it, is ``busi/``)."""
    if folder in known_tasks:
        return folder
    same = [task for task in known_tasks if task.casefold() == folder.casefold()]
    return same[0] if len(same) == 1 else None


def rule_matches(rule: RouteRule, metadata: ScanMetadata) -> bool:
    checks = (
        (rule.modality, metadata.modality),
        (rule.body_part, metadata.body_part),
        (rule.view_position, metadata.view_position),
        (rule.manufacturer, metadata.manufacturer),
    )
    return all(not allowed or _one_of(value, allowed) for allowed, value in checks)


def _one_of(value: str | None, allowed: Sequence[str]) -> bool:
    return value is not None and value.strip().upper() in {a.upper() for a in allowed}
