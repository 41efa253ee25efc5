"""The Ray engine: the same probabilities as the local engine (within 1e-6) on the same files, run
after run in one process (a local Ray, then a cluster); a real two-node cluster on this machine that
loses a worker node mid-run and still scores every file exactly once; a run stopped before its end
(a stall, too many unreadable files) leaves no thread inside Ray; usage it cannot serve refused (the
actors' own work: test_ray_workers.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
from dicom_factory import write_png
from sqlalchemy import func, select

from evaluate_factory import files_written
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import Evaluation, EvaluationFile, Heatmap, Result, Scan
from meddaemon.evaluate.pipeline import EvaluationOutcome, EvaluationRequest, run_evaluation
from model_factory import promote_into, write_model
from ports import free_port

ray = pytest.importorskip("ray")

#: one Ray at a time on this machine when the suite runs in several processes (``pytest -n``): a head
#: node takes fixed ports of its own (the client server's, the dashboard agent's)
pytestmark = pytest.mark.xdist_group("ray")


def probabilities(db_url: str) -> dict[str, np.ndarray]:
    engine = create_db_engine(db_url)
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Scan.sha256, Result.probability).join(Result, Result.scan_id == Scan.id).order_by(Result.id)
        ).all()
    engine.dispose()
    out: dict[str, list[float]] = {}
    for sha, p in rows:
        out.setdefault(sha, []).append(p)
    return {k: np.array(v) for k, v in out.items()}


def heatmaps(db_url: str, settings) -> dict[tuple[str, str], tuple[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    """(SHA-256, label) -> (method, grid) for every stored heatmap; each overlay is on disk."""
    engine = create_db_engine(db_url)
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Scan.sha256, Result.label, Heatmap.method, Heatmap.grid, Heatmap.overlay_path)
            .join(Result, Result.scan_id == Scan.id)
            .join(Heatmap, Heatmap.result_id == Result.id)
        ).all()
    engine.dispose()
    assert all(settings.stored_file(overlay).is_file() for *_, overlay in rows)
    return {(sha, label): (method, np.load(io.BytesIO(grid))) for sha, label, method, grid, _ in rows}


def iterating_threads() -> list[str]:
    """A Ray Data executor's scheduling thread and the Ray engine's own, which iterates its output."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("StreamingExecutor", "ray-results"))]


def threads_inside_ray() -> list[str]:
    """Threads waiting in ``ray.get`` or ``ray.wait`` (Ray Data's included)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    inside = []
    for ident, frame in sys._current_frames().items():
        calls = {(f.f_code.co_filename, f.f_code.co_name) for f, _ in traceback.walk_stack(frame)}
        if any(file.endswith("_private/worker.py") and name in ("get", "wait") for file, name in calls):
            inside.append(names.get(ident, str(ident)))
    return inside


# -- real clusters on this machine -----------------------------------------------------------------

SRC = Path(__file__).resolve().parents[2] / "src"
RAY = Path(sys.executable).parent / "ray"
FILES = 800


#: set in the environment of every process of a test cluster, to find them all again
MARKER = "EVALUATE_RAY_TEST_CLUSTER"


def processes_of(marker: str) -> list[psutil.Process]:
    """Processes of this test's cluster and their descendants: Ray's services name the cluster's
    folder in their command line or carry ``MARKER`` in their environment; its agents and workers
    rename themselves, so they are found as children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            ours = any(marker in part for part in proc.info["cmdline"] or ())
            if ours or proc.environ().get(MARKER) == marker:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
    return list(found.values())


@dataclass
class Cluster:
    address: str
    temp: Path
    worker_port: int
    #: processes of a killed node, left to themselves: the teardown kills them too
    orphans: list[psutil.Process] = field(default_factory=list)

    def worker_raylet(self) -> psutil.Process:
        for proc in processes_of(str(self.temp)):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(proc.cmdline())
                if "raylet" in cmdline and f"--node_manager_port={self.worker_port}" in cmdline:
                    return proc
        raise AssertionError("the worker node's raylet is not running")


