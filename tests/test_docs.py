"""The documentation stays true to the repository: every comment citing
docs/behaviour.md names a heading it has, no citation of an outside document's section
numbers is left, and the links of README.md, docs/ and helpers/PROTOCOL.md lead to files
(and headings) that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BEHAVIOUR = ROOT / "docs" / "behaviour.md"
SKIP_DIRS = {".venv", ".git", "build", "dist", "node_modules", "__pycache__"}
SOURCE_SUFFIXES = {".py", ".c", ".h", ".md", ".sh", ".conf", ".example", ".service"}


def project_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in SOURCE_SUFFIXES or path.name in {"Makefile"} or rel.parts[0] == "bench":
            out.append(path)
    return out


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


def flatten(text: str) -> str:
    """Joins wrapped comment and docstring lines, so that a citation broken over two
    lines reads as one: each newline with the next line's indent and comment leader
    becomes one space."""
    return re.sub(r"\s*\n\s*(?:#+|\*|//)?\s*", " ", text)


CITATION = re.compile(
    r"docs/behaviour\.md,?\s+'([^']+)'((?:\s*(?:,|;|and|to|,\s*and)\s+'[^']+')*)"
)
CHAINED = re.compile(r"'([^']+)'")
PREFIXED = re.compile(r"'((?:Gateway|Runtime|Registry pulling): [^']+)'")


def citations() -> list[tuple[str, str]]:
    """(file, heading) for every section of docs/behaviour.md cited in the code."""
    found = []
    for path in project_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if "docs/behaviour.md" not in text and path != BEHAVIOUR:
            continue
        flat = flatten(text)
        rel = str(path.relative_to(ROOT))
        for m in CITATION.finditer(flat):
            found.append((rel, m.group(1)))
            found.extend((rel, name) for name in CHAINED.findall(m.group(2)))
        # Further sections cited in the same sentence ("…, 'Runtime: volumes' for siteFs
        # flags, 'Runtime: environment' …") carry the part's prefix; so do the
        # cross-references inside docs/behaviour.md itself.
        found.extend((rel, name) for name in PREFIXED.findall(flat))
    return found


def test_behaviour_headings_are_unique() -> None:
    names = headings(BEHAVIOUR)
    assert len(names) > 30
    dupes = {n for n in names if names.count(n) > 1}
    slugs = [slug(n) for n in names]
    assert not dupes and len(set(slugs)) == len(slugs), dupes


def test_every_citation_names_a_heading_of_docs_behaviour() -> None:
    known = set(headings(BEHAVIOUR))
    cited = citations()
    assert len(cited) > 60, "the citations were not found: is the pattern still right?"
    wrong = sorted({f"{f}: '{name}'" for f, name in cited if name not in known})
    assert not wrong, "cited headings missing from docs/behaviour.md:\n" + "\n".join(wrong)


def test_no_section_number_citations_are_left() -> None:
    """The reference this project was written from is not in the repository: comments
    cite docs/behaviour.md by heading, never by a section sign or 'spec' and a number."""
    pattern = re.compile(r"\u00a7|\bspec(?:ification)?\s+(?:section\s+)?\d+(?:\.\d+)+")
    left = []
    for path in project_files():
        rel = str(path.relative_to(ROOT))
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line) and not re.search(r"RFC \d+ \u00a7", line):
                left.append(f"{rel}:{n}: {line.strip()}")
    assert not left, "\n".join(left)


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "helpers" / "PROTOCOL.md", ROOT / "bench" / "README.md"]
    return files + sorted((ROOT / "docs").rglob("*.md"))


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_lead_somewhere(md: Path) -> None:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in headings(dest)}:
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, f"{md.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_readme_links_into_docs() -> None:
    """The README is the user guide; design, admin and test notes live in docs/."""
    text = (ROOT / "README.md").read_text()
    for doc in ("docs/admin-guide.md", "docs/behaviour.md", "docs/testing.md"):
        assert f"]({doc}" in text, f"README.md does not link {doc}"
