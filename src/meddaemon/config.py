"""Effective settings: built-in defaults < TOML file < ``MEDDAEMON_*`` environment < command-line flags.

``load_settings`` is the one place that merges them; every value remembers where it came from so
``meddaemon config show`` can say why a setting has the value it has.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from meddaemon.engine.tasks import TaskSpec, all_tasks, task_from_dict

ENV_PREFIX = "MEDDAEMON_"
CONFIG_ENV = "MEDDAEMON_CONFIG"
OBSERVERS = ("native", "polling")
FRAME_POLICIES = ("key", "all")


class ConfigError(ValueError):
    """A setting has a value the daemon cannot use; the message names the key and its source."""


@dataclass(frozen=True)
class RouteRule:
    """Send DICOM scans whose attributes match to ``task``. An empty tuple matches anything."""

    task: str
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    view_position: tuple[str, ...] = ()
    manufacturer: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    watch: Path = Path("inbox")
    state_dir: Path = Path(".meddaemon")
    db: str = ""
    stable_seconds: float = 2.0
    rescan_seconds: float = 30.0
    observer: str = "native"
    batch_size: int = 64
    workers: int = 2
    ignore: tuple[str, ...] = ("*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.swp", "*~")
    max_pixels: int = 100_000_000
    frame_policy: str = "key"
    default_task: str = ""
    busy_timeout: float = 5.0
    log_level: str = "INFO"
    max_batch: int = 16
    max_wait_ms: float = 50.0
    device: str = "auto"
    inference_threads: int = 0
    heatmaps: bool = True
    model_poll_seconds: float = 2.0
    reports: bool = True
    reports_with_phi: bool = False
    reports_font: str = ""
    reports_nice: int = 10
    node: str = ""
    lease_seconds: float = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    route: tuple[RouteRule, ...] = ()
    tasks: Mapping[str, TaskSpec] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.state_dir / 'meddaemon.db').resolve()}"

    @property
    def task_specs(self) -> dict[str, TaskSpec]:
        """The presets plus the custom tasks of the config."""
        return all_tasks(self.tasks)

    @property
    def routing_rules(self) -> tuple[RouteRule, ...]:
        """The config's [[route]] rules, or else the presets' own."""
        if self.route:
            return self.route
        return tuple(
            RouteRule(t.name, t.route_modality, t.route_body_part)
            for t in self.task_specs.values()
            if t.route_modality or t.route_body_part
        )

    @property
    def work_dir(self) -> Path:
        """Registered scans in flight, named by SHA-256, until they are archived or fail."""
        return self.state_dir / "work"

    @property
    def archive_dir(self) -> Path:
        return self.state_dir / "archive"

    @property
    def failed_dir(self) -> Path:
        return self.state_dir / "failed"

    @property
    def models_dir(self) -> Path:
        """The model registry: ``<task>/<version>/`` with model.safetensors and manifest.json."""
        return self.state_dir / "models"

    @property
    def heatmaps_dir(self) -> Path:
        return self.state_dir / "heatmaps"

    @property
    def reports_dir(self) -> Path:
        """PDF reports: ``scans/<sha[:2]>/<sha>.pdf``, ``studies/<uid hash>.pdf``, ``summaries/``."""
        return self.state_dir / "reports"

    def public_dict(self) -> dict[str, Any]:
        """Every setting as plain data (for ``config show`` and ``--json``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif f.name == "route":
                value = [_route_as_dict(r) for r in value]
            elif f.name == "tasks":
                value = sorted(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["db_url"] = self.db_url
        out["routing_rules"] = [_route_as_dict(r) for r in self.routing_rules]
        return out


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "sources")
_PATH_KEYS = {"watch", "state_dir"}
_INT_KEYS = {"batch_size", "workers", "max_pixels", "max_batch", "reports_nice", "metrics_port", "inference_threads"}
_FLOAT_KEYS = {"stable_seconds", "rescan_seconds", "busy_timeout", "max_wait_ms", "model_poll_seconds", "lease_seconds"}


def default_config_text() -> str:
    """The commented default config shipped in ``templates/`` (what ``config init`` writes)."""
    return resources.files("meddaemon.templates").joinpath("default_config.toml").read_text("utf-8")


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers; ``flags`` holds only the options the user actually gave (None = not given)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}

    raw.update(route=[], tasks={})
    sources.update(route="default (the task presets' rules)", tasks="default (presets only)")
    for key, value in _defaults_from_template().items():
        raw[key], sources[key] = value, "default"

    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    if config_file is not None:
        for key, value in _read_toml(config_file).items():
            if key in _PATH_KEYS:
                value = str(config_file.parent / value)
            raw[key], sources[key] = value, f"file {config_file}"

    for key in SETTING_NAMES:
        env_key = ENV_PREFIX + key.upper()
        if key not in ("route", "tasks") and env_key in env:
            raw[key], sources[key] = env[env_key], f"env {env_key}"

    for key, value in (flags or {}).items():
        if value is not None:
            raw[key], sources[key] = value, "flag"

    return _build(raw, sources)


