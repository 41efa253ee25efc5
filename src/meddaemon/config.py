"""Effective settings: built-in defaults < TOML file < ``MEDDAEMON_*`` environment < command-line flags.

``load_settings`` is the one place that merges them; every value remembers where it came from so
``meddaemon config show`` can say why a setting has the value it has.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import logging
import math
import os
import re
import ssl
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from meddaemon.engine.tasks import TaskSpec, all_tasks, task_from_dict, text_values
from meddaemon.names import is_utf8, shown_name
from meddaemon.stored_paths import stored_file, stored_name

if TYPE_CHECKING:
    from meddaemon.engine.decode.types import DecodeOptions

ENV_PREFIX = "MEDDAEMON_"
CONFIG_ENV = "MEDDAEMON_CONFIG"
#: variables of the test suite (``MEDDAEMON_TEST_POSTGRES``), not settings
TEST_ENV_PREFIX = "MEDDAEMON_TEST_"
OBSERVERS = ("native", "polling")
FRAME_POLICIES = ("key", "all")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")

log = logging.getLogger(__name__)


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


#: the inbox folder the DICOM receiver writes to (``Settings.received_dir``)
RECEIVED_FOLDER = "dicom"
#: the longest PostgreSQL time setting, in seconds (milliseconds in a 32-bit integer)
POSTGRES_MAX_SECONDS = 2_147_483
#: the longest idle time Linux's TCP keepalives take (TCP_KEEPIDLE)
TCP_KEEPALIVE_MAX_SECONDS = 32_767
#: what ``meddaemon web --hash-password`` prints (``web.auth.hash_password``)
PASSWORD_HASH = re.compile(r"scrypt\$[0-9]+\$[0-9]+\$[0-9]+\$(?:[0-9a-f]{2})+\$[0-9a-f]{64}")
#: an AE title: 1 to 16 characters of the default repertoire (printable ASCII), no backslash, not
#: only spaces (pynetdicom refuses the rest: a receiver so named restarted every 2 s, for ever)
_AE_TITLE = re.compile(r"(?=.*[^ ])[\x20-\x5b\x5d-\x7e]{1,16}")

#: the DICOM objects a scan's results can be written as (``meddaemon.dicom``)
DICOM_OUTPUT_KINDS = ("sr", "pmap", "sc", "pdf")
DESTINATION_KINDS = ("dicom", "dicomweb", "folder")


@dataclass(frozen=True)
class DestinationConfig:
    """A ``[[destination]]`` table: where the DICOM outputs of some tasks are delivered.

    ``dicom``: a DICOM node (``ae_title``, ``host``, ``port``; C-STORE, as ``calling_ae_title``);
    ``dicomweb``: a DICOMweb server (``url``, STOW-RS); ``folder``: files under ``path``.
    ``tasks`` and ``outputs`` narrow what it receives (empty: every task, every output of the task).
    """

    name: str
    kind: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    calling_ae_title: str = "MEDDAEMON"
    url: str = ""
    path: str = ""
    tasks: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    timeout_seconds: float = 30.0
    #: ``dicom``: an association is kept open this long after its last C-STORE (0: one per round)
    keep_open_seconds: float = 5.0
    #: ``dicomweb`` over https: the CA certificate(s), PEM, its certificate is checked against (a
    #: hospital's own CA), whatever ``REQUESTS_CA_BUNDLE`` says; empty: requests' own choice (that
    #: variable where set, else the public CAs', certifi's)
    ca_file: str = ""

    def receives(self, task: str, kind: str) -> bool:
        return (not self.tasks or task in self.tasks) and (not self.outputs or kind in self.outputs)


@dataclass(frozen=True)
class Settings:
    """The daemon's settings. ``load_settings`` makes ``watch`` and ``state_dir`` absolute and
    resolved (symlinks followed), once: every path derived from them has one spelling."""

    watch: Path = Path("inbox")
    create_watch: bool = False
    state_dir: Path = Path(".meddaemon")
    db: str = ""
    stable_seconds: float = 2.0
    rescan_seconds: float = 30.0
    observer: str = "native"
    batch_size: int = 64
    workers: int = 2
    ignore: tuple[str, ...] = ("*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.swp", "*~")
    max_pixels: int = 100_000_000
    max_file_bytes: int = 4 * 1024**3
    frame_policy: str = "key"
    default_task: str = ""
    busy_timeout: float = 5.0
    log_level: str = "INFO"
    max_batch: int = 16
    max_wait_ms: float = 50.0
    device: str = "auto"
    inference_threads: int = 0
    concurrent_batches: int = 0
    #: ``medcli evaluate --engine ray``: seconds without results, once a node of the cluster is
    #: lost, before the run is given up and the files not yet returned run again in a new job
    ray_stall_seconds: float = 60.0
    heatmaps: bool = True
    model_poll_seconds: float = 2.0
    reports: bool = True
    reports_with_phi: bool = False
    reports_font: str = ""
    reports_nice: int = 10
    #: processes that write the reports ``--once`` leaves after its drain, when the cores are idle
    #: (0: one per core); a handful of reports are written in the daemon's own process
    report_workers: int = 0
    node: str = ""
    lease_seconds: float = 30.0
    db_lock_timeout_seconds: float = 5.0
    db_idle_in_transaction_seconds: float = 30.0
    db_keepalive_seconds: float = 10.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    db_outage_seconds: float = 120.0
    claim_unread_seconds: float = 30.0
    #: a decoding worker's read of a file (or a batch of them) not ended after this long is given up:
    #: the worker is killed, and the file that does not end alone fails as ``decode_timeout``
    read_timeout_seconds: float = 300.0
    #: the web console (``meddaemon web``; served by the daemon from a thread when web_port is not 0)
    web_host: str = "127.0.0.1"
    web_port: int = 0
    #: a header set by a trusted reverse proxy that names the signed-in user ("" : none is trusted)
    web_proxy_header: str = ""
    #: the session cookie is Secure (sent over HTTPS only): for a console reached through a TLS proxy
    web_secure_cookie: bool = False
    #: [web_users.NAME] tables: role (viewer, clinician, admin) and password_hash (``meddaemon web --hash-password``)
    web_users: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    route: tuple[RouteRule, ...] = ()
    tasks: Mapping[str, TaskSpec] = field(default_factory=dict)
    # -- DICOM results out (meddaemon.dicom) --
    dicom_outputs: tuple[str, ...] = DICOM_OUTPUT_KINDS
    task_dicom_outputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    dicom_uid_root: str = "1.2.826.0.1.3680043.8.498."
    destination: tuple[DestinationConfig, ...] = ()
    outbox_max_attempts: int = 10
    outbox_retry_seconds: float = 5.0
    outbox_max_retry_seconds: float = 600.0
    # -- DICOM network in (meddaemon.dicom.receiver) --
    #: the C-STORE/C-ECHO SCP's TCP port; 0: the daemon receives no DICOM over the network
    dicom_port: int = 0
    dicom_host: str = "127.0.0.1"
    ae_title: str = "MEDDAEMON"
    #: calling AE titles allowed to associate (empty: any)
    dicom_allowed_callers: tuple[str, ...] = ()
    dicom_max_associations: int = 10
    dicom_min_free_bytes: int = 1024**3
    dicom_tls_cert: str = ""
    dicom_tls_key: str = ""
    dicom_tls_ca: str = ""
    series_quiet_seconds: float = 60.0
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
    def decode_options(self) -> DecodeOptions:
        """How every reader of scans (the daemon, its reports, an evaluation, the console) reads one."""
        from meddaemon.engine.decode.types import DecodeOptions  # pydicom with it: not for every command

        return DecodeOptions(
            frame_policy=self.frame_policy,  # type: ignore[arg-type]
            max_pixels=self.max_pixels,
            max_file_bytes=self.max_file_bytes,
        )

    def dicom_outputs_for(self, task: str) -> tuple[str, ...]:
        """The DICOM objects written for a task's scans: its own list, else ``dicom_outputs``."""
        return self.task_dicom_outputs.get(task, self.dicom_outputs)

    @property
    def dicom_dir(self) -> Path:
        """DICOM outputs: ``<sha[:2]>/<sha>/<object>.dcm``, kept until delivered (``meddaemon.dicom``)."""
        return self.state_dir / "dicom"

    @property
    def received_dir(self) -> Path:
        """Where the DICOM receiver writes the instances it accepts: a folder of the inbox."""
        return self.watch / RECEIVED_FOLDER

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

    def stored_name(self, path: Path) -> str:
        """How ``path`` is written in the database (see ``meddaemon.stored_paths``)."""
        return stored_name(path, self.state_dir)

    def stored_file(self, stored: str) -> Path:
        """The file a path read from the database names, wherever this process runs."""
        return stored_file(stored, self.state_dir)

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
            elif f.name == "destination":  # a DICOMweb URL's password is its server's login
                value = [
                    {
                        k: list(v) if isinstance(v, tuple) else web_url_without_password(v) if k == "url" else v
                        for k, v in dataclasses.asdict(d).items()
                    }
                    for d in value
                ]
            elif f.name == "task_dicom_outputs":
                value = {task: list(kinds) for task, kinds in value.items()}
            elif f.name == "tasks":
                value = sorted(value)
            elif f.name == "web_users":  # never the password hashes
                value = {name: {"role": user.get("role", "")} for name, user in value.items()}
            elif f.name == "db" and "://" in value:  # never the password (operators paste this into tickets)
                value = _without_password(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["db_url"] = _without_password(self.db_url)
        out["routing_rules"] = [_route_as_dict(r) for r in self.routing_rules]
        return out


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "sources")
_PATH_KEYS = {"watch", "state_dir"}
_INT_KEYS = {
    "batch_size",
    "workers",
    "max_pixels",
    "max_file_bytes",
    "max_batch",
    "reports_nice",
    "report_workers",
    "metrics_port",
    "inference_threads",
    "concurrent_batches",
    "web_port",
    "outbox_max_attempts",
    "dicom_port",
    "dicom_max_associations",
    "dicom_min_free_bytes",
}
_FLOAT_KEYS = {
    "stable_seconds",
    "rescan_seconds",
    "busy_timeout",
    "max_wait_ms",
    "model_poll_seconds",
    "lease_seconds",
    "outbox_retry_seconds",
    "outbox_max_retry_seconds",
    "ray_stall_seconds",
}
_BOOL_KEYS = {"heatmaps", "reports", "reports_with_phi", "create_watch", "web_secure_cookie"}
_FLOAT_KEYS |= {"db_lock_timeout_seconds", "db_idle_in_transaction_seconds", "db_keepalive_seconds"}
_FLOAT_KEYS |= {"db_outage_seconds", "claim_unread_seconds", "series_quiet_seconds", "read_timeout_seconds"}
#: lists: a TOML list, or comma-separated text (environment, flags)
_LIST_KEYS = {"ignore", "dicom_allowed_callers"}
#: settings that only a TOML file can give (tables)
_FILE_ONLY_KEYS = {"route", "tasks", "web_users", "destination", "task_dicom_outputs"}


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

    raw.update(route=[], tasks={}, web_users={}, destination=[], task_dicom_outputs={})
    sources.update(
        route="default (the task presets' rules)",
        tasks="default (presets only)",
        web_users="default (none)",
        destination="default (none)",
        task_dicom_outputs="default (dicom_outputs for every task)",
    )
    for key, value in _defaults_from_template().items():
        raw[key], sources[key] = value, "default"

    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    if config_file is not None:
        for key, value in _read_toml(config_file).items():
            raw[key], sources[key] = _relative_to_file(key, value, config_file.parent), f"file {config_file}"

    for key in SETTING_NAMES:
        env_key = ENV_PREFIX + key.upper()
        if key not in _FILE_ONLY_KEYS and env_key in env:
            raw[key], sources[key] = env[env_key], f"env {env_key}"
    for name in unknown_env_variables(env):
        log.warning("environment variable %s is not a setting and is ignored%s", name, _env_hint(name))

    for key, value in (flags or {}).items():
        if value is not None:
            raw[key], sources[key] = value, "flag"

    return _build(raw, sources)


