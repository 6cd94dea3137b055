"""Every relative link of the README and the documentation points at something that exists.

MkDocs' strict build checks the links between pages of the site; this test also
covers the README (whose links GitHub resolves against the repository) and does not
need MkDocs. A link to ``file.md#anchor`` must name a heading (or an API object
documented with ``::: gradclip.X``) of that file.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from ._markdown import README, ROOT, anchors, links, markdown_files

PAGES = markdown_files()


def _resolve(page: Path, target: str) -> tuple[Path, str]:
    parts = urlsplit(target)
    path = unquote(parts.path)
    return ((page.parent / path).resolve() if path else page), parts.fragment


def _defines(target: Path, anchor: str) -> bool:
    found = anchors(target)
    # mkdocstrings gives every member of a documented object its own anchor too.
    return anchor in found or any(anchor.startswith(f"{obj}.") for obj in found if "." in obj)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for line, target in links(page):
        if urlsplit(target).scheme or target.startswith(("//", "mailto:")):
            continue  # external: not checked (no network in CI)
        path, anchor = _resolve(page, target)
        if not path.exists():
            broken.append(f"{page.name}:{line}: {target} -> no such file")
        elif path.is_dir():
            broken.append(f"{page.name}:{line}: {target} -> a directory, not a page")
        elif anchor and path.suffix == ".md" and not _defines(path, anchor):
            broken.append(f"{page.name}:{line}: {target} -> no anchor #{anchor}")
        if path.exists() and page != README and ROOT / "docs" not in path.parents:
            broken.append(f"{page.name}:{line}: {target} -> outside docs/, not in the site")
    assert not broken, "\n".join(broken)


def test_pages_are_in_the_site_navigation() -> None:
    """A page missing from mkdocs.yml's nav is built but unreachable."""
    import re

    nav = set(re.findall(r"([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(p.relative_to(ROOT / "docs")) for p in PAGES if p != README}
    assert pages <= nav, f"not in mkdocs.yml nav: {sorted(pages - nav)}"


def test_reference_nav_labels_are_the_page_titles() -> None:
    """An API reference page is listed in the navigation under its own title.

    Guide pages may have a shorter label than their title; a reference page's label
    names what is on it, so it must not drift from the page (``# Title``).
    """
    import re

    entries = re.findall(
        r"^\s*-\s+(?P<label>[^:\n]+):\s+(?P<path>reference/[\w/.-]+\.md)\s*$",
        (ROOT / "mkdocs.yml").read_text(encoding="utf-8"),
        re.M,
    )
    assert len(entries) >= 5, entries
    wrong = []
    for label, path in entries:
        first = (ROOT / "docs" / path).read_text(encoding="utf-8").splitlines()[0]
        title = first.removeprefix("# ").strip()
        if label.strip() != title:
            wrong.append(f"mkdocs.yml nav {label.strip()!r} for {path}, whose title is {title!r}")
    assert not wrong, "\n".join(wrong)
