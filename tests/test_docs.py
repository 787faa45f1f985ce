"""The documentation a newcomer meets: README.md short, with the two commands and a
table of contents, and every relative link of README.md, docs/ and jobs/ resolving to
a file of the repository and, with an #anchor, to a heading of that file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "jobs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")

pytestmark = pytest.mark.fast


def prose(text: str) -> str:
    """text without fenced code blocks and code spans (their brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose(page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1).replace("`", ""))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text()))
            if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not checked here


def test_slug_follows_github():
    assert slug("Fashion-MNIST to 0.90 with 4 ranks") == "fashion-mnist-to-090-with-4-ranks"
    assert slug("Checkpoints, resume, signals") == "checkpoints-resume-signals"
    assert slug("What `make test` builds") == "what-make-test-builds"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert links(page) or page != ROOT / "README.md", "README.md links to its documentation"
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        if anchor:
            assert resolved.suffix == ".md", target
            assert anchor in anchors(resolved), \
                f"{page.relative_to(ROOT)}: no heading for #{anchor} in {resolved.name}"


def test_the_readme_is_short_and_names_the_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "## Contents" in text
    for command in ("make demo", "make test", "make test-fast"):
        assert command in text, command
    assert all(not page.is_relative_to(ROOT / "docs") or page.name == "design.md"
               or f"docs/{page.name}" in text for page in PAGES), "the README lists every page"