def _defaults_from_template() -> dict[str, Any]:
    """The shipped TOML is the single statement of the defaults, so the docs cannot drift from them."""
    return tomllib.loads(default_config_text())


#: settings that name a file, relative to the config file when they come from one (and are set)
_FILE_KEYS = {"reports_font", "dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca"}


def _relative_to_file(key: str, value: Any, folder: Path) -> Any:
    """A path read from the config file in ``folder``, relative to that file as a reader of the file
    expects (not to the daemon's working directory, ``/`` under systemd): the inbox and state
    directory, the files of ``_FILE_KEYS``, and a folder destination's ``path``. ``~`` is the user's
    home, as in a shell (joined first, ``/etc/meddaemon/~/inbox``). A value that is no path (``watch
    = 5``) is left for the setting's own check, which names it."""
    if isinstance(value, str) and value.strip() and (key in _PATH_KEYS or key in _FILE_KEYS):
        return str(folder / Path(value).expanduser())
    if key == "destination" and isinstance(value, list):
        return [_destination_relative_to_file(d, folder) if isinstance(d, dict) else d for d in value]
    return value


def _destination_relative_to_file(destination: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A folder destination's ``path`` and a destination's ``ca_file``, relative to the config file."""
    keys = ("path", "ca_file") if destination.get("kind") == "folder" else ("ca_file",)
    anchored = dict(destination)
    for key in keys:
        value = destination.get(key)
        if isinstance(value, str) and value:
            anchored[key] = str(folder / Path(value).expanduser())
    return anchored


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text("utf-8-sig"))  # a byte-order mark, as Notepad writes, is no TOML
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 (byte {exc.start} is {exc.object[exc.start]:#04x})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(SETTING_NAMES))
    if unknown:
        hints = "".join(_did_you_mean(key, SETTING_NAMES) for key in unknown)
        raise ConfigError(f"config file {path}: unknown keys {unknown}{hints}; known keys are {list(SETTING_NAMES)}")
    return data


#: the variables that set a setting, and the one that names the config file
ENV_NAMES = (*(ENV_PREFIX + key.upper() for key in SETTING_NAMES if key not in _FILE_ONLY_KEYS), CONFIG_ENV)


def unknown_env_variables(env: Mapping[str, str]) -> list[str]:
    """``MEDDAEMON_*`` variables that set nothing: most likely a misspelt setting, or one in another
    case (``meddaemon_workers``, which sets nothing either: the names are read as written)."""
    return sorted(
        name
        for name in env
        if name.upper().startswith(ENV_PREFIX) and name not in ENV_NAMES and not name.startswith(TEST_ENV_PREFIX)
    )


def _env_hint(name: str) -> str:
    """What an unknown variable may have meant: the same name in capitals, a setting the file alone
    sets (``MEDDAEMON_ROUTE`` was told "did you mean MEDDAEMON_NODE?"), or the closest name."""
    if name.upper() in ENV_NAMES:
        return f" (did you mean {name.upper()}? the names are upper case)"
    key = name[len(ENV_PREFIX) :].lower()
    if name.upper().startswith(ENV_PREFIX) and key in _FILE_ONLY_KEYS:
        return f" ({key!r} is set in the config file only: its values are tables)"
    return _did_you_mean(name, ENV_NAMES)


def _did_you_mean(name: str, known: tuple[str, ...]) -> str:
    """`` (did you mean X?)`` for the closest known name, or nothing when none is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def canonical_path(path: Path) -> Path:
    """Absolute, ``~`` expanded, symlinks resolved: a relative ``--watch inbox`` and a symlink to the
    inbox must name its files as the scan, the watcher, the stability tracker and the inbox claims
    all do, or one file is recorded twice (issue 12)."""
    return path.expanduser().resolve()


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
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{value!r} is not a path")
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty (it would be the working directory)")
        path = canonical_path(Path(value))
        if not is_utf8(path):
            raise ValueError(
                f"{shown_name(path)} is not UTF-8, and the database stores the paths of the files under it; "
                "give the folder a UTF-8 name (the names of the files in it may be anything)"
            )
        return path
    if name in _FLOAT_KEYS:
        return _parse_float(value)
    if name in _INT_KEYS:
        return _parse_int(value)
    if name in _BOOL_KEYS:
        return _parse_bool(value)
    if name in _FILE_KEYS:
        return os.path.expanduser(str(value)) if value else ""  # from the environment or a flag too
    if name == "log_level":
        return str(value).strip().upper()
    if name == "tasks":
        if not isinstance(value, Mapping):
            raise ValueError("tasks must be a table of [tasks.NAME] tables")
        reserved = [task for task in value if str(task).casefold() == RECEIVED_FOLDER]
        if reserved:  # the receiver's folder of the inbox: a task of that name took every instance received
            raise ValueError(f"tasks.{reserved[0]}: {RECEIVED_FOLDER!r} is the folder the DICOM receiver writes into")
        return {task: task_from_dict(task, spec) for task, spec in value.items()}
    if name == "destination":
        return tuple(_destination_from_dict(d) for d in _tables(value, "destination"))
    if name == "task_dicom_outputs":
        if not isinstance(value, Mapping):
            raise ValueError("task_dicom_outputs must be a table: task = [outputs]")
        return {str(task): _dicom_kinds(kinds, f"task_dicom_outputs.{task}") for task, kinds in value.items()}
    if name == "dicom_outputs":
        return _dicom_kinds(value)
    if name in _LIST_KEYS:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list of texts")
        return tuple(_text(v) for v in value)
    if name == "route":
        return tuple(_route_from_dict(r) for r in _tables(value, "route"))
    if name == "web_users":
        return _web_users(value)
    return _text(value)


def _text(value: Any) -> str:
    """A text setting's value: a number or a list where text belongs was taken as its Python text
    (``ae_title = true`` was ``'True'``)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


def _tables(value: Any, key: str) -> list[Mapping[str, Any]]:
    """An array of tables (``[[key]]``): a table written ``[key]`` was read as its keys' letters."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, Mapping) for item in value):
        raise ValueError(f"use [[{key}]] (an array of tables, one per {key}), not [{key}] or a value")
    return list(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def _parse_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value)
    raise ValueError(f"{value!r} is not a whole number")


def _parse_float(value: Any) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{value!r} is not a number")
    return number


def _route_from_dict(data: Mapping[str, Any]) -> RouteRule:
    allowed = {f.name for f in dataclasses.fields(RouteRule)}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"route has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "task" not in data:
        raise ValueError("route needs a task")

    def as_tuple(key: str) -> tuple[str, ...]:
        return text_values(data.get(key, ()), f"route.{key}")

    return RouteRule(
        task=str(data["task"]),
        modality=as_tuple("modality"),
        body_part=as_tuple("body_part"),
        view_position=as_tuple("view_position"),
        manufacturer=as_tuple("manufacturer"),
    )


WEB_ROLES = ("viewer", "clinician", "admin")


def _web_users(value: Any) -> dict[str, dict[str, str]]:
    if not isinstance(value, Mapping):
        raise ValueError("web_users must be a table of [web_users.NAME] tables")
    users: dict[str, dict[str, str]] = {}
    for name, user in value.items():
        if not isinstance(user, Mapping):
            raise ValueError(f"web_users.{name} must be a table with role and password_hash")
        unknown = sorted(set(user) - {"role", "password_hash"})
        if unknown:
            raise ValueError(f"web_users.{name} has unknown keys {unknown}; allowed: ['password_hash', 'role']")
        role = str(user.get("role", ""))
        if role not in WEB_ROLES:
            raise ValueError(f"web_users.{name}: role {role!r} is not one of {list(WEB_ROLES)}")
        password_hash = user.get("password_hash", "")
        if password_hash != "" and not (isinstance(password_hash, str) and PASSWORD_HASH.fullmatch(password_hash)):
            # a password written in clear, or the template's "scrypt$16384$8$1$...", let nobody sign in
            raise ValueError(
                f"web_users.{name}: password_hash is not a hash from `meddaemon web --hash-password` "
                "(scrypt$N$r$p$SALT$HASH)"
            )
        users[str(name)] = {"role": role, "password_hash": password_hash}
    return users


def _dicom_kinds(value: Any, key: str = "dicom_outputs") -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{key} is not a list of outputs ({', '.join(DICOM_OUTPUT_KINDS)}): {value!r}")
    kinds = tuple(str(v) for v in value)
    unknown = [k for k in kinds if k not in DICOM_OUTPUT_KINDS]
    if unknown:
        raise ValueError(f"unknown DICOM outputs {unknown}; known: {list(DICOM_OUTPUT_KINDS)}")
    return kinds


def _destination_from_dict(data: Mapping[str, Any]) -> DestinationConfig:
    allowed = {f.name for f in dataclasses.fields(DestinationConfig)}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"destination has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    name, kind = str(data.get("name", "")), str(data.get("kind", ""))
    if not name:
        raise ValueError("a destination needs a name")
    if kind not in DESTINATION_KINDS:
        raise ValueError(f"destination {name!r}: kind {kind!r} is not one of {DESTINATION_KINDS}")
    needed = {"dicom": ("ae_title", "host", "port"), "dicomweb": ("url",), "folder": ("path",)}[kind]
    missing = [key for key in needed if key not in data or data[key] == ""]
    if missing:
        raise ValueError(f"destination {name!r} ({kind}) needs {missing}")
    if kind == "dicomweb" and not _is_web_url(data["url"]):
        raise ValueError(
            f"destination {name!r}: url {web_url_without_password(str(data['url']))!r} is not an http(s) URL "
            "with a host (https://HOST/dicom-web)"
        )

    def parsed(key: str, parse: Callable[[Any], Any], default: Any) -> Any:
        try:
            return parse(data.get(key, default))
        except ValueError as exc:  # "True is not a whole number" named neither the key nor the destination
            raise ValueError(f"destination {name!r}: {key}: {exc}") from None

    port: int = parsed("port", _parse_int, 0)
    if kind == "dicom" and not 1 <= port <= 65535:
        raise ValueError(f"destination {name!r}: port {data['port']} is not a TCP port (1-65535)")
    for key in ("ae_title", "calling_ae_title") if kind == "dicom" else ():
        if key in data and not (isinstance(data[key], str) and _AE_TITLE.fullmatch(data[key])):
            raise ValueError(
                f"destination {name!r}: {key} {data[key]!r} is not an AE title (1 to 16 printable ASCII "
                "characters, no backslash)"
            )
    tasks = data.get("tasks", [])
    return DestinationConfig(
        name=name,
        kind=kind,
        ae_title=parsed("ae_title", _text, ""),
        host=parsed("host", _text, ""),
        port=port,
        calling_ae_title=parsed("calling_ae_title", _text, "MEDDAEMON"),
        url=parsed("url", _text, ""),
        path=parsed("path", _text, ""),
        tasks=text_values(tasks, f"destination {name!r}: tasks"),
        outputs=_dicom_kinds(data.get("outputs", ())),
        timeout_seconds=parsed("timeout_seconds", _parse_float, 30.0),
        keep_open_seconds=parsed("keep_open_seconds", _parse_float, 5.0),
        ca_file=parsed("ca_file", _text, ""),
    )


def _is_web_url(url: object) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def web_url_without_password(url: str) -> str:
    """An http(s) URL for ``config show`` and messages: the password of its user, and a
    ``password`` or token in its query, shown ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all (an unclosed IPv6 bracket): nothing of it is shown
        return "***"
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = parts.query
    if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):  # else the query is shown as written
        query = urlencode(
            [(key, "***" if key.lower() in _SECRET_QUERY_KEYS else value) for key, value in pairs], safe="*"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_SECRET_QUERY_KEYS = frozenset({"password", "token", "access_token", "api_key", "apikey"})


def _without_password(url: str) -> str:
    from meddaemon.db.engine import shown_url

    return shown_url(url)


def _route_as_dict(rule: RouteRule) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(rule).items() if v}


#: hosts that listen on every address: a port there is taken on every other host too
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def require_inbox_apart(s: Settings) -> None:
    """The daemon's own check (``meddaemon start``): an inbox inside the state directory, or the
    state directory itself, is never read (the inbox leaves the state directory out), and the
    daemon ran on, "0 of 0 files". Other commands never read the inbox, and run with it anywhere."""
    watch, state = s.watch.absolute(), s.state_dir.absolute()
    if watch == state or state in watch.parents:
        raise ConfigError(
            f"setting 'watch' from {s.sources.get('watch')}: {s.watch} is inside the state directory "
            f"{s.state_dir} (from {s.sources.get('state_dir')}), which the inbox never reads from"
        )


def _validate(s: Settings) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"setting {key!r} from {s.sources.get(key)}: {why}")

    if s.observer not in OBSERVERS:
        fail("observer", f"{s.observer!r} is not one of {OBSERVERS}")
    if s.log_level not in LOG_LEVELS:
        fail("log_level", f"{s.log_level!r} is not one of {LOG_LEVELS}")
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
    if s.max_file_bytes < 1:
        fail("max_file_bytes", "must be >= 1")
    if s.max_batch < 1:
        fail("max_batch", "must be >= 1")
    if s.max_wait_ms < 0:
        fail("max_wait_ms", "must be >= 0")
    if s.inference_threads < 0:
        fail("inference_threads", "must be >= 0 (0: one per core)")
    if s.concurrent_batches < 0:
        fail("concurrent_batches", "must be >= 0 (0: two on the CPU, one on a GPU)")
    if s.ray_stall_seconds <= 0:
        fail("ray_stall_seconds", "must be > 0")
    if not 1 <= s.lease_seconds <= 86400:
        fail("lease_seconds", "must be >= 1 (heartbeats go every quarter of it) and <= 86400 (a day)")
    for key in ("db_lock_timeout_seconds", "db_idle_in_transaction_seconds"):
        if not (getattr(s, key) == 0 or 0.001 <= getattr(s, key) <= POSTGRES_MAX_SECONDS):
            # PostgreSQL takes whole milliseconds that fit 32 bits: 0.0004 was 0, no limit at all, and
            # 3000000 refused at every connection, a "database unavailable" that systemd restarts
            fail(key, f"must be 0 (no limit) or from 0.001 to {POSTGRES_MAX_SECONDS} (PostgreSQL's limit)")
    if not (s.db_keepalive_seconds == 0 or 0.001 <= s.db_keepalive_seconds <= TCP_KEEPALIVE_MAX_SECONDS):
        # its user timeout, twice it in whole milliseconds, was 0 below 0.0005: the system's, none
        fail(
            "db_keepalive_seconds",
            f"must be 0 (no keepalives) or from 0.001 to {TCP_KEEPALIVE_MAX_SECONDS} (the kernel's limit)",
        )
    if s.db_outage_seconds < 0:
        fail("db_outage_seconds", "must be >= 0 (0: exit at the first failed connection)")
    if s.claim_unread_seconds <= 0:
        fail("claim_unread_seconds", "must be > 0")
    if s.read_timeout_seconds <= 0:
        fail("read_timeout_seconds", "must be > 0")
    if not 0 <= s.metrics_port <= 65535:
        fail("metrics_port", "must be a TCP port (0: no metrics endpoint)")
    if not 0 <= s.web_port <= 65535:
        fail("web_port", "must be a TCP port (0: the daemon serves no web console)")
    endpoints = [(name, getattr(s, f"{name}_host"), getattr(s, f"{name}_port")) for name in ("metrics", "web", "dicom")]
    for (first, host, port), (second, other_host, other_port) in itertools.combinations(endpoints, 2):
        if port and port == other_port and (host == other_host or {host, other_host} & _ANY_ADDRESS):
            fail(f"{second}_port", f"{port} is {first}_port too, on {host or '*'}: the two cannot listen on one port")
    if not 0 <= s.reports_nice <= 19:
        fail("reports_nice", "must be between 0 and 19")
    if s.report_workers < 0:
        fail("report_workers", "must be 0 (one per core) or more")
    if s.reports_font and not Path(s.reports_font).is_file():
        fail("reports_font", f"{s.reports_font} is not a font file")
    elif s.reports_font:
        from meddaemon.report.fonts import unusable_font  # reportlab: only when a font is set

        if why := unusable_font(s.reports_font):
            fail("reports_font", why)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", s.device):
        fail("device", f"{s.device!r} is not auto, cpu or cuda[:N]")
    if s.busy_timeout < 0:
        fail("busy_timeout", "must be >= 0")
    if s.model_poll_seconds <= 0:
        fail("model_poll_seconds", "must be > 0")
    if s.db:
        _validate_db(s.db, fail)
    known = s.task_specs
    _validate_dicom_out(s, known, fail)
    _validate_dicom_in(s, fail)
    for rule in s.routing_rules:
        if rule.task not in known:
            fail("route", f"routes to unknown task {rule.task!r}; known tasks: {sorted(known)}")
    if s.default_task and s.default_task not in known:
        fail("default_task", f"unknown task {s.default_task!r}; known tasks: {sorted(known)}")


def _validate_db(url: str, fail: Any) -> None:
    """A URL SQLAlchemy reads, of a database meddaemon runs on: a bad one was a traceback (exit 1;
    ``meddaemon health`` then said 'degraded') at the first connection."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        fail("db", "not a database URL: give sqlite:///PATH or postgresql+psycopg://USER@HOST/NAME")
        return
    if backend not in ("sqlite", "postgresql"):
        fail("db", f"a {backend} URL: meddaemon runs on SQLite or PostgreSQL")
        return
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        fail("db", "an in-memory SQLite database ends with the process that made it: give sqlite:///PATH")
        return
    try:  # a driver not installed (psycopg2), or none of that name, was a traceback at the first connection
        parsed.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError) as exc:
        fail(
            "db",
            f"the driver of {parsed.drivername}:// is not installed or does not exist ({type(exc).__name__}); give "
            "sqlite:///PATH or postgresql+psycopg://USER@HOST/NAME (pip install 'meddaemon[postgres]')",
        )


