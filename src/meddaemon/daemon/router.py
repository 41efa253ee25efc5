"""Which task a scan goes to: a task subfolder, else the DICOM routing rules, else the default task."""

from __future__ import annotations

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
    if len(source_name.parts) > 1 and source_name.parts[0] in known_tasks:
        return Route(source_name.parts[0], f"task folder {source_name.parts[0]}/")
    if metadata.format == "dicom":
        for index, rule in enumerate(rules):
            if rule_matches(rule, metadata):
                return Route(rule.task, f"routing rule {index + 1}")
    if default_task:
        return Route(default_task, "default task")
    return Route(None, "no task folder, no matching routing rule and no default task")


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
