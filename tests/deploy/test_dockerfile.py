"""deploy/Dockerfile, read instruction by instruction (no engine here to build it)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from meddaemon.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def only(keyword: str) -> str:
    found = [args for kw, args in instructions() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, args in instructions():
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
    return values


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_the_base_is_python_311_slim():
    assert only("FROM") == "python:3.11-slim"


def test_torch_comes_from_the_cpu_index_pinned_within_pyprojects_ranges():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {r.name: r.specifier for r in map(Requirement, dependencies)}
    install = next(args for kw, args in instructions() if kw == "RUN" and "torch==" in args)
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    pins = dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", install))
    assert pins == {"torch": "2.14.1", "torchvision": "0.29.1"}
    for name, version in pins.items():
        assert ranges[name].contains(version), f"{name}=={version} is outside pyproject's {ranges[name]}"


def test_the_package_is_installed_from_the_copied_sources_with_postgresql_support():
    copied = [shlex.split(args)[:-1] for kw, args in instructions() if kw == "COPY"]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository root (the build context)"
    assert any(kw == "RUN" and 'pip install ".[postgres]"' in args for kw, args in instructions())


def test_every_file_the_package_declares_is_copied_into_the_build():
    """pyproject's readme and license-files: without LICENSE the image carried no licence text
    (Apache-2.0 section 4(a)) and setuptools warns that such builds will stop working."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {project["readme"], *project["license-files"]}
    copied = {source for kw, args in instructions() if kw == "COPY" for source in shlex.split(args)[:-1]}
    assert declared <= copied, f"declared by pyproject.toml, not copied: {sorted(declared - copied)}"


def test_it_runs_as_a_non_root_user():
    user = only("USER")
    assert user not in ("root", "0")
    assert any(kw == "RUN" and "useradd" in args and user in args for kw, args in instructions())


def test_settings_come_from_the_environment_and_name_real_keys():
    values = {k: v for k, v in env().items() if k.startswith("MEDDAEMON_")}
    settings = load_settings(env=values, flags={})
    for key in values:
        name = key.removeprefix("MEDDAEMON_").lower()
        assert settings.sources.get(name) == f"env {key}", f"{key} is not a meddaemon setting"
    assert str(settings.watch) == "/inbox"
    assert str(settings.state_dir) == "/var/lib/meddaemon"
    assert settings.metrics_host == "0.0.0.0"
    assert settings.dicom_host == "0.0.0.0"  # reachable from outside the container once a port is set
    assert settings.dicom_port == 0  # the receiver is off unless asked for


def test_inbox_and_state_are_volumes_and_the_metrics_and_dicom_ports_are_exposed():
    volumes = exec_form(only("VOLUME"))
    values = env()
    assert sorted(volumes) == sorted([values["MEDDAEMON_WATCH"], values["MEDDAEMON_STATE_DIR"]])
    metrics, dicom = only("EXPOSE").split()
    assert metrics == values["MEDDAEMON_METRICS_PORT"]
    # the DICOM port exposed is the one the deploy README's docker run sets and publishes
    guide = (ROOT / "deploy" / "README.md").read_text()
    assert f"-e MEDDAEMON_DICOM_PORT={dicom} " in guide and f"-p {dicom}:{dicom} " in guide


def test_the_entrypoint_starts_the_daemon_under_debians_tini(real_command):
    entrypoint = exec_form(only("ENTRYPOINT"))
    assert entrypoint[:2] == ["/usr/bin/tini", "--"]  # where Debian's tini package installs it
    daemon = entrypoint[2:]
    assert daemon == ["meddaemon", "start"]
    assert real_command(daemon).name == "start"
    # the arguments the header suggests appending to `docker run IMAGE`
    assert real_command([*daemon, "--observer", "polling"]).name == "start"
    installs = [args for kw, args in instructions() if kw == "RUN" and "apt-get install" in args]
    assert any("tini" in shlex.split(args.split("apt-get install", 1)[1].split("&&")[0]) for args in installs)


def docker_exec_lines(text: str) -> list[list[str]]:
    """The ``docker exec CONTAINER medcli ...`` commands in a text, as the argv run in the container."""
    commands = []
    for line in text.splitlines():
        if not line.lstrip("# ").startswith("docker exec "):
            continue
        words = shlex.split(line.lstrip("# "))
        if words[:2] == ["docker", "exec"]:
            commands.append(words[3:])
    return commands


def test_models_get_in_with_medcli_models_import_from_a_read_only_mount(real_command):
    for document in (DOCKERFILE, ROOT / "deploy" / "README.md"):
        text = document.read_text()
        commands = docker_exec_lines(text)
        imports = [c for c in commands if c[:3] == ["medcli", "models", "import"]]
        assert imports, f"{document.name} does not show how a model gets in"
        for command in commands:
            real_command(command)
        assert all(c[3].startswith("/models/") for c in imports)
        assert re.search(r"-v \S+:/models:ro\b", text), f"{document.name}: /models is not mounted read-only"
        assert any(c[:3] == ["medcli", "models", "promote"] for c in commands)
    # the import copies into the state directory, which is a volume: models survive a new container
    assert env()["MEDDAEMON_STATE_DIR"] in exec_form(only("VOLUME"))


def test_the_healthcheck_runs_meddaemon_health_and_is_unhealthy_only_when_down(real_command):
    options, _, command = only("HEALTHCHECK").partition("CMD")
    assert "--start-period=" in options and "--interval=" in options
    argv = exec_form(command.strip())
    assert argv[:2] == ["sh", "-c"]
    steps = [shlex.split(step) for step in argv[2].split(";")]
    assert real_command(steps[0]).name == "health"
    # Docker reserves exit code 2; health's "down" (2) becomes 1, "degraded" (1) stays healthy
    assert steps[1] == ["test", "$?", "-ne", "2"]


def test_it_stops_with_sigterm_to_finish_the_batch_in_hand():
    assert only("STOPSIGNAL") == "SIGTERM"