def _validate_dicom_out(s: Settings, known: Mapping[str, TaskSpec], fail: Any) -> None:
    if s.outbox_max_attempts < 1:
        fail("outbox_max_attempts", "must be >= 1")
    if s.outbox_retry_seconds <= 0 or s.outbox_max_retry_seconds < s.outbox_retry_seconds:
        fail("outbox_retry_seconds", "must be > 0 and at most outbox_max_retry_seconds")
    # a component is 0 or does not begin with 0 (PS3.5 9.1): pydicom refused "1.2.03." at every object
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?", s.dicom_uid_root) or len(s.dicom_uid_root) > 30:
        fail(
            "dicom_uid_root", f"{s.dicom_uid_root!r} is not a UID root of at most 30 characters (no part begins with 0)"
        )
    for task in s.task_dicom_outputs:
        if task not in known:
            fail("task_dicom_outputs", f"unknown task {task!r}; known tasks: {sorted(known)}")
    names = [d.name for d in s.destination]
    if len(set(names)) != len(names):
        fail("destination", f"destination names must differ: {names}")
    for d in s.destination:
        for task in d.tasks:
            if task not in known:
                fail("destination", f"destination {d.name!r} names unknown task {task!r}; known: {sorted(known)}")
        if d.timeout_seconds <= 0 or d.keep_open_seconds < 0:
            fail("destination", f"destination {d.name!r}: timeout_seconds must be > 0 and keep_open_seconds >= 0")
        if d.ca_file:
            why = _ca_file_unusable(d)
            if why:
                fail("destination", f"destination {d.name!r}: ca_file {why}")


