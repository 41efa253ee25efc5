"""pyproject.toml: the licence is declared the PEP 639 way with a backend that understands it, and
packages used only by the tests are in the ``test`` extra, never imported by the package."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: the modules the ``test`` extra's distributions install
TEST_ONLY_MODULES = {
    "statsmodels": "statsmodels",
    "pytest": "pytest",
    "psutil": "psutil",
    "pyjpegls": "jpeg_ls",
    "grad-cam": "pytorch_grad_cam",
    "pypdf": "pypdf",
    "confidenceinterval": "confidenceinterval",
    "httpx2": "httpx2",
    "selenium": "selenium",
}


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_the_licence_file_is_the_apache_2_text_and_is_declared():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_the_build_backend_floor_understands_a_licence_expression():
    (requirement,) = (Requirement(r) for r in PYPROJECT["build-system"]["requires"])
    assert requirement.name == "setuptools"
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert floors and min(floors) >= Version("77")  # PEP 639 `license = "..."` and `license-files`


def test_test_only_packages_are_in_the_test_extra_not_the_dependencies():
    runtime = names(PYPROJECT["project"]["dependencies"])
    test_extra = names(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert set(TEST_ONLY_MODULES) <= test_extra
    assert not runtime & set(TEST_ONLY_MODULES)


def test_the_package_imports_no_test_only_module():
    forbidden = set(TEST_ONLY_MODULES.values())
    offenders = []
    for path in sorted((ROOT / "src" / "meddaemon").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in modules if m.split(".")[0] in forbidden]
    assert offenders == []
