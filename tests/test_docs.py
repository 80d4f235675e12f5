"""The repository documents itself: README, docs/ and docstrings link nothing outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUTSIDE = re.compile(r"\.\./shared|METHOD\.md|DESIGN\.md|/work/")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[Path]:
    """Files git tracks (or would), or, outside a git checkout, every file below the root."""
    proc = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        out = proc.stdout.split()
    else:
        out = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
               and not any(part.startswith(".") or part in ("__pycache__", "build")
                           or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    return [ROOT / f for f in out if f.endswith((".py", ".md", ".yaml", ".toml")) and not f.startswith("results/")
            and (ROOT / f).is_file()]


def test_docs_folder_has_the_pages():
    names = {p.name for p in DOCS}
    assert {"method.md", "tiers.md", "pipeline.md", "extending.md"} <= names


@pytest.mark.parametrize("path", _tracked_text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(path):
    if path.name == "test_docs.py":
        return
    hits = [line for line in path.read_text().splitlines() if OUTSIDE.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} refers outside the repository: {hits[:3]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_tests_named_in_the_docs_exist(doc):
    defined = set()
    for test_file in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", test_file.read_text(), flags=re.M))
    named = set(re.findall(r"`(test_\w+)`", doc.read_text()))
    missing = sorted(n for n in named - defined if not (ROOT / "tests" / f"{n}.py").exists())
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"


def test_generated_readme_blocks_equal_the_files_they_copy():
    """Every sentence of the README's generated blocks (the image-tier results) comes from the file
    the table stage wrote: ``python -m replication.readme_block`` syncs them."""
    from replication.readme_block import blocks

    readme = (ROOT / "README.md").read_text()
    found = blocks(readme)
    assert found, "the README has no generated block (the image tier's results)"
    for path, body in found:
        assert body == (ROOT / path).read_text(), f"README block of {path} is stale: python -m replication.readme_block"


def test_readme_block_sync_replaces_only_the_block(tmp_path):
    from replication.readme_block import synced

    (tmp_path / "s.md").write_text("new line\n")
    text = "intro\n<!-- generated: s.md -->\nold\n<!-- end generated -->\noutro\n"
    assert synced(text, tmp_path) == "intro\n<!-- generated: s.md -->\nnew line\n<!-- end generated -->\noutro\n"
