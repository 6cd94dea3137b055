"""What the docs tests read from the Markdown sources: code blocks, links, headings.

A small line-based reader, enough for the pages of this repository: fenced code
blocks (indented ones inside admonitions and lists included), the HTML comments that
steer the example tests, Markdown links and images outside code, and the anchors a
page defines (its headings, ``{#id}`` attributes and the ``::: gradclip.X`` objects
mkdocstrings renders).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<rest>.*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")
SETUP_OPEN = re.compile(r"^\s*<!--\s*test-setup\s*$")
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"(?P<target>[^\"]+)\"")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<title>.+?)\s*(?:\{(?P<attrs>[^}]*)\})?\s*#*\s*$")
ATTR_ID = re.compile(r"\{[^}]*#(?P<id>[\w.:-]+)[^}]*\}")
TITLE = re.compile(r'title="(?P<title>[^"]*)"')
AUTODOC = re.compile(r"^:::\s+(?P<path>[\w.]+)\s*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block (or a hidden ``test-setup`` comment) of a Markdown file.

    Attributes:
        path: the file.
        line: the 1-based line of its first code line.
        lang: the fence's language (``python``, ``sh``, ...); ``python`` for setup.
        code: the code, dedented to the fence's indentation.
        skip: the reason given by a ``<!-- no-run: ... -->`` comment on the line
            before the fence, or None.
        hidden: a ``<!-- test-setup ... -->`` comment: run, but not shown to readers.
        title: the fence's ``title="..."`` attribute (``Output`` marks the printed
            output of the block before it), or None.
    """

    path: Path
    line: int
    lang: str
    code: str
    skip: str | None = None
    hidden: bool = False
    title: str | None = None

    @property
    def where(self) -> str:
        """``file:line`` relative to the repository root."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    """The README and every page of the documentation."""
    pages = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.relative_to(DOCS).parts)
    return [README, *pages]


def blocks(path: Path) -> list[Block]:
    """The file's fenced code blocks and hidden setup comments, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    previous = ""  # the last non-blank line outside code
    while i < len(lines):
        line = lines[i]
        if SETUP_OPEN.match(line):
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "-->":
                i += 1
            out.append(Block(path, start + 1, "python", "\n".join(lines[start:i]), hidden=True))
            i += 1
            continue
        match = FENCE.match(line)
        if match is None:
            if line.strip():
                previous = line
            i += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"].lower()
        start = i + 1
        i += 1
        body: list[str] = []
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        skip = NO_RUN.match(previous)
        title = TITLE.search(match["rest"])
        out.append(
            Block(
                path,
                start + 1,
                lang,
                "\n".join(body),
                skip=skip["reason"] if skip else None,
                title=title["title"] if title else None,
            )
        )
        previous = ""
        i += 1
    return out


def prose_lines(path: Path, *, strip_code: bool = True) -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines outside fenced code (inline code removed)."""
    out = []
    in_fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if in_fence is None and match is not None:
            in_fence = match["fence"]
            continue
        if in_fence is not None:
            closing = line.strip()
            if closing.startswith(in_fence) and not closing.strip(in_fence[0]):
                in_fence = None
            continue
        out.append((number, INLINE_CODE.sub("", line) if strip_code else line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link and image outside code.

    The text of a link (an image's alt text) may run over several lines.
    """
    numbered = prose_lines(path)
    total = len(path.read_text(encoding="utf-8").splitlines())
    lines = [""] * total
    for number, line in numbered:
        lines[number - 1] = line
    text = "\n".join(lines)
    out = []
    for pattern in (LINK, IMG_SRC):
        for m in pattern.finditer(text):
            out.append((text.count("\n", 0, m.start()) + 1, m["target"]))
    return sorted(out)


def mkdocs_slug(title: str) -> str:
    """The anchor MkDocs (Python-Markdown's ``toc``) gives a heading."""
    text = re.sub(r"<[^>]+>", "", title).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading of a README."""
    text = re.sub(r"<[^>]+>", "", title).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a page defines: headings, ``{#id}`` attributes, mkdocstrings objects."""
    slug = github_slug if path == README else mkdocs_slug
    found: set[str] = set()
    for _, line in prose_lines(path, strip_code=False):
        heading = HEADING.match(line)
        if heading is not None:
            explicit = ATTR_ID.search("{" + (heading["attrs"] or "") + "}")
            found.add(explicit["id"] if explicit else slug(heading["title"]))
        found.update(m["id"] for m in ATTR_ID.finditer(line))
        autodoc = AUTODOC.match(line.strip())
        if autodoc is not None:
            found.add(autodoc["path"])
    return found
