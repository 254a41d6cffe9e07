"""The design document stays citable: code and docs cite docs/architecture.md by section
("docs/architecture.md §Wire layers", or a Markdown link to its #anchor), so every cited section
must exist, and no file may point at a design document that is not in the repository."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# Text the repository is made of; build outputs, environments and measured results are not.
SUFFIXES = {".py", ".md", ".sh", ".toml", ".yml", ".yaml", ".html", ".js", ".css", ".cfg", ".txt",
            ".service", ".example"}
NAMES = {"Makefile"}
SKIP_DIRS = {".git", "__pycache__", "results", "node_modules"}
CITE = re.compile(r"architecture\.md §([^\n]+)")
ANCHOR = re.compile(r"architecture\.md#([\w-]+)")


MISSING_DOC = "DESIGN" + ".md"  # spelled apart so this file does not cite it


def source_files() -> list[Path]:
    out = []
    for top, dirs, names in os.walk(ROOT):
        # Pruned in place, so environments and build outputs are never walked.
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv") and not d.endswith(".egg-info")]
        out += [Path(top, n) for n in names
                if Path(n).suffix in SUFFIXES or n in NAMES or n.startswith("Dockerfile")]
    return out


def headings() -> list[str]:
    return [line[3:].strip() for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("## ")]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def cites_a_heading(text: str, names: list[str]) -> bool:
    """``text`` (what follows a §) starts with a whole heading name."""
    return any(text.startswith(h) and (len(text) == len(h) or not text[len(h)].isalnum()) for h in names)


@pytest.fixture(scope="module")
def files() -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8", errors="replace")) for p in source_files()]


def test_headings_are_unique() -> None:
    names = headings()
    assert names and len(names) == len(set(names)), names


def test_no_reference_to_a_missing_design_document(files) -> None:
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p, text in files
                 for n, line in enumerate(text.splitlines(), 1) if MISSING_DOC in line]
    assert not offenders, f"cite a section of docs/architecture.md instead: {offenders}"


def test_every_cited_section_exists(files) -> None:
    names, slugs = headings(), {slug(h) for h in headings()}
    bad = []
    for p, text in files:
        bad += [f"{p.relative_to(ROOT)}: §{m.group(1)[:40]}" for m in CITE.finditer(text)
                if not cites_a_heading(m.group(1), names)]
        bad += [f"{p.relative_to(ROOT)}: #{m.group(1)}" for m in ANCHOR.finditer(text) if m.group(1) not in slugs]
    assert not bad, f"sections of docs/architecture.md that do not exist: {bad}"


def test_checker_rejects_a_wrong_section() -> None:
    names = headings()
    assert cites_a_heading("Wire layers).", names)
    assert not cites_a_heading("Wire layer).", names)
    assert not cites_a_heading("Wire layersX", names)
    assert slug("Life of a pseudo-gradient") == "life-of-a-pseudo-gradient"
