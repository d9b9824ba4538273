"""The documentation: README.md is the Space's page (short, with the setup commands), the rest lives in
docs/, every relative link resolves, and nothing is worded as if read on the day it was written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

README_MAX_LINES = 200  # the Space page: what it does, try it, setup, use, figures, limits, links
MIN_DOC_FILES = 3  # training, results, benchmarks, architecture... live in docs/
SETUP_COMMANDS = (
    "pip install -r requirements.txt && python app.py",
    "pip install -r requirements-dev.txt && python -m pytest -q",
)
# Wording that is true only on the day it was written ("today's code" is wrong the day after).
SESSION_WORDING = re.compile(
    r"\b(this|last|previous|earlier|next) session\b|\bsession before\b|\btoday\b|\byesterday\b|\btomorrow\b"
    r"|\bright now\b|\bthis week\b",
    re.IGNORECASE,
)

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](src)
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, data:...


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a link or a heading is not one."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading.replace("`", ""))
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path) -> list[str]:
    """Relative links and images of a Markdown file whose file, folder or heading anchor does not exist."""
    text = prose(path.read_text(encoding="utf-8"))
    bad = []
    for target in MD_LINK.findall(text) + HTML_LINK.findall(text):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{path.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.name}: {target} (no such heading)")
    return bad


def session_wording(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(lines, 1) if SESSION_WORDING.search(line)]


# -- the checker itself -------------------------------------------------------------------------------
def test_link_checker_finds_missing_files_and_headings(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Fine-tuning on CIDEr-D: SCST\n", encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"png")
    page = tmp_path / "README.md"
    page.write_text(
        "# Page\n\n## Use it\n\n![shot](pic.png) [ok](docs/other.md#fine-tuning-on-cider-d-scst) [self](#use-it)\n"
        "[web](https://example.com/x.md) <img src=\"pic.png\"> `[code](nowhere.md)`\n\n"
        "```\n[fenced](nowhere-either.md)\n```\n\n"
        "[gone](docs/missing.md) ![gone](docs/missing.png) [bad anchor](docs/other.md#scst) "
        "<img src=\"gone.jpg\" width=\"10\"> [no heading](#nope)\n",
        encoding="utf-8")
    assert broken_links(page) == [
        "README.md: docs/missing.md (no such file)", "README.md: docs/missing.png (no such file)",
        "README.md: docs/other.md#scst (no such heading)", "README.md: #nope (no such heading)",
        "README.md: gone.jpg (no such file)"]


def test_session_wording_checker(tmp_path):
    page = tmp_path / "notes.md"
    page.write_text("Measured 2026-11-27.\nToday's code is faster.\nAs in the last session.\nThe sessions table.\n",
                    encoding="utf-8")
    assert session_wording(page) == ["notes.md:2: Today's code is faster.", "notes.md:3: As in the last session."]


# -- the project's documentation ---------------------------------------------------------------------
def test_readme_is_a_short_space_page():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the Space page keeps at most {README_MAX_LINES}"
    for command in SETUP_COMMANDS:
        assert command in text, f"README.md lost the setup command: {command}"


def test_readme_keeps_the_space_front_matter():
    from huggingface_hub.repocard import metadata_load

    assert README.read_text(encoding="utf-8").startswith("---\n")
    meta = metadata_load(README)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py", meta


def test_docs_folder_holds_the_rest():
    files = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(files) >= MIN_DOC_FILES, f"docs/ holds {files}"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_wording_tied_to_a_session(path):
    assert session_wording(path) == [], "say when it was measured (e.g. 'measured 2026-11-27') instead"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_snippets_compile(path):
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    for i, block in enumerate(blocks):
        compile(block, f"{path.name} python block {i + 1}", "exec")
