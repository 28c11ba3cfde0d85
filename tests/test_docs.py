"""The project owns its documentation: nothing points outside the repository, every link resolves.

* No file of the project (tracked, or new and not ignored) names a path outside the repository
  (the design notes the project started from are not part of it).
* Every relative link in README.md and docs/*.md points to an existing file inside the
  repository, and the README links every page of docs/.
* A mention of a docs page from outside docs/ spells its path (``docs/METHODS.md``), and a cited
  METHODS section (``§N``) exists.
* Every ``conceptlens.…`` name that docs/*.md cite in backticks imports (module) or resolves
  (attribute), so the pages follow the code when modules move.
"""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("METHODS.md", "ARCHITECTURE.md", "OFFLINE.md")
# Spelled in pieces so that this file does not match itself.
OUTSIDE_PATHS = (".." + "/shared", "shared" + "/design")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
BARE_PAGE = re.compile(r"(?<![\w/.-])(" + "|".join(re.escape(page) for page in PAGES) + r")")
SECTION_CITATION = re.compile(r"METHODS\.md\s*§\s*(\d+)")
CITED_NAME = re.compile(r"`(conceptlens(?:\.[A-Za-z_]\w*)+)")


def _project_files() -> list[Path]:
    """Tracked files plus new files git does not ignore (what a commit of the tree would hold)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the project's file list is unknown")
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    return sorted(path for path in paths if path.is_file())


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """Markdown without fenced code blocks (links inside them are not links)."""
    return FENCED_BLOCK.sub("", text)


def _links(text: str) -> list[str]:
    prose = INLINE_CODE.sub("", _prose(text))
    return MARKDOWN_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def _is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")))


def test_docs_pages_exist():
    for page in PAGES:
        assert (DOCS / page).is_file(), f"docs/{page} is missing"


def test_no_project_file_points_outside_the_repository():
    offenders = []
    for path in _project_files():
        data = path.read_bytes()
        for pattern in OUTSIDE_PATHS:
            if pattern.encode() in data:
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not offenders, "files that point outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("markdown", _markdown_files(), ids=lambda path: path.name)
def test_relative_links_resolve_inside_the_repository(markdown):
    broken = []
    for target in _links(markdown.read_text(encoding="utf-8")):
        if not _is_relative(target):
            continue
        path_part = target.split("#", 1)[0].split("?", 1)[0]
        if not path_part:
            continue
        resolved = (markdown.parent / path_part).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{markdown.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    targets = {target.split("#", 1)[0] for target in _links((ROOT / "README.md").read_text(encoding="utf-8"))}
    missing = [f"docs/{page}" for page in PAGES if f"docs/{page}" not in targets]
    assert not missing, f"README.md does not link {missing}"


def test_mentions_of_docs_pages_spell_their_path():
    offenders = []
    for path in _project_files():
        if path.parent == DOCS or path == Path(__file__).resolve() or path.suffix in (".safetensors", ".png", ".jpg"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if BARE_PAGE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "write docs/METHODS.md (etc.), the page's path in the repository:\n" + "\n".join(offenders)


def test_cited_methods_sections_exist():
    headings = set(re.findall(r"^## §(\d+)\b", (DOCS / "METHODS.md").read_text(encoding="utf-8"), re.MULTILINE))
    assert {"1", "2", "3", "4", "5", "6", "7"} <= headings
    missing = []
    for path in _project_files():
        if path.suffix not in (".py", ".md", ".toml", ".yaml", ".yml", ".txt") and path.name != "Makefile":
            continue
        for number in SECTION_CITATION.findall(path.read_text(encoding="utf-8")):
            if number not in headings:
                missing.append(f"{path.relative_to(ROOT)}: §{number}")
    assert not missing, "citations of METHODS sections that do not exist:\n" + "\n".join(missing)


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError as error:
            if error.name is None or not ".".join(parts[:end]).startswith(error.name):
                raise
            continue
        for attribute in parts[end:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_names_cited_in_docs_exist():
    cited = sorted({name for page in PAGES for name in CITED_NAME.findall((DOCS / page).read_text(encoding="utf-8"))})
    assert len(cited) >= 20, cited
    unresolved = []
    for name in cited:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{name} ({type(error).__name__}: {error})")
    assert not unresolved, "docs cite names that do not exist:\n" + "\n".join(unresolved)
