"""The project's documents stand alone: every link in them names a file of this repository, and
the README's Datasets table says what the task presets say (``TaskSpec.dataset``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meddaemon.engine.tasks import BUILTIN_TASKS

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/*.md")]
)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def links(document: Path) -> list[str]:
    """The targets of the document's markdown links and images, code blocks left out."""
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def test_the_documents_exist():
    assert (ROOT / "docs" / "design.md") in DOCUMENTS
    assert all(document.is_file() for document in DOCUMENTS)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_names_a_file_in_the_repository(document: Path):
    for target in links(document):
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor in the same document
        assert "://" not in target and not target.startswith("mailto:"), f"{document.name} links outside: {target}"
        resolved = (document.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{document.name} links outside the repository: {target}"
        assert resolved.exists(), f"{document.name} links to a missing file: {target}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_refers_to_notes_outside_the_repository(document: Path):
    text = document.read_text(encoding="utf-8")
    assert "../shared" not in text
    assert "DESIGN.md" not in text  # the design notes are docs/design.md
    assert "seeds/" not in text


def test_the_readme_links_the_design_notes_and_the_licence():
    readme_links = links(ROOT / "README.md")
    assert "docs/design.md" in readme_links
    assert "LICENSE" in readme_links


def test_the_readme_datasets_table_is_the_task_presets_sources():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = "\n".join(
        f"| `{name}` | {s.name} | {s.publisher} | {s.published} | {s.licence} |"
        for name, task in BUILTIN_TASKS.items()
        if (s := task.dataset) is not None
    )
    assert len(expected.splitlines()) == len(BUILTIN_TASKS)
    assert expected in readme, f"update the README's Datasets table to:\n{expected}"


def test_the_readme_says_how_to_install_torch_for_the_cpu_and_for_cuda():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert "CUDA" in install and "Python 3.11" in install
    assert "'.[postgres]'" in install and "'.[test]'" in install
