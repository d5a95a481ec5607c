"""The documentation stays inside the repository and its links and citations resolve.

* every relative markdown link of README.md, deploy/README.md and docs/*.md points at a file of
  the repository, and a ``#anchor`` at a heading of the target (GitHub's anchor rules);
* no tracked file refers to the design notes that used to live outside the repository (a
  clone does not have them; their content is docs/metrics.md and docs/design.md now);
* every "docs/metrics.md §N" citation (docstrings, docs) names a section docs/metrics.md has.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "docs" / "metrics.md"

# Built from parts so that this file does not contain what it looks for.
_SHARED = ".." + "/shared"
FORBIDDEN: tuple[str, ...] = (_SHARED, "shared/" + "METRICS.md", "shared/" + "DESIGN.md")

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
CITATION = re.compile(r"metrics\.md(?:\]\([^)]*\))?((?:[\s,/]*(?:and\s+)?§\s*\d+[a-z]?)+)")
SECTION = re.compile(r"^#{2,3}[ \t]+(\d+[a-z]?)\.[ \t]", re.M)


def _markdown_files() -> list[Path]:
    """The markdown files whose links are checked."""
    return [ROOT / "README.md", ROOT / "deploy" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def _tracked_files() -> list[Path]:
    """Files git tracks (skip the test where the tree is not a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    return [ROOT / name for name in out.decode().split("\0") if name]


def _text(path: Path) -> str | None:
    """A file's text, or None for binary and unreadable files."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code spans (no links live there)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: inline markup and punctuation dropped, lower case,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)        # a link: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def _links(path: Path) -> Iterator[str]:
    """Relative link targets of a markdown file (external and mail links left out)."""
    for target in LINK.findall(_strip_code(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue
        yield target


def test_relative_links_and_anchors_resolve() -> None:
    """Every relative link of the README files and docs/*.md names an existing file of the
    repository and, with ``#anchor``, a heading of that file; the README links both docs."""
    problems: list[str] = []
    for md in _markdown_files():
        assert md.is_file(), f"{md.relative_to(ROOT)} is missing"
        for target in _links(md):
            where = f"{md.relative_to(ROOT)}: ({target})"
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{where} points outside the repository")
            elif not dest.exists():
                problems.append(f"{where}: {dest.relative_to(ROOT)} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)
    readme = set(_links(ROOT / "README.md"))
    assert {"docs/metrics.md", "docs/design.md"} <= readme, sorted(readme)


def test_no_tracked_file_refers_outside_the_repository() -> None:
    """The formulas and the design live in docs/: nothing points at the old external notes."""
    hits: list[str] = []
    for path in _tracked_files():
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(bad in line for bad in FORBIDDEN):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_metrics_citations_name_existing_sections() -> None:
    """Each "docs/metrics.md §N" (or §7b) cited in a tracked file or in docs/ is a numbered
    heading of docs/metrics.md."""
    assert METRICS.is_file(), "docs/metrics.md is missing"
    sections = set(SECTION.findall(METRICS.read_text(encoding="utf-8")))
    assert {str(n) for n in range(1, 12)} <= sections, sorted(sections)
    files = {*_tracked_files(), *_markdown_files()}
    cited: list[tuple[str, str]] = []
    for path in sorted(files):
        text = _text(path)
        if text is None:
            continue
        for match in CITATION.finditer(text):
            lineno = text.count("\n", 0, match.start()) + 1
            for number in re.findall(r"§\s*(\d+[a-z]?)", match.group(1)):
                cited.append((f"{path.relative_to(ROOT)}:{lineno}", number))
    assert cited, "no docs/metrics.md §N citation found"
    missing = [f"{where}: §{number}" for where, number in cited if number not in sections]
    assert not missing, "sections not in docs/metrics.md:\n" + "\n".join(missing)
