"""A griffe extension: render the reStructuredText habits of gradclip's docstrings in Markdown.

gradclip's docstrings are Google style (which mkdocstrings parses) with a few
reStructuredText habits that Markdown would show literally or mangle:

* roles such as ``:func:`gradclip.attach``` and ``:class:`~gradclip.clippers.base.Clipper```
  become optional cross-references: a link when the target is in the API reference,
  plain code otherwise, never a broken link;
* doctest sessions (``>>>`` lines and their output) become fenced ``pycon`` blocks
  (Markdown would read ``>>>`` as nested quotes and ``[0.5, 1.0]`` as a link);
* a paragraph ending in ``::`` before a literal block ends in ``:`` (the block itself,
  indented by four spaces, already is a Markdown code block).

The docstrings are not changed on disk: this runs when mkdocstrings loads the package
(``mkdocs.yml``, ``extensions:``). The directory ``docs/_ext`` is not part of the site.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`<>]+?)`")
LITERAL_INTRO = re.compile(r"(\S)::$", re.MULTILINE)
BARE_LITERAL_INTRO = re.compile(r"^[ \t]*::[ \t]*$\n?", re.MULTILINE)
PROMPT = re.compile(r"^([ \t]*)>>>( |$)")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    title = target.rsplit(".", 1)[-1] if short else target
    identifier = target.removesuffix("()")
    if "." not in identifier:  # a bare name in gradclip's docstrings is one of its exports
        identifier = f"gradclip.{identifier}"
    return f'<autoref optional identifier="{identifier}"><code>{title}</code></autoref>'


def fence_doctests(text: str) -> str:
    """Wrap each doctest session (prompt lines and output, up to a blank line) in a fence."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = PROMPT.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def convert(text: str) -> str:
    """The docstring ``text`` made Markdown (see the module docstring)."""
    text = fence_doctests(text)
    text = ROLE.sub(_role, text)
    text = BARE_LITERAL_INTRO.sub("", text)
    return LITERAL_INTRO.sub(r"\1:", text)


class SphinxRoles(Extension):
    """Rewrite each docstring once, when griffe creates its object."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Convert ``obj``'s docstring in place."""
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