def _defaults_from_template() -> dict[str, Any]:
    """The shipped TOML is the single statement of the defaults, so the docs cannot drift from them."""
    return tomllib.loads(default_config_text())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(SETTING_NAMES))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; known keys are {list(SETTING_NAMES)}")
    return data


def _build(raw: dict[str, Any], sources: dict[str, str]) -> Settings:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name == "sources":
            continue
        try:
            values[f.name] = _coerce(f.name, raw[f.name])
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"setting {f.name!r} from {sources.get(f.name)}: {exc}") from exc
    settings = Settings(**values, sources=dict(sources))
    _validate(settings)
    return settings


def _coerce(name: str, value: Any) -> Any:
    if name in _PATH_KEYS:
        return Path(value)
    if name in _FLOAT_KEYS:
        return float(value)
    if name in _INT_KEYS:
        return int(value)
    if name in {"heatmaps", "reports", "reports_with_phi"}:
        return value if isinstance(value, bool) else str(value).strip().lower() in {"1", "true", "yes", "on"}
    if name == "tasks":
        if not isinstance(value, Mapping):
            raise ValueError("tasks must be a table of [tasks.NAME] tables")
        return {task: task_from_dict(task, spec) for task, spec in value.items()}
    if name == "ignore":
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        return tuple(str(v) for v in value)
    if name == "route":
        return tuple(_route_from_dict(r) for r in value)
    return str(value)


def _route_from_dict(data: Mapping[str, Any]) -> RouteRule:
    allowed = {f.name for f in dataclasses.fields(RouteRule)}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"route has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "task" not in data:
        raise ValueError("route needs a task")

    def as_tuple(key: str) -> tuple[str, ...]:
        value = data.get(key, ())
        return (value,) if isinstance(value, str) else tuple(value)

    return RouteRule(
        task=str(data["task"]),
        modality=as_tuple("modality"),
        body_part=as_tuple("body_part"),
        view_position=as_tuple("view_position"),
        manufacturer=as_tuple("manufacturer"),
    )


def _route_as_dict(rule: RouteRule) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(rule).items() if v}


def _validate(s: Settings) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"setting {key!r} from {s.sources.get(key)}: {why}")

    if s.observer not in OBSERVERS:
        fail("observer", f"{s.observer!r} is not one of {OBSERVERS}")
    if s.frame_policy not in FRAME_POLICIES:
        fail("frame_policy", f"{s.frame_policy!r} is not one of {FRAME_POLICIES}")
    if s.stable_seconds < 0:
        fail("stable_seconds", "must be >= 0")
    if s.rescan_seconds <= 0:
        fail("rescan_seconds", "must be > 0")
    if s.batch_size < 1:
        fail("batch_size", "must be >= 1")
    if s.workers < 0:
        fail("workers", "must be >= 0")
    if s.max_pixels < 1:
        fail("max_pixels", "must be >= 1")
    if s.max_batch < 1:
        fail("max_batch", "must be >= 1")
    if s.max_wait_ms < 0:
        fail("max_wait_ms", "must be >= 0")
    if s.inference_threads < 0:
        fail("inference_threads", "must be >= 0 (0: one per core)")
    if s.lease_seconds < 1:
        fail("lease_seconds", "must be >= 1 (heartbeats go every quarter of it)")
    if not 0 <= s.metrics_port <= 65535:
        fail("metrics_port", "must be a TCP port (0: no metrics endpoint)")
    if not 0 <= s.reports_nice <= 19:
        fail("reports_nice", "must be between 0 and 19")
    if s.reports_font and not Path(s.reports_font).is_file():
        fail("reports_font", f"{s.reports_font} is not a font file")
    if s.device not in ("auto", "cpu") and not s.device.startswith("cuda"):
        fail("device", f"{s.device!r} is not auto, cpu or cuda[:N]")
    known = s.task_specs
    for rule in s.routing_rules:
        if rule.task not in known:
            fail("route", f"routes to unknown task {rule.task!r}; known tasks: {sorted(known)}")
    if s.default_task and s.default_task not in known:
        fail("default_task", f"unknown task {s.default_task!r}; known tasks: {sorted(known)}")
