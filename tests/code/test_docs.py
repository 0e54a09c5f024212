"""The README and docs/ hold together: a short README, links that resolve, no development history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 280

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
# Development history and the machines it ran on belong in commit messages, not in the docs.
FORBIDDEN = re.compile(r"session\s*-?\s*\d|Sapphire|EPYC|Zen\s*4|Xeon", re.IGNORECASE)


def _prose(path: Path) -> str:
    """The page without its fenced code blocks (shell comments there are not headings)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    return {_anchor(h) for h in HEADING.findall(_prose(path))}


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_docs_folder_holds_the_guides():
    names = {p.name for p in DOCS}
    for name in (
        "data.md",
        "training.md",
        "tuning.md",
        "promotion.md",
        "serving.md",
        "edge.md",
        "scale-out.md",
        "performance.md",
        "reliability.md",
        "development.md",
    ):
        assert name in names, f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{_id(page)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_no_development_history(page):
    text = page.read_text(encoding="utf-8")
    hits = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for m in FORBIDDEN.finditer(text)
    ]
    assert not hits, f"{_id(page)} names development sessions or machines: {hits}"


def test_the_link_checker_sees_links():
    """Guards the checks above against a regex that matches nothing."""
    targets = LINK.findall(_prose(README))
    assert "docs/training.md" in targets and "docs/mlflow_compare.png" in targets
    assert _anchor("## 4. `deploy/`: Docker Compose and Kubernetes"[3:]) == (
        "4-deploy-docker-compose-and-kubernetes"
    )
