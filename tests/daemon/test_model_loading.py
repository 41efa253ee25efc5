"""Loading a model version never stalls the daemon's main loop (issue 12, fault 7): versions are
verified and timed in a background thread, the version being replaced serves its task until the new
one is ready, a load that fails leaves the old version serving, and the CPU backend chosen for a
version is measured once and then read from ``backend.json`` beside its weights.

A real DenseNet-121 load under load took over 100 s; here the slowness is a gate held shut in the
backend choice (``ServedModel.choose_backend``), the last step of a load, around the real code."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png
from sqlalchemy import select

from daemon_harness import wait_until
from meddaemon.daemon import loader
from meddaemon.daemon.sdnotify import Watchdog
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import transaction
from meddaemon.db.models import ModelVersion, Result, Scan
from meddaemon.engine import registry
from meddaemon.engine.backend_cache import BACKEND_FILE, GRAPH_FOLDER
from meddaemon.engine.inference import ServedModel, pick_device
from model_factory import registered_folder, write_model

LIVE = {
    "stable_seconds": 0.05,
    "rescan_seconds": 0.5,
    "model_poll_seconds": 0.2,
    "max_wait_ms": 10,
    "reports": False,
    "workers": 0,
}


class Gate:
    """Holds the backend choice of the named model versions until opened; says where it ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, versions: set[str]) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.held: list[threading.Thread] = []
        original = ServedModel.choose_backend

        def gated(model: ServedModel, *args, **kwargs):  # type: ignore[no-untyped-def]
            if model.manifest.version in versions:
                self.held.append(threading.current_thread())
                self.entered.set()
                self.opened.wait(120)
            return original(model, *args, **kwargs)

        monkeypatch.setattr(ServedModel, "choose_backend", gated)

    @property
    def threads(self) -> list[str]:
        """The names of the threads it held."""
        return [thread.name for thread in self.held]

    def open(self) -> None:
        self.opened.set()


class WatchdogSocket:
    """systemd's end of $NOTIFY_SOCKET (abstract namespace), counting the WATCHDOG=1 pings as they
    come (a socket nobody reads fills up, and the daemon's next ping would block)."""

    def __init__(self) -> None:
        self.name = f"@meddaemon-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.1)
        self.pings = 0
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def watchdog(self, interval_s: float) -> Watchdog:
        return Watchdog({"NOTIFY_SOCKET": self.name, "WATCHDOG_USEC": str(int(interval_s * 1e6))})

    def close(self) -> None:
        self.closed.set()
        self.reader.join(5)
        self.sock.close()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                self.pings += self.sock.recv(4096) == b"WATCHDOG=1"
            except TimeoutError:
                continue


@contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """``daemon.run()`` (live) in a thread; stopped as SIGTERM would stop it."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="daemon-main")
    thread.start()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        thread.join(60)
    assert not thread.is_alive(), "the daemon did not stop"
    assert not failure, failure


def import_version(daemon: Daemon, folder: Path, promote: bool = True) -> int:
    with transaction(daemon.sessions) as session:
        row = registry.import_version(session, folder, daemon.settings.models_dir)
        if promote:
            registry.promote(session, row.task_name, row.version)
        return row.id


@dataclass
class DamagedVersion:
    """busi/v2, imported whole, one byte of its weights changed since, promoted unverified (damaged
    after its check, say): a daemon refuses it (``hash_mismatch``)."""

    id: int
    weights: Path
    whole: bytes

    def mend_and_promote_again(self, daemon: Daemon) -> None:
        """Its weights as imported, verified and promoted again, as ``medcli models promote`` does."""
        self.weights.write_bytes(self.whole)
        verified = registry.verify_registered_copy(daemon.sessions, "busi", "v2", daemon.settings.state_dir)
        with transaction(daemon.sessions) as session:
            registry.promote(session, "busi", "v2", verified=verified)


def promote_damaged_v2(daemon: Daemon, tmp_path: Path) -> DamagedVersion:
    version_id = import_version(daemon, write_model(tmp_path / "busi_v2", version="v2"), promote=False)
    weights = daemon.settings.models_dir / "busi" / "v2" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0x01]))
    with transaction(daemon.sessions) as session:
        registry.promote(session, "busi", "v2")
    return DamagedVersion(version_id, weights, whole)


def drop(inbox: Path, first: int, count: int, task: str = "busi") -> None:
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        write_png(inbox / task / f"synthetic_{i}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))


def states(daemon: Daemon) -> dict[str, str]:
    with daemon.sessions() as session:
        return {s.source_name: s.state for s in session.scalars(select(Scan))}


def versions_of_results(daemon: Daemon, names: list[str]) -> set[int]:
    with daemon.sessions() as session:
        query = select(Result.model_version_id).join(Scan, Scan.id == Result.scan_id)
        return set(session.scalars(query.where(Scan.source_name.in_(names))))


def until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    wait_until(condition, timeout=timeout, what=what)


# -- the main loop turns while a model loads -------------------------------------------------------


def test_while_a_model_loads_files_are_recorded_and_the_watchdog_is_fed(make_settings, tmp_path, monkeypatch):
    gate = Gate(monkeypatch, {"v1"})
    daemon = Daemon(make_settings(**LIVE))
    systemd = WatchdogSocket()
    daemon.watchdog = systemd.watchdog(interval_s=0.2)  # a ping every 0.1 s at least
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1"))

    with contextlib.closing(systemd), running(daemon):
        assert gate.entered.wait(60), "the model load never started"
        pings_at_load = systemd.pings
        drop(daemon.settings.watch, 0, 3, task="busi")
        drop(daemon.settings.watch, 10, 2, task="covid")  # another task, with no model at all
        try:
            until(lambda: len(states(daemon)) == 5, what="the 5 files recorded while the model loads")
            time.sleep(0.5)
            assert set(states(daemon).values()) == {"waiting_model"}
            assert systemd.pings - pings_at_load >= 3, "the watchdog was not fed while the model loaded"
            assert gate.threads == ["model-loader"]
        finally:
            gate.open()
        until(
            lambda: [s for n, s in states(daemon).items() if n.startswith("busi/")] == ["inferred"] * 3,
            what="the busi scans inferred once the model is loaded",
        )
    assert {n: s for n, s in states(daemon).items() if n.startswith("covid/")} == {
        "covid/synthetic_10.png": "waiting_model",
        "covid/synthetic_11.png": "waiting_model",
    }


# -- promotion: the old version serves until the new one is ready -----------------------------------


def test_a_promoted_version_takes_over_only_once_it_is_loaded(make_settings, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="meddaemon")
    gate = Gate(monkeypatch, {"v2"})
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    v1 = import_version(daemon, write_model(tmp_path / "busi_v1", version="v1"))
    inbox = daemon.settings.watch

    with running(daemon):
        until(lambda: "busi" in daemon.stage.served, what="v1 served")
        v2 = import_version(daemon, write_model(tmp_path / "busi_v2", version="v2"))
        try:
            assert gate.entered.wait(60), "the load of v2 never started"
            drop(inbox, 0, 3)
            until(lambda: list(states(daemon).values()) == ["inferred"] * 3, what="scans inferred during the load")
            assert versions_of_results(daemon, [f"busi/synthetic_{i}.png" for i in range(3)]) == {v1}
            assert daemon.stage.served["busi"].version_id == v1
        finally:
            gate.open()
        until(lambda: daemon.stage.served["busi"].version_id == v2, what="v2 served once loaded")
        drop(inbox, 3, 2)
        until(lambda: list(states(daemon).values()) == ["inferred"] * 5, what="scans inferred after the swap")
        assert versions_of_results(daemon, ["busi/synthetic_3.png", "busi/synthetic_4.png"]) == {v2}
    assert "no longer serving busi/v1: busi/v2 replaces it" in caplog.text


def test_a_promoted_version_that_fails_verification_leaves_the_old_one_serving(make_settings, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="meddaemon")
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    v1 = import_version(daemon, write_model(tmp_path / "busi_v1", version="v1"))

    with running(daemon):
        until(lambda: "busi" in daemon.stage.served, what="v1 served")
        # Damaged before it is promoted: promoted first, it could be loaded before the damage.
        import_version(daemon, write_model(tmp_path / "busi_v2", version="v2"), promote=False)
        stored = daemon.settings.models_dir / "busi" / "v2" / "model.safetensors"
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0x01
        stored.write_bytes(bytes(data))
        with transaction(daemon.sessions) as session:
            registry.promote(session, "busi", "v2")  # unverified: damaged after its check, say
        until(lambda: "refusing model busi/v2" in caplog.text, what="v2 refused")
        drop(daemon.settings.watch, 0, 2)
        until(lambda: list(states(daemon).values()) == ["inferred"] * 2, what="scans inferred by v1")
        time.sleep(1.0)  # five polls of the database: the refused version is not tried again
    assert versions_of_results(daemon, ["busi/synthetic_0.png", "busi/synthetic_1.png"]) == {v1}
    refusals = [r.getMessage() for r in caplog.records if "refusing model busi/v2" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].startswith("refusing model busi/v2: hash_mismatch (")
    assert refusals[0].endswith("; busi/v1 keeps serving")


def test_a_version_retired_while_its_refused_successor_is_active_stops_serving(make_settings, tmp_path, caplog):
    """v1 kept serving after v2's refusal, as it should; retired then, it went on scoring every new
    scan (and its reports named it) until the daemon restarted: a task stopped being served only
    when it had no active version, and v2, refused, is one."""
    caplog.set_level(logging.INFO, logger="meddaemon")
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1", version="v1"))

    with running(daemon):
        until(lambda: "busi" in daemon.stage.served, what="v1 served")
        v2 = promote_damaged_v2(daemon, tmp_path).id
        until(lambda: "refusing model busi/v2" in caplog.text, what="v2 refused")
        with transaction(daemon.sessions) as session:
            registry.retire(session, "busi", "v1")
        until(lambda: "busi" not in daemon.stage.served, what="the retired v1 no longer served")
        drop(daemon.settings.watch, 0, 2)
        until(lambda: list(states(daemon).values()) == ["waiting_model"] * 2, what="scans waiting for a model")
    assert versions_of_results(daemon, ["busi/synthetic_0.png", "busi/synthetic_1.png"]) == set()
    assert v2 not in daemon.stage.served.values()


def test_an_active_version_refused_while_its_predecessor_serves_is_named_and_tried_again_once_promoted_again(
    make_settings, tmp_path, caplog
):
    """v2 refused (damaged after its promotion), v1 serving on: ``models list`` named v2 active,
    ``status`` and ``health`` saw nothing (no scan waited), and promoting v2 again once mended
    changed nothing, as promoting the active version did, until the daemon restarted."""
    from meddaemon.daemon.health import check_health
    from meddaemon.db.queries import status_summary

    caplog.set_level(logging.INFO, logger="meddaemon")
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1", version="v1"))

    with running(daemon):
        until(lambda: "busi" in daemon.stage.served, what="v1 served")
        damaged = promote_damaged_v2(daemon, tmp_path)
        v2 = damaged.id
        until(lambda: "refusing model busi/v2" in caplog.text, what="v2 refused")

        def refusal() -> str | None:
            with daemon.sessions() as session:
                return session.get(ModelVersion, v2).refusal

        until(lambda: refusal() is not None, what="the refusal recorded")
        assert refusal().startswith("hash_mismatch: ")
        models = check_health(daemon.engine, daemon.settings).check("models")
        assert models.status == "degraded" and "busi/v2 (hash_mismatch: " in models.message
        with daemon.sessions() as session:
            assert status_summary(session).refused_active_model["busi"]["version"] == "v2"
        assert daemon.stage.served["busi"].version_id != v2  # v1 serves on

        damaged.mend_and_promote_again(daemon)
        until(lambda: daemon.stage.served["busi"].version_id == v2, what="v2 served once promoted again")
        assert "model busi/v2 was promoted again since it was refused: trying it again" in caplog.text
        assert refusal() is None
        assert check_health(daemon.engine, daemon.settings).check("models").status == "ok"


def test_a_version_promoted_again_while_its_refused_load_was_in_flight_is_tried_again(
    make_settings, tmp_path, monkeypatch, caplog
):
    """The refusal, found seconds into a load, was recorded against the promotion read when the
    load ended, a later one that had mended it: the daemon never tried it again."""
    caplog.set_level(logging.INFO, logger="meddaemon")
    refusing, let_go = threading.Event(), threading.Event()
    original = loader.load_and_time

    def refused_late(request, **options):  # type: ignore[no-untyped-def]
        try:
            return original(request, **options)
        except registry.ModelRefused:
            if request.version == "v2":
                refusing.set()
                let_go.wait(30)  # a refusal found late in a slow load (a DenseNet's self-test)
            raise

    monkeypatch.setattr(loader, "load_and_time", refused_late)
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1", version="v1"))
    with running(daemon):
        until(lambda: "busi" in daemon.stage.served, what="v1 served")
        damaged = promote_damaged_v2(daemon, tmp_path)
        v2 = damaged.id
        assert refusing.wait(30)
        damaged.mend_and_promote_again(daemon)  # while the refused load is in flight
        let_go.set()
        until(lambda: daemon.stage.served["busi"].version_id == v2, what="v2 tried again and served")
        with daemon.sessions() as session:
            assert session.get(ModelVersion, v2).refusal is None


def test_a_load_that_breaks_is_logged_once_and_not_retried_at_once(make_settings, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="meddaemon")
    attempts: list[str] = []

    def broken(model: ServedModel, *args, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(model.name)
        raise RuntimeError("SYNTHETIC: out of memory while timing")

    monkeypatch.setattr(ServedModel, "choose_backend", broken)
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1"))

    with running(daemon):
        until(lambda: "could not load model busi/v1" in caplog.text, what="the failed load reported")
        drop(daemon.settings.watch, 0, 2)
        until(lambda: list(states(daemon).values()) == ["waiting_model"] * 2, what="scans recorded, waiting")
        time.sleep(1.0)  # five polls of the database
    assert attempts == ["busi/v1"]
    [message] = [r.getMessage() for r in caplog.records if "could not load model" in r.getMessage()]
    assert message == (
        "could not load model busi/v1: RuntimeError: SYNTHETIC: out of memory while timing; "
        "its scans keep waiting; trying again in 300 s"
    )


def test_once_waits_for_the_loads_and_processes_everything(make_settings, tmp_path, monkeypatch):
    gate = Gate(monkeypatch, {"v1"})
    threading.Timer(1.0, gate.open).start()
    daemon = Daemon(make_settings(max_wait_ms=10, reports=False))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1"))
    drop(daemon.settings.watch, 0, 3)

    daemon.run(once=True)

    assert list(states(daemon).values()) == ["inferred"] * 3


# -- stopping during a load -------------------------------------------------------------------------


def test_a_stop_does_not_wait_for_a_model_load_in_progress(make_settings, tmp_path, monkeypatch):
    gate = Gate(monkeypatch, {"v1"})
    daemon = Daemon(make_settings(**LIVE))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1"))
    try:
        with running(daemon):
            assert gate.entered.wait(60)
            stopped = time.monotonic()
        assert time.monotonic() - stopped < loader.CLOSE_JOIN_SECONDS + 5
    finally:
        gate.open()
        # the load left behind ends in its thread, waited for here: it exported and logged inside the
        # next test of this pytest process (a failure seen with the suite in two processes)
        for thread in gate.held:
            thread.join(120)


@pytest.mark.slow
def test_sigterm_during_a_real_model_load_exits_zero_at_once(daemons, tmp_path):
    """A DenseNet-121 load (hash, self-test, ONNX export, timing) left running in its thread: the
    process exits 0 without waiting for it (Python's shutdown would otherwise abort, exit 134)."""
    from model_factory import promote_into

    models = daemons.layout.state / "models"
    promote_into(f"sqlite:///{daemons.layout.db}", models, write_model(tmp_path / "m", architecture="densenet121"))
    daemon = daemons.start(workers=0)
    wait_until(lambda: "loading model busi/v1 in the background" in daemon.log_text(), timeout=60, what="load")
    time.sleep(1.0)
    daemon.signal(signal.SIGTERM)
    started = time.monotonic()
    assert daemon.wait(30) == 0, daemon.tail()
    assert time.monotonic() - started < 15
    assert "serving busi/v1" not in daemon.log_text()


# -- the backend choice is measured once per version and machine ------------------------------------


def load(folder: Path, version_id: int = 1) -> ServedModel:
    registered, record = registered_folder(folder)
    manifest = registry.read_manifest(folder)
    request = loader.LoadRequest(
        manifest.task, manifest.version, version_id, folder, registered.sha256, dict(registered.manifest)
    )
    return loader.load_and_time(
        request, device=pick_device("cpu"), heatmaps=True, batch=2, graphs=registered.graphs, record_graph=record
    )


def test_the_backend_is_timed_once_and_read_from_the_cache_after(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="meddaemon")
    folder = write_model(tmp_path / "busi_v1")

    first = load(folder)
    assert first.measured and set(first.speeds) == {"eager", "onnx"}
    cache = json.loads((folder / BACKEND_FILE).read_text())
    [entry] = cache["entries"]
    assert entry["key"]["sha256"] == registry.read_manifest(folder).sha256
    assert entry["key"]["batch"] == 2 and entry["key"]["device"] == "cpu"
    assert entry["backend"] == first.backend

    caplog.clear()
    second = load(folder)
    assert not second.measured and second.backend == first.backend and second.speeds == first.speeds
    assert "not measured again" in caplog.text and "chosen (measured" not in caplog.text


def test_the_cached_choice_is_the_one_used(tmp_path: Path):
    folder = write_model(tmp_path / "busi_v1")
    load(folder)
    cache = json.loads((folder / BACKEND_FILE).read_text())
    for backend in ("onnx", "eager"):
        cache["entries"][0]["backend"] = backend
        (folder / BACKEND_FILE).write_text(json.dumps(cache))
        model = load(folder)
        assert not model.measured
        assert model.backend == backend and (model.onnx is not None) == (backend == "onnx")


def test_new_weights_are_timed_again_and_replace_the_old_entry(tmp_path: Path):
    folder = write_model(tmp_path / "busi_v1")
    load(folder)
    old_sha = registry.read_manifest(folder).sha256

    import torch

    torch.manual_seed(5)  # other weights under the same version folder
    from meddaemon.engine.architectures import build_model
    from meddaemon.engine.tasks import BUILTIN_TASKS
    from model_factory import CONTRACT

    spec = BUILTIN_TASKS["busi"]
    registry.save_version(
        build_model("small_cnn", 1, spec.num_outputs),
        task="busi",
        version="v1",
        labels=spec.labels,
        kind=spec.kind,
        architecture="small_cnn",
        input_contract=CONTRACT,
        out_dir=folder,
        training_data_fingerprint="synthetic",
        overwrite=True,
    )
    new_sha = registry.read_manifest(folder).sha256
    assert new_sha != old_sha

    assert load(folder).measured
    keys = [entry["key"]["sha256"] for entry in json.loads((folder / BACKEND_FILE).read_text())["entries"]]
    assert keys == [new_sha]


def test_the_manifests_backend_pin_wins_over_the_cache(tmp_path: Path):
    folder = write_model(tmp_path / "busi_v1")
    load(folder)
    cache = json.loads((folder / BACKEND_FILE).read_text())
    cache["entries"][0]["backend"] = "onnx"
    (folder / BACKEND_FILE).write_text(json.dumps(cache))
    manifest = json.loads((folder / registry.MANIFEST_FILE).read_text())
    manifest["backend"] = "eager"
    (folder / registry.MANIFEST_FILE).write_text(json.dumps(manifest))

    model = load(folder)
    assert model.backend == "eager" and model.onnx is None and not model.measured


def test_a_second_daemon_start_uses_the_cached_choice(make_settings, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="meddaemon")
    settings = make_settings(max_wait_ms=10, reports=False)
    daemon = Daemon(settings)
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1"))
    with daemon.sessions() as session:
        folder = Path(session.scalars(select(ModelVersion.path)).one())

    drop(daemon.settings.watch, 0, 1)  # --once loads a model only when there is work for it
    daemon.run(once=True)
    assert "chosen (measured" in caplog.text and (folder / BACKEND_FILE).exists()
    caplog.clear()
    drop(settings.watch, 1, 1)
    Daemon(settings).run(once=True)
    assert "not measured again" in caplog.text and "chosen (measured" not in caplog.text


# -- start-up: what a start does not do again (issue 16) ---------------------------------------------


def test_the_onnx_graph_is_exported_once_and_read_back_after(tmp_path: Path):
    folder = write_model(tmp_path / "busi_v1")
    first = load(folder)
    assert first.onnx is not None and not first.onnx.cached
    kept = sorted(p.suffix for p in (folder / GRAPH_FOLDER).iterdir())
    assert kept == [".json", ".onnx"]

    second = load(folder)

    assert second.onnx is not None and second.onnx.cached
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    assert np.allclose(
        [p.probabilities for p in second.predict(x)], [p.probabilities for p in first.predict(x)], atol=1e-6
    )


def test_a_kept_graph_whose_bytes_changed_is_exported_again_not_run(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="meddaemon")
    folder = write_model(tmp_path / "busi_v1")
    load(folder)
    [graph] = (folder / GRAPH_FOLDER).glob("*.onnx")
    graph.write_bytes(graph.read_bytes()[:-100])  # cut short

    model = load(folder)

    assert model.onnx is not None and not model.onnx.cached
    assert "is not the one recorded when it was exported; exporting the graph again" in caplog.text
    assert load(folder).onnx.cached  # the new export is kept


def test_a_kept_graph_is_served_only_with_the_hash_its_export_recorded_in_the_database(
    make_settings, tmp_path: Path, caplog
):
    """The graph kept with a version was checked only against the ``.json`` beside it: a graph edited
    (to answer the self-test's two inputs as before, and anything else otherwise) with its ``.json``
    rewritten was served. The database records each export's hash (``model_graphs``)."""
    import hashlib

    import onnx

    from meddaemon.db.models import ModelGraph

    caplog.set_level(logging.INFO, logger="meddaemon")
    settings = make_settings(max_wait_ms=10, reports=False)
    daemon = Daemon(settings)
    daemon.prepare()
    version_id = import_version(daemon, write_model(tmp_path / "busi_v1"))
    with daemon.sessions() as session:
        folder = Path(session.scalars(select(ModelVersion.path)).one())
    for run in range(2):  # the first exports, measures and keeps ONNX Runtime's choice; the second serves its graph
        drop(settings.watch, run, 1)
        Daemon(settings).run(once=True)
        chose_onnx(folder)
    assert "served from the graph kept with the version" in caplog.text
    [graph] = (folder / GRAPH_FOLDER).glob("*.onnx")
    with daemon.sessions() as session:
        [row] = session.scalars(select(ModelGraph)).all()
    assert (row.model_version_id, row.name, row.sha256) == (
        version_id, graph.stem, hashlib.sha256(graph.read_bytes()).hexdigest()
    )  # fmt: skip

    edited = onnx.load_from_string(graph.read_bytes())
    edited.doc_string = "SYNTHETIC: edited after its export"  # any change; a harmless one here
    graph.write_bytes(edited.SerializeToString())
    sidecar = graph.with_suffix(".json")
    document = json.loads(sidecar.read_text())
    document["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()  # its .json rewritten to match
    sidecar.write_text(json.dumps(document))
    caplog.clear()
    drop(settings.watch, 2, 1)
    Daemon(settings).run(once=True)

    assert "is not the one recorded when it was exported; exporting the graph again" in caplog.text
    assert "served from the graph kept" not in caplog.text
    assert list(states(daemon).values()) == ["inferred"] * 3
    with daemon.sessions() as session:
        assert session.scalars(select(ModelGraph.sha256)).one() == hashlib.sha256(graph.read_bytes()).hexdigest()
    assert onnx.load_from_string(graph.read_bytes()).doc_string == ""  # exported again from the verified weights


def chose_onnx(folder: Path) -> None:
    """Make every choice kept in ``folder``'s ``backend.json`` ONNX Runtime, as if it had measured so."""
    path = folder / BACKEND_FILE
    cache = json.loads(path.read_text())
    for entry in cache["entries"]:
        entry["backend"] = "onnx"
    path.write_text(json.dumps(cache))


def test_once_on_an_empty_inbox_loads_no_model_and_with_a_file_it_does(make_settings, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="meddaemon")
    daemon = Daemon(make_settings(max_wait_ms=10, reports=False))
    daemon.prepare()
    import_version(daemon, write_model(tmp_path / "busi_v1"))

    daemon.run(once=True)

    assert "loading model" not in caplog.text and daemon.stage.served == {}
    drop(daemon.settings.watch, 0, 2)
    again = Daemon(daemon.settings)
    again.run(once=True)
    assert "loading model busi/v1" in caplog.text and list(states(again).values()) == ["inferred"] * 2