def _ca_file_unusable(d: DestinationConfig) -> str | None:
    """Why a destination's ``ca_file`` cannot be used, or None: each send failed as a TLS handshake."""
    if d.kind != "dicomweb" or not d.url.lower().startswith("https://"):
        return "is for a dicomweb destination whose url is https"
    try:
        text = Path(d.ca_file).read_bytes()
    except OSError as exc:
        return f"{d.ca_file} cannot be read ({exc.strerror or type(exc).__name__})"
    if b"-----BEGIN CERTIFICATE-----" not in text:
        return f"{d.ca_file} holds no certificate in PEM (-----BEGIN CERTIFICATE-----)"
    return None


def _validate_dicom_in(s: Settings, fail: Any) -> None:
    if not 0 <= s.dicom_port <= 65535:
        fail("dicom_port", "must be a TCP port (0: the daemon receives no DICOM over the network)")
    for key, titles in (("ae_title", (s.ae_title,)), ("dicom_allowed_callers", s.dicom_allowed_callers)):
        for title in titles:
            if not _AE_TITLE.fullmatch(title):
                fail(
                    key,
                    f"{title!r} is not an AE title (1 to 16 printable ASCII characters, no backslash, not only spaces)",
                )
    if s.dicom_max_associations < 1:
        fail("dicom_max_associations", "must be >= 1")
    if s.dicom_min_free_bytes < 0:
        fail("dicom_min_free_bytes", "must be >= 0")
    if s.series_quiet_seconds < 0:
        fail("series_quiet_seconds", "must be >= 0")
    if bool(s.dicom_tls_cert) != bool(s.dicom_tls_key):
        fail("dicom_tls_cert", "TLS needs both dicom_tls_cert and dicom_tls_key")
    if s.dicom_tls_ca and not s.dicom_tls_cert:
        fail("dicom_tls_ca", "a CA for the callers' certificates needs dicom_tls_cert and dicom_tls_key")
    for key in ("dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca"):
        path = getattr(s, key)
        if path and not Path(path).is_file():
            fail(key, f"{path} is not a file")


