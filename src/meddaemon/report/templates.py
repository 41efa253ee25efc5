"""Per-task report wording and layout from ``templates/reports/<task>.toml`` over ``default.toml``.

Every string is checked when it is loaded, with sample values for its fields, so a bad template
fails with its file and key named rather than half-way through a report.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

SECTIONS = ("finding", "images", "labels", "model", "scan", "times", "patient")
_SAMPLE = {
    "task": "busi",
    "description": "d",
    "label": "L",
    "labels": "A, B",
    "probability": 0.5,
    "threshold": 0.5,
    "probability_text": "50%",
    "threshold_text": "50%",
    "count": 2,
    "scan_id": 1,
    "sha": "ab",
    "since": "s",
    "until": "u",
    "scans": "3 (corrupt_image)",
    "scan": 2,
    "later": 3,
}


class TemplateError(ValueError):
    """A report template cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ReportTemplate:
    task: str
    title: str
    subtitle: str
    disclaimer: str
    sections: tuple[str, ...]
    finding: Mapping[str, str]
    words: Mapping[str, str]
    labels: Mapping[str, str]
    study: Mapping[str, str]
    summary: Mapping[str, str]

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def word(self, key: str, **fields: Any) -> str:
        return self.words[key].format(**fields) if fields else self.words[key]


def _read(name: str) -> dict[str, Any] | None:
    resource = resources.files("meddaemon.templates").joinpath("reports").joinpath(f"{name}.toml")
    if not resource.is_file():
        return None
    try:
        return tomllib.loads(resource.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"report template {name}.toml is not valid TOML: {exc}") from exc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _check(name: str, data: Mapping[str, Any], where: str = "") -> None:
    for key, value in data.items():
        if isinstance(value, Mapping):
            _check(name, value, f"{where}{key}.")
        elif isinstance(value, str):
            try:
                value.format(**_SAMPLE)
            except (KeyError, IndexError, ValueError) as exc:
                raise TemplateError(f"report template {name}.toml, key {where}{key}: {exc!r} in {value!r}") from exc


@functools.lru_cache(maxsize=64)
def load_template(task: str) -> ReportTemplate:
    """The template of ``task``: its own file over ``default.toml`` (a task without a file gets the default)."""
    default = _read("default")
    if default is None:
        raise TemplateError("report template default.toml is missing from the installation")
    own = _read(task) if task.replace("_", "").replace("-", "").isalnum() else None
    data = _merge(default, own or {})
    _check(task if own else "default", data)
    sections = tuple(data["sections"])
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise TemplateError(f"report template {task}.toml: unknown sections {sorted(unknown)}; known: {SECTIONS}")
    return ReportTemplate(
        task=task,
        title=data["title"],
        subtitle=data["subtitle"],
        disclaimer=data["disclaimer"],
        sections=sections,
        finding=data["finding"],
        words=data["words"],
        labels=data.get("labels", {}),
        study=data["study"],
        summary=data["summary"],
    )
