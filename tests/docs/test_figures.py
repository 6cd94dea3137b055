"""The guide's figures are gradclip's own output, and the guide says how each was made.

``scripts/figures.py`` (``make figures``) is the only source of ``docs/figures``: each
figure there must be declared by one of its commands, be shown by a page, and that
page must print the exact command (with its seed) that made it. Regenerating the
figures trains dozens of models, so it is not part of the test suite; this checks the
bookkeeping, and that the committed images stay small.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ._markdown import DOCS, ROOT, links, markdown_files

FIGURES_DIR = DOCS / "figures"
MAX_TOTAL_BYTES = 2 * 1024 * 1024


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("figures_script", ROOT / "scripts" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _shown() -> dict[str, list[Path]]:
    """Figure file name -> the pages that show it."""
    shown: dict[str, list[Path]] = {}
    for page in markdown_files():
        for _, target in links(page):
            if "figures/" in target:
                shown.setdefault(Path(target).name, []).append(page)
    return shown


def test_every_committed_figure_is_made_by_the_script() -> None:
    declared = {name for figure in _script().FIGURES for name in figure.copies.values()}
    on_disk = {p.name for p in FIGURES_DIR.glob("*.png")}
    assert on_disk == declared, (
        f"drawn by hand or stale: {sorted(on_disk - declared)}; "
        f"missing (run make figures): {sorted(declared - on_disk)}"
    )


def test_every_figure_is_shown_with_its_command() -> None:
    script = _script()
    shown = _shown()
    for figure in script.FIGURES:
        for name in figure.copies.values():
            pages = shown.get(name)
            assert pages, f"{name} is made by make figures but no page shows it"
            for page in pages:
                text = " ".join(page.read_text(encoding="utf-8").split())
                assert figure.command in text, (
                    f"{page.relative_to(ROOT)} shows {name} but does not print the command "
                    f"that made it: {figure.command}"
                )
                if figure.needs_log:  # the log's run: task, learning rate and seed
                    for fact in (
                        "record_log",
                        script.LOG_TASK,
                        f"lr {script.LOG_LR:g}",
                        f"seed {script.LOG_SEED}",
                    ):
                        assert fact in text, f"{page.relative_to(ROOT)} does not say {fact!r}"


def test_compare_and_sweep_figures_state_their_seed() -> None:
    for figure in _script().FIGURES:
        if figure.command.split()[1] in ("compare", "sweep"):
            assert "--seed " in figure.command, figure.command


def test_figures_are_small() -> None:
    total = sum(p.stat().st_size for p in FIGURES_DIR.glob("*.png"))
    assert total < MAX_TOTAL_BYTES, f"docs/figures holds {total / 1e6:.1f} MB"