def _no_pass_phrase() -> bytes:
    """What OpenSSL is told when a key is encrypted: no pass phrase (it asked for one on the
    terminal, and a daemon's receiver waited there for ever, never listening)."""
    return b""


def load_tls_identity(context: ssl.SSLContext, settings: Settings) -> None:
    """``dicom_tls_cert`` and ``dicom_tls_key`` into ``context``; an encrypted key is refused
    (``ssl.SSLError``), never a pass phrase asked for."""
    context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key, password=_no_pass_phrase)


def check_tls_identity(settings: Settings) -> None:
    """Refuse, before a DICOM node starts, TLS files it cannot use (a ``ConfigError`` naming them): a
    key that is encrypted or not the certificate's, a file that is no PEM, a CA file without one. The
    receiver's process found them out only as it started, and was restarted every few seconds, for
    ever. Checked at the daemon's start only: other commands may run as users who cannot read the key."""
    if not (settings.dicom_port and settings.dicom_tls_cert and settings.dicom_tls_key):
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        load_tls_identity(context, settings)
    except (ssl.SSLError, OSError) as exc:
        key_text = Path(settings.dicom_tls_key).read_bytes() if os.access(settings.dicom_tls_key, os.R_OK) else b""
        why = (
            "the key is encrypted, and a daemon is asked no pass phrase: store it decrypted, readable by the "
            "daemon's user alone (openssl pkey -in KEY -out KEY.plain)"
            if b"ENCRYPTED" in key_text
            else f"the certificate and key cannot be used together ({exc.strerror or exc})"
        )
        raise ConfigError(
            f"settings 'dicom_tls_cert' and 'dicom_tls_key' from {settings.sources.get('dicom_tls_key')}: "
            f"{settings.dicom_tls_cert}, {settings.dicom_tls_key}: {why}"
        ) from None
    if settings.dicom_tls_ca:
        try:
            context.load_verify_locations(settings.dicom_tls_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"setting 'dicom_tls_ca' from {settings.sources.get('dicom_tls_ca')}: {settings.dicom_tls_ca} "
                f"holds no CA certificate it can use ({exc.strerror or exc})"
            ) from None


def prepare_state_dir(settings: Settings) -> None:
    """Create the state directory and prove that files can be written in it, or raise a
    ``ConfigError`` naming it: a daemon that cannot keep its state must not start."""
    folder = settings.state_dir
    where = f"setting 'state_dir' from {settings.sources.get('state_dir')}: {folder}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".meddaemon-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where} cannot be used: {exc.strerror or exc}") from exc