@contextlib.contextmanager
def ray_cluster(worker_nodes: int, cpus: int = 2) -> Iterator[Cluster]:
    """``ray start --head`` plus ``worker_nodes`` ``ray start --address`` nodes with CPUs of their
    own, without token authentication (as on a machine where no Ray token was ever made); every
    process of it is killed by pid on the way out (never ``ray stop``, which would stop others')."""
    # a short folder: Ray's socket paths under pytest's tmp_path would pass the 107-byte limit
    temp = Path(tempfile.mkdtemp(prefix="rayev", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env |= {MARKER: str(temp), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env |= {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
    common = ["--include-dashboard=false", "--disable-usage-stats"]
    cluster = Cluster(f"127.0.0.1:{port}", temp, worker_port=0)
    try:
        subprocess.run(
            [str(RAY), "start", "--head", "--port", str(port), "--num-cpus", str(cpus), "--temp-dir", str(temp),
             *common],
            env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for _ in range(worker_nodes):
            # chosen once the head holds its ports: the head draws several free ones of its own
            cluster.worker_port = free_port()
            subprocess.run(
                [str(RAY), "start", "--address", cluster.address, "--num-cpus", "2",
                 "--node-manager-port", str(cluster.worker_port), "--disable-usage-stats"],
                env=env, check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        procs = processes_of(str(temp)) + cluster.orphans
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def two_node_cluster() -> Iterator[Cluster]:
    with ray_cluster(worker_nodes=1) as cluster:
        yield cluster


@pytest.fixture
def one_node_cluster() -> Iterator[Cluster]:
    with ray_cluster(worker_nodes=0) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "synthetic_images"
    rng = np.random.default_rng(3)
    for i in range(FILES):
        write_png(folder / f"synthetic_{i:05}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    return folder


def evaluate_into(db_url: str, settings, path: Path, **options) -> EvaluationOutcome:  # type: ignore[no-untyped-def]
    engine = create_db_engine(db_url)
    try:
        return run_evaluation(engine, settings, EvaluationRequest(path, "busi", batch_size=8, **options))
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ray_runs_one_after_another_in_a_process_give_the_local_engines_probabilities_and_heatmaps(
    world, busi_phantoms: Path, make_settings, tmp_path: Path, one_node_cluster: Cluster
) -> None:
    """A local Ray first (no address, with heatmaps), then a cluster in the same process: the local
    start turns Ray's token authentication on for the process, and the cluster has none."""
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    local = evaluate_into(world.db_url, world.settings, busi_phantoms, workers=1, heatmaps=True)
    runs = {}
    for name, address, maps in [("local_ray", None, True), ("cluster", one_node_cluster.address, False)]:
        db_url = f"sqlite:///{tmp_path / name}.db"
        settings = make_settings(db=db_url, state_dir=tmp_path / name)
        promote_into(db_url, settings.models_dir, write_model(tmp_path / f"{name}_model", version="v1"))
        outcome = evaluate_into(db_url, settings, busi_phantoms, engine="ray", ray_address=address, heatmaps=maps)
        runs[name] = (outcome, db_url, settings)

    by_local = probabilities(world.db_url)
    assert local.summary["scored"] == 24 and len(by_local) == 24
    for outcome, db_url, _ in runs.values():
        assert outcome.state == "completed" and outcome.summary["scored"] == 24
        by_ray = probabilities(db_url)
        assert by_ray.keys() == by_local.keys()
        assert max(float(np.abs(by_ray[s] - by_local[s]).max()) for s in by_local) <= 1e-6
    maps_local = heatmaps(world.db_url, world.settings)
    maps_ray = heatmaps(runs["local_ray"][1], runs["local_ray"][2])
    assert len(maps_local) == 24 and maps_ray.keys() == maps_local.keys()  # the top label's map of each scan
    for key, (method, heatmap) in maps_ray.items():
        assert method == maps_local[key][0] and float(np.abs(heatmap - maps_local[key][1]).max()) <= 1e-5
    assert heatmaps(runs["cluster"][1], runs["cluster"][2]) == {}
    assert os.environ.get("RAY_AUTH_MODE") == auth_mode, "the process's Ray settings are left as they were"


def test_without_ray_installed_the_ray_engine_is_refused_before_a_run_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from meddaemon.evaluate.pipeline import check_request
    from meddaemon.evaluate.store import EvaluationError

    monkeypatch.setitem(sys.modules, "ray", None)  # what an installation without meddaemon[ray] imports
    with pytest.raises(EvaluationError, match=r"pip install 'meddaemon\[ray\]'"):
        check_request(EvaluationRequest(Path("cohort"), "busi", engine="ray"))
    check_request(EvaluationRequest(Path("cohort"), "busi", engine="local"))


@pytest.mark.parametrize("address", ["127.0.0.1:{closed}", "ray://127.0.0.1:{closed}", "headless", "host:port"])
def test_a_ray_address_nothing_answers_at_is_refused_before_a_run_starts(address: str) -> None:
    """ray.init retried it for ever (killed after 200 s with only Ray's own warnings printed)."""
    from meddaemon.evaluate.pipeline import check_request
    from meddaemon.evaluate.store import EvaluationError

    address = address.format(closed=free_port())
    started = time.monotonic()
    with pytest.raises(EvaluationError, match=r"--ray-address .*(nothing answers there|not HOST:PORT)"):
        check_request(EvaluationRequest(Path("cohort"), "busi", engine="ray", ray_address=address))
    assert time.monotonic() - started < 10


def test_a_ray_address_that_is_empty_or_given_to_a_local_run_is_refused_not_ignored() -> None:
    """`--ray-address "$RAY_HEAD"` with the variable unset started a local Ray, and an address given
    without --engine ray ran locally: both exit 0 on this machine alone where a cluster was meant."""
    from meddaemon.evaluate.pipeline import check_request
    from meddaemon.evaluate.store import EvaluationError

    with pytest.raises(EvaluationError, match="--ray-address is empty"):
        check_request(EvaluationRequest(Path("cohort"), "busi", engine="ray", ray_address=" "))
    with pytest.raises(EvaluationError, match="--ray-address is for --engine ray, not --engine local"):
        check_request(EvaluationRequest(Path("cohort"), "busi", engine="local", ray_address="auto"))
    # the dashboard's address: said as a host that does not resolve ("Name or service not known")
    with pytest.raises(EvaluationError, match=r"--ray-address http://127.0.0.1:8265: not HOST:PORT"):
        check_request(EvaluationRequest(Path("cohort"), "busi", engine="ray", ray_address="http://127.0.0.1:8265"))


def test_a_ray_address_where_another_service_listens_is_refused_before_a_run_starts() -> None:
    """Only a connection was made: ray.init then waited for ever on PostgreSQL's port (a Ray head is
    a gRPC server, which answers HTTP/2's preface; the real heads of the cluster tests pass)."""
    import socket

    from meddaemon.evaluate.pipeline import check_request
    from meddaemon.evaluate.store import EvaluationError

    with socket.create_server(("127.0.0.1", 0)) as silent:
        for address in ("127.0.0.1:5432", f"127.0.0.1:{silent.getsockname()[1]}"):
            started = time.monotonic()
            with pytest.raises(EvaluationError, match=r"--ray-address .*: what answers there is no Ray head"):
                check_request(EvaluationRequest(Path("cohort"), "busi", engine="ray", ray_address=address))
            assert time.monotonic() - started < 10
    check_request(EvaluationRequest(Path("cohort"), "busi", engine="ray", ray_address="auto"))  # Ray's to resolve


def test_a_ray_client_address_without_ray_client_installed_is_refused_before_a_run_starts() -> None:
    """``meddaemon[ray]`` installs Ray Data, not Ray Client: a ray:// address passed the check and
    the run ended in ray.init's ValueError traceback, exit 1."""
    import importlib.util
    import socket

    from meddaemon.evaluate.pipeline import check_request
    from meddaemon.evaluate.store import EvaluationError

    with socket.create_server(("127.0.0.1", 0)) as head:
        request = EvaluationRequest(
            Path("cohort"), "busi", engine="ray", ray_address=f"ray://127.0.0.1:{head.getsockname()[1]}"
        )
        if importlib.util.find_spec("grpc") is not None:  # Ray Client installed: the address is fine
            check_request(request)
        else:
            with pytest.raises(EvaluationError, match=r"needs Ray Client \(pip install 'ray\[client\]'\)"):
                check_request(request)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_node_lost_mid_run_still_scores_every_file_exactly_once(
    world, many_images: Path, two_node_cluster: Cluster
) -> None:
    killed: dict[str, int] = {}

    def kill_worker_node_once_results_arrive() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not files_written(world.db_url):
            time.sleep(0.05)
        raylet = two_node_cluster.worker_raylet()
        two_node_cluster.orphans += raylet.children(recursive=True)
        killed["workers"] = len(two_node_cluster.orphans)
        killed["at"] = files_written(world.db_url)
        raylet.kill()

    killer = threading.Thread(target=kill_worker_node_once_results_arrive, daemon=True)
    killer.start()
    # medcli in a process of its own, as a user runs it (and Ray's driver state stays out of pytest's)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    env |= {"PYTHONPATH": str(SRC), "RAY_AUTH_MODE": "disabled"}
    # Ray Data may wait for ever after the loss: the run is given up sooner than the default minute
    env |= {"MEDDAEMON_RAY_STALL_SECONDS": "3"}
    args = [str(Path(sys.executable).parent / "medcli"), "evaluate", str(many_images), "--task", "busi"]
    args += ["--engine", "ray", "--ray-address", two_node_cluster.address, "--batch-size", "16", "--json"]
    args += ["--state-dir", str(world.settings.state_dir), "--db", world.db_url]
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    killer.join(10)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)  # Ray's driver prints the lost node's notices: to stderr, with --json

    assert killed and killed["at"] < FILES, "the worker node must die in the middle of the run"
    assert killed["workers"] > 0, "the worker node had Ray workers when it died"
    assert summary["state"] == "completed" and summary["failed"] == 0
    assert summary["scored"] == FILES
    engine = world.engine()
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Scan)) == FILES
        assert session.scalar(select(func.count()).select_from(Result)) == 3 * FILES
        per_file = session.execute(
            select(EvaluationFile.path, func.count()).group_by(EvaluationFile.path).having(func.count() > 1)
        ).all()
        assert per_file == []
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_cluster_of_one_cpu_scores_the_cohort_and_json_is_the_summary_alone(world, busi_phantoms: Path) -> None:
    """The model actor asked for the only CPU and the decoding tasks waited for it for ever (as a
    retry did on what a two-node cluster of one CPU each had left after losing a node)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    env |= {"PYTHONPATH": str(SRC), "RAY_AUTH_MODE": "disabled"}
    args = [str(Path(sys.executable).parent / "medcli"), "evaluate", str(busi_phantoms), "--task", "busi"]
    args += ["--engine", "ray", "--batch-size", "8", "--json"]
    args += ["--state-dir", str(world.settings.state_dir), "--db", world.db_url]
    with ray_cluster(worker_nodes=0, cpus=1) as cluster:
        try:
            run = subprocess.run([*args, "--ray-address", cluster.address], env=env, capture_output=True, text=True,
                                 timeout=150)  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail("the run on a one-CPU cluster did not end")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["state"] == "completed" and summary["scored"] == 24


def medcli_evaluate(world, path: Path, *options: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The ``medcli evaluate`` of ``path`` into ``world`` with ``options``, as a user runs it."""
    args = [str(Path(sys.executable).parent / "medcli"), "evaluate", str(path), "--task", "busi", *options]
    return [*args, "--state-dir", str(world.settings.state_dir), "--db", world.db_url]


def medcli_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    return env | {"PYTHONPATH": str(SRC), "RAY_AUTH_MODE": "disabled", "TMPDIR": str(tmp)}


def evaluation_row(db_url: str, name: str) -> tuple[str, int]:
    engine = create_db_engine(db_url)
    try:
        with session_factory(engine)() as session:
            row = session.scalars(select(Evaluation).where(Evaluation.name == name)).one()
            return row.state, row.scored
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_request_the_cluster_cannot_serve_leaves_a_completed_evaluation_as_it_was(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """--device cuda on a cluster without a GPU is refused once Ray has started (exit 2): the
    refusal turned the completed evaluation of the same name into 'stopped, 0 of 24 scored', its
    audit refused, and kept the local Ray's session folder as if Ray had failed. A file deleted
    since the completed run stays in it too (its row was forgotten as the refused run opened)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's local Ray has a GPU: --device cuda is served")
    cohort = shutil.copytree(busi_phantoms, tmp_path / "Dataset_BUSI_with_GT")
    done = evaluate_into(world.db_url, world.settings, cohort, workers=1, name="cohort")
    assert (done.state, done.summary["scored"]) == ("completed", 24)
    next(cohort.glob("benign/*.png")).unlink()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = medcli_evaluate(world, cohort, "--engine", "ray", "--device", "cuda", "--name", "cohort")
    run = subprocess.run(args, env=medcli_env(tmp), capture_output=True, text=True, timeout=150)

    assert run.returncode == 2, run.stderr[-3000:]
    assert "--device cuda: the Ray cluster has no GPU" in run.stderr
    assert evaluation_row(world.db_url, "cohort") == ("completed", 24)
    engine = world.engine()
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(EvaluationFile)) == 24
    engine.dispose()
    assert list(tmp.glob("mdray-*")) == [], "the local Ray's folder goes with a refused run"
    audit = subprocess.run(
        [str(Path(sys.executable).parent / "medcli"), "audit", "--evaluation", "cohort", "--json",
         "--state-dir", str(world.settings.state_dir), "--db", world.db_url],
        env=medcli_env(tmp), capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_ray_run_stopped_by_sigterm_is_recorded_interrupted_and_exits_143(
    world, many_images: Path, tmp_path: Path
) -> None:
    """Ray's driver turns SIGTERM into sys.exit(15): the run exited 15, an exit code meddaemon has
    not, and without saying how to resume."""
    import signal

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = medcli_evaluate(world, many_images, "--engine", "ray", "--batch-size", "16", "--name", "big")
    run = subprocess.Popen(args, env=medcli_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and run.poll() is None and not files_written(world.db_url):
            time.sleep(0.1)
        assert run.poll() is None, "the run must still be going when it is stopped"
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    assert run.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM: what was scored is stored; run the same command again to resume" in stderr
    state, scored = evaluation_row(world.db_url, "big")
    assert state == "interrupted" and 0 < scored < FILES


def test_a_cluster_ray_cannot_join_is_refused_as_usage_not_a_traceback() -> None:
    """ray.init's ConnectionError ('auto' with no cluster running) or AuthenticationError (a head
    whose token this process lacks) ended the run in a traceback, exit 1, nothing on stdout for --json."""
    from types import SimpleNamespace

    from meddaemon.evaluate import ray_engine
    from meddaemon.evaluate.store import EvaluationError

    def no_cluster(**_options):  # type: ignore[no-untyped-def]
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    stand_in = SimpleNamespace(is_initialized=lambda: False, init=no_cluster, shutdown=lambda: None)
    with pytest.raises(EvaluationError) as refused, ray_engine.ray_session(stand_in, "auto"):
        pytest.fail("no session without a cluster")
    assert str(refused.value).startswith(
        "--ray-address auto: Ray could not join the cluster (ConnectionError: Could not find any running Ray "
        "instance. Please specify the one to connect to.)"
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_refusal_after_files_came_back_stops_the_run_rather_than_calling_it_usage(
    world, busi_phantoms: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry that cannot join the cluster again (its head lost mid-run) is no bad usage: the run
    stopped with files written (exit 1, its summary shown), where the refusal read 'start the cluster'."""
    from meddaemon.evaluate import ray_engine
    from meddaemon.evaluate.pipeline import EvaluationStopped
    from meddaemon.evaluate.reading import FileRead
    from meddaemon.evaluate.store import EvaluationError, FileOutcome
    from meddaemon.failures import FailureReason, ScanFailure

    def head_lost_after_one_file(prepared):  # type: ignore[no-untyped-def]
        failure = ScanFailure(FailureReason.CORRUPT_IMAGE, "SYNTHETIC: read as damaged")
        yield FileOutcome(FileRead(prepared.cohort.relative(prepared.cohort.files[0]), failure=failure)), None
        raise EvaluationError("--ray-address 127.0.0.1:6379: Ray could not join the cluster (ConnectionError: gone)")

    monkeypatch.setattr(ray_engine, "ray_outcomes", head_lost_after_one_file)
    with pytest.raises(EvaluationStopped, match="Ray could not join the cluster") as stopped:
        evaluate_into(world.db_url, world.settings, busi_phantoms, engine="ray", name="lost")
    assert stopped.value.evaluation_id is not None
    state, _ = evaluation_row(world.db_url, "lost")
    assert state == "stopped"
    engine = world.engine()
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(EvaluationFile)) == 1
    engine.dispose()


@pytest.mark.parametrize("failure", ["ray gave up", "stalled"])
def test_a_ray_run_that_fails_is_run_again_over_the_files_not_yet_returned(tmp_path: Path, failure: str) -> None:
    """Ray Data can give up on a run (an actor lost with its node before it started), or wait for
    ever after a node's loss (given up by the driver: the test below): the driver runs the files
    not yet returned again, and none twice."""
    from types import SimpleNamespace
    from unittest.mock import patch

    from meddaemon.evaluate import ray_engine
    from meddaemon.evaluate.reading import FileRead
    from meddaemon.evaluate.store import FileOutcome

    files = [tmp_path / f"synthetic_{i}.png" for i in range(10)]
    request = SimpleNamespace(ray_address=None, heatmaps=False)
    prepared = SimpleNamespace(cohort=SimpleNamespace(files=files), request=request)
    calls: list[list[str]] = []

    def flaky_run(_ray, _prepared, paths, seen, _writers):  # type: ignore[no-untyped-def]
        calls.append(list(paths))
        for n, path in enumerate(paths):
            if len(calls) == 1 and n == 4:
                if failure == "stalled":
                    raise ray_engine.RunStalled("no results for 60 s since a node of the cluster was lost")
                raise ray.exceptions.ActorDiedError()
            seen.add(path)
            yield FileOutcome(FileRead(path)), None

    with (
        patch.object(ray_engine, "_run", flaky_run),
        patch.object(ray, "is_initialized", lambda: True),
        patch.object(ray_engine, "_alive_nodes", lambda _ray: 2),
    ):
        returned = [outcome.read.path for outcome, _ in ray_engine.ray_outcomes(prepared)]  # type: ignore[arg-type,misc]
    assert returned == [str(f) for f in files]
    assert calls == [[str(f) for f in files], [str(f) for f in files[4:]]]


def test_a_run_that_stalls_after_a_node_is_lost_is_given_up_and_one_that_waits_with_every_node_is_not() -> None:
    """Ray Data can wait forever for resources once a node is gone; the driver gives such a run up
    (the files not yet returned then run again in a new job, as the test above shows for a failure)."""
    from types import SimpleNamespace

    from meddaemon.evaluate import ray_engine

    release = threading.Event()

    def one_block_then_nothing(**_options):  # type: ignore[no-untyped-def]
        yield {"path": np.array(["a"], dtype=object)}
        release.wait(10)

    scored = SimpleNamespace(iter_batches=one_block_then_nothing)
    alive = {"count": 2}
    cluster = SimpleNamespace(nodes=lambda: [{"Alive": i < alive["count"]} for i in range(2)])

    blocks = ray_engine._blocks(cluster, scored, nodes=2, stall_seconds=0.5, stop=release.set)
    assert list(next(blocks)["path"]) == ["a"]
    waited = threading.Timer(1.5, lambda: alive.update(count=1))
    waited.start()
    started = time.monotonic()
    with pytest.raises(ray_engine.RunStalled, match="a node of the cluster was lost"):
        for idle in blocks:  # None about once a second while nothing comes: the driver writes meanwhile
            assert idle is None
    assert time.monotonic() - started >= 1.5, "no run is given up while every node is alive"
    assert release.is_set(), "a run given up is stopped"


def test_a_run_given_up_shuts_its_executor_down_so_that_no_thread_is_inside_ray_when_the_driver_leaves() -> None:
    """``ray.shutdown()`` while a thread waits inside Ray's core worker can end the process with
    SIGSEGV (it did, in the node-loss test above): a stalled run's executor is shut down, and Ray
    Data's threads and the run's own have returned, before ``_blocks`` gives the stall to its caller."""
    from types import SimpleNamespace

    from meddaemon.evaluate import ray_engine

    def wait_forever(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A task that never returns (defined here: Ray's workers get it by value, not by import)."""
        threading.Event().wait()
        return batch

    one_node_of_two_left = SimpleNamespace(nodes=lambda: [{"Alive": True}])
    with ray_engine.ray_session(ray, None):
        executors = ray_engine.new_data_context(ray)
        never = ray.data.from_items([{"x": i} for i in range(4)]).map_batches(wait_forever, batch_size=2)
        blocks = ray_engine._blocks(one_node_of_two_left, never, nodes=2, stall_seconds=0.5, stop=executors.shut_down)
        with pytest.raises(ray_engine.RunStalled):
            list(blocks)
        assert iterating_threads() == []
        assert threads_inside_ray() == []


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_ray_run_over_too_many_unreadable_files_stops_with_a_message_and_leaves_ray_cleanly(
    world, tmp_path: Path
) -> None:
    """More than 5 % unreadable stops a Ray run as it stops a local one. The unreadable files come
    first and the driver checks at each write, so it leaves Ray Data's output before the end: the
    run's executor is shut down as for a stall, and no thread is left inside Ray."""
    from unittest.mock import patch

    from meddaemon.evaluate.pipeline import EvaluationStopped

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        (folder / f"a_empty_{i:02}.png").write_bytes(b"")
    rng = np.random.default_rng(4)
    for i in range(600):
        write_png(folder / f"synthetic_{i:03}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    with (
        patch("meddaemon.evaluate.pipeline.FLUSH_SECONDS", 0.0),
        pytest.raises(EvaluationStopped, match="of 640 images cannot be read"),
    ):
        evaluate_into(world.db_url, world.settings, folder, engine="ray")
    assert iterating_threads() == [] and threads_inside_ray() == []
    engine = create_db_engine(world.db_url)
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "stopped" and 32 < row.failures["empty_file"] <= 40, "stopped once over 5 % (32)"
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_file_names_that_are_not_utf8_go_through_ray_and_are_stored_as_the_local_engine_stores_them(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Data holds the paths in Arrow, whose strings refuse a name that is not UTF-8 (Ray keeps
    such a column as Python objects): the files are scored, and their names stored %XX-escaped, as
    by the local engine. The local Ray's session folder goes with it (Ray's default left one in
    ``$RAY_TMPDIR/ray`` at every run)."""
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="raytmp", dir="/tmp"))  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for name in (b"sc\xe9n 1.png", b"sc\xe9n 2.png", b"plain.png"):
        write_png(Path(os.fsdecode(os.fsencode(folder) + b"/" + name)), rng.integers(0, 255, (32, 32), dtype=np.uint8))
    try:
        outcome = evaluate_into(world.db_url, world.settings, folder, engine="ray")
        assert list(ray_tmpdir.iterdir()) == []
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert outcome.state == "completed" and outcome.summary["scored"] == 3 and outcome.summary["failed"] == 0
    engine = create_db_engine(world.db_url)
    with session_factory(engine)() as session:
        assert sorted(session.scalars(select(Scan.source_name))) == ["plain.png", "sc%E9n 1.png", "sc%E9n 2.png"]
    engine.dispose()


def test_a_local_ray_s_folder_is_where_ray_would_make_its_own_made_if_missing_and_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meddaemon.evaluate.ray_engine import local_ray_folder

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    short = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    made: list[Path] = []
    try:
        monkeypatch.setenv("TMPDIR", str(short))
        made.append(local_ray_folder())
        assert made[-1].parent == short  # as Ray's own default, $TMPDIR/ray
        monkeypatch.setenv("RAY_TMPDIR", str(short / "not yet"))
        made.append(local_ray_folder())
        assert made[-1].parent == short / "not yet"  # made, as Ray makes it
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # pytest's: too long for Ray's socket paths
        made.append(local_ray_folder())
        assert made[-1].parent == Path("/tmp") and made[-1].name.startswith("mdray-")
    finally:
        for folder in made:
            folder.rmdir()
        shutil.rmtree(short, ignore_errors=True)


def test_device_cuda_on_a_ray_cluster_without_a_gpu_is_refused_rather_than_waited_for() -> None:
    from meddaemon.evaluate.ray_engine import plan_actors
    from meddaemon.evaluate.store import EvaluationError

    with pytest.raises(EvaluationError, match="the Ray cluster has no GPU"):
        plan_actors({"CPU": 4.0}, 2, "cuda")
    on_gpus = plan_actors({"CPU": 32.0, "GPU": 4.0}, 2, "auto")
    assert on_gpus.gpu and on_gpus.actors == 4
    on_cpus = plan_actors({"CPU": 4.0}, 2, "auto")
    assert not on_cpus.gpu and on_cpus.actors == 2 and on_cpus.threads == 2


def test_a_ray_cluster_left_without_a_cpu_is_refused_rather_than_waited_for() -> None:
    """A head started with --num-cpus 0 whose worker node was lost: the retry waited for ever, silent."""
    from meddaemon.evaluate.ray_engine import plan_actors
    from meddaemon.evaluate.store import EvaluationError

    for resources in ({}, {"CPU": 0.0}, {"CPU": 0.0, "GPU": 1.0}):
        with pytest.raises(EvaluationError, match="the Ray cluster has no CPU to decode on"):
            plan_actors(resources, 1, "auto")
    assert plan_actors({"CPU": 1.0}, 1, "auto").task_cpus == 0.5
