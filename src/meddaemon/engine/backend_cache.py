"""The CPU backend chosen for a model version, remembered beside its weights (``backend.json``).

Choosing between eager PyTorch and ONNX Runtime means exporting the graph and timing both on a
batch: seconds for a small network, a minute or more for a DenseNet-121 on a busy machine. The
choice only depends on the weights and on where they run, so it is measured once and kept, keyed
by what it depends on (:class:`BackendKey`); a start with the same key uses it without timing. New
weights (another SHA-256), another torch or onnxruntime, another thread count, batch or CPU make
another key, which is measured again. Several keys live side by side (daemons on different machines
sharing the registry each keep their own); entries for other weights are dropped on the next write.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from meddaemon.files import write_atomically
from meddaemon.logs import error_line

log = logging.getLogger(__name__)

BACKEND_FILE = "backend.json"
FORMAT = 1
#: entries kept per file (one per machine and configuration the version ran on)
MAX_ENTRIES = 16
#: the batch ``medcli evaluate`` times eager PyTorch and ONNX Runtime at to choose between them: at
#: the run's batch (64, 256) the three timed passes of each cost as much as scoring a few thousand images
BACKEND_PROBE_BATCH = 16


@dataclass(frozen=True)
class BackendKey:
    """Everything the measured choice depends on."""

    sha256: str
    device: str
    threads: int
    batch: int
    #: the exported graph also returns the heatmap activation
    activation: bool
    #: batches ONNX Runtime runs at once, its threads shared among them (``ServedModel.lanes``)
    lanes: int = 1
    torch: str = field(default_factory=lambda: torch.__version__)
    onnxruntime: str = field(default_factory=lambda: _package_version("onnxruntime"))
    cpu: str = field(default_factory=lambda: cpu_name())


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    #: images per second measured at the key's batch ({} when ONNX Runtime could not be used)
    speeds: dict[str, float]
    #: why, when the choice was made without timing (no ONNX Runtime, a graph that disagrees)
    note: str = ""


class BackendCache:
    """``backend.json`` in a model version's folder."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / BACKEND_FILE

    def get(self, key: BackendKey) -> BackendChoice | None:
        wanted = asdict(key)
        for entry in self._entries():
            if entry.get("key") == wanted:
                try:
                    speeds = {str(k): float(v) for k, v in entry.get("speeds", {}).items()}
                    return BackendChoice(str(entry["backend"]), speeds, str(entry.get("note", "")))
                except (KeyError, TypeError, ValueError, AttributeError):
                    return None
        return None

    def put(self, key: BackendKey, choice: BackendChoice) -> None:
        """Remember ``choice`` for ``key``; a folder that cannot be written only costs the timing next time."""
        wanted = asdict(key)
        kept = [
            entry
            for entry in self._entries()
            if entry.get("key") != wanted
            and isinstance(entry.get("key"), dict)
            and entry["key"].get("sha256") == key.sha256
        ]
        entry = {
            "key": wanted,
            "backend": choice.backend,
            "speeds": choice.speeds,
            "note": choice.note,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        document = {"format": FORMAT, "entries": [*kept[-(MAX_ENTRIES - 1) :], entry]}
        try:
            write_atomically(self.path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
        except OSError as exc:
            log.warning("could not remember the backend choice in %s (%s)", self.path, exc.strerror or exc)

    def _entries(self) -> list[dict[str, Any]]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s); the backends are measured again", self.path, exc)
            return []
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            return []
        entries = document.get("entries")
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


@functools.cache
def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else the architecture: timings differ between machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


#: the exported ONNX graphs of a version, beside its weights
GRAPH_FOLDER = "onnx"


@dataclass(frozen=True)
class GraphKey:
    """Everything an exported graph depends on: the weights, what it returns, the exporter."""

    sha256: str
    activation: bool
    opset: int
    torch: str = field(default_factory=lambda: torch.__version__)

    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"graph-{digest[:16]}"


class GraphCache:
    """The ONNX graph exported from a version (``onnx/graph-<key>.onnx``), so that a start does not
    export it again (seconds for a small network, tens for a DenseNet-121). Each graph has a
    ``.json`` beside it with its key and SHA-256; a graph is read only when its bytes have the
    SHA-256 the database recorded when it was exported (``recorded``: ``model_graphs``, by name), as
    the ``.json`` sits where whoever could change the graph could change it too. A graph changed or
    cut short on disk, or one the database has no record of, is exported again, never run; ``record``
    records what is exported (None: nothing kept is trusted, as where no database is at hand)."""

    def __init__(
        self,
        version_folder: Path | str,
        recorded: Mapping[str, str] | None = None,
        record: Callable[[str, str], None] | None = None,
    ) -> None:
        self.folder = Path(version_folder) / GRAPH_FOLDER
        self.recorded = dict(recorded or {})
        self.record = record

    def get(self, key: GraphKey) -> bytes | None:
        graph, sidecar = self._paths(key)
        expected = self.recorded.get(key.name())
        if expected is None:
            return None
        try:
            document = json.loads(sidecar.read_text(encoding="utf-8"))
            data = graph.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(document, dict) or document.get("key") != asdict(key):
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning(
                "ignoring %s: its SHA-256 is not the one recorded when it was exported; exporting the graph again",
                graph,
            )
            return None
        return data

    def put(self, key: GraphKey, data: bytes) -> None:
        """Keep ``data`` and record its SHA-256; a folder that cannot be written, or a database that
        cannot record it, only costs the export next time."""
        graph, sidecar = self._paths(key)
        sha256 = hashlib.sha256(data).hexdigest()
        document = {"key": asdict(key), "sha256": sha256}
        try:
            write_atomically(graph, data, durable=True)
            write_atomically(sidecar, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode(), durable=True)
        except OSError as exc:
            log.warning("could not keep the exported graph in %s (%s)", self.folder, exc.strerror or exc)
            return
        if self.record is None:
            return
        try:
            self.record(key.name(), sha256)
        except Exception as exc:  # the database away: the graph is exported again next time
            log.warning("could not record the exported graph %s (%s)", graph.name, error_line(exc))
            return
        self.recorded[key.name()] = sha256

    def _paths(self, key: GraphKey) -> tuple[Path, Path]:
        name = key.name()
        return self.folder / f"{name}.onnx", self.folder / f"{name}.json"
