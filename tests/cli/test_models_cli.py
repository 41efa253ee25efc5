"""``medcli models``: import, list, show, promote, retire; refusals exit 1 with their reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from meddaemon.cli.medcli import cli as medcli
from meddaemon.engine.architectures import build_model
from meddaemon.engine.registry import save_version
from meddaemon.engine.tasks import BUILTIN_TASKS

CONTRACT = {"channels": 1, "height": 32, "width": 32, "mean": [0.449], "std": [0.226], "modalities": []}


def save(folder: Path, version: str, seed: int) -> Path:
    torch.manual_seed(seed)
    save_version(
        build_model("small_cnn", 1, 3), task="busi", version=version, labels=BUILTIN_TASKS["busi"].labels,
        kind="multiclass", architecture="small_cnn", input_contract=CONTRACT, out_dir=folder,
    )  # fmt: skip
    return folder


@pytest.fixture
def run(tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    where = ["--state-dir", str(tmp_path / "state"), "--db", db_url]

    def invoke(*args: str, code: int = 0) -> Any:
        result = runner.invoke(medcli, ["models", *args, *where])
        assert result.exit_code == code, result.output
        return result

    return invoke


def as_json(result: Any) -> Any:
    return json.loads(result.stdout)


def test_import_list_show_promote_retire(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    v1 = save(tmp_path / "src" / "v1", "v1", 1)
    v2 = save(tmp_path / "src" / "v2", "v2", 2)

    data = as_json(run("import", str(v1), "--json"))
    assert (data["task"], data["version"], data["status"]) == ("busi", "v1", "registered")
    assert Path(data["path"]) == (tmp_path / "state" / "models" / "busi" / "v1").resolve()
    assert (Path(data["path"]) / "model.safetensors").is_file()
    out = run("import", str(v2)).stdout
    assert "registered busi/v2" in out

    rows = as_json(run("list", "--json"))
    assert [(r["version"], r["status"]) for r in rows] == [("v1", "registered"), ("v2", "registered")]
    assert as_json(run("list", "--task", "covid", "--json")) == []
    assert "busi" in run("list").stdout

    shown = as_json(run("show", "busi", "v2", "--json"))
    assert shown["manifest"]["version"] == "v2" and shown["manifest"]["labels"] == list(BUILTIN_TASKS["busi"].labels)
    assert shown["manifest"]["sha256"] == shown["sha256"]
    assert "architecture" in run("show", "busi", "v2").stdout

    promoted = as_json(run("promote", "busi", "v1", "--json"))
    assert promoted["status"] == "active" and promoted["promoted_at"] and promoted["previous_active"] is None
    promoted = as_json(run("promote", "busi", "v2", "--json"))
    assert promoted["status"] == "active" and promoted["previous_active"] == "v1"
    statuses = {r["version"]: r["status"] for r in as_json(run("list", "--json"))}
    assert statuses == {"v1": "registered", "v2": "active"}

    retired = as_json(run("retire", "busi", "v2", "--json"))
    assert retired["status"] == "retired" and retired["retired_at"] and retired["was_active"]
    out = run("retire", "busi", "v2").stdout  # again: nothing changes
    assert "busi/v2 is retired" in out and "no active model" not in out
    result = run("promote", "busi", "v2", code=1)
    assert "retired" in result.stderr


def test_a_refused_import_exits_1_with_its_reason(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = save(tmp_path / "src" / "v1", "v1", 1)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    result = run("import", str(folder), code=1)
    assert "refused (hash_mismatch)" in result.stderr and str(weights) in result.stderr
    assert as_json(run("list", "--json")) == []


def test_duplicates_and_unknown_versions_exit_1(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = save(tmp_path / "src" / "v1", "v1", 1)
    run("import", str(folder))
    assert "duplicate_version" in run("import", str(folder), code=1).stderr
    assert "unknown_version" in run("show", "busi", "nope", code=1).stderr
    assert "unknown_version" in run("promote", "busi", "nope", code=1).stderr
