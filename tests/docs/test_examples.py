"""Every code example of the documentation runs, so the docs cannot drift from the code.

For each page (``docs/**/*.md`` and the README), the ```` ```python ```` blocks run in
order in one fresh namespace, in a temporary working directory, from seed 0: a later
block may use what an earlier one defined, as a reader following the page would.
```` ```pycon ```` blocks run as doctests in the same namespace. A
``<!-- test-setup ... -->`` comment holds code that runs at its place but is not shown
(the README's three-line example assumes a model and an optimizer exist).

A ```` ```text title="Output" ```` block right after a Python block is what that block
prints: the test compares it with the captured output (whitespace-normalized; ``...``
matches anything, as in doctests), so printed numbers in the docs cannot go stale
either. Examples run single-threaded (as the study does), which keeps them fast and
their floating-point results reproducible on a loaded machine.

A block may be skipped only with a reason, ``<!-- no-run: REASON -->`` on the line
before its fence, for what cannot run here (several processes, CUDA); those are
counted and listed so they stay few.

Every ``gradclip ...`` command in a ```` ```sh ```` block is parsed by the real command
line (and its strategy specs and tasks validated) without running it: a renamed flag
or an unknown spec in the docs fails here. So is every command of
``scripts/figures.py`` (``FIGURES[*].command``, which makes the guide's figures and is
printed under them).
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ._markdown import ROOT, Block, blocks, markdown_files

PAGES = markdown_files()
RUNNABLE = {"python", "py", "pycon"}
SHELL = {"sh", "bash", "console", "shell"}
MAX_SKIPPED = 8


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _run_python(block: Block, namespace: dict[str, Any], expected: Block | None) -> None:
    code = compile(block.code, block.where, "exec")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
    except Exception as error:
        raise AssertionError(f"example at {block.where} raised {error!r}") from error
    if expected is not None:
        want, got = expected.code.strip() + "\n", printed.getvalue()
        assert doctest.OutputChecker().check_output(want, got, OUTPUT_FLAGS), (
            f"the output shown at {expected.where} is not what {block.where} prints:\n"
            f"--- shown\n{want}--- printed\n{got}"
        )


def _with_outputs(page: Path) -> list[tuple[Block, Block | None]]:
    """The page's runnable blocks, each with the Output block that follows it, if any."""
    all_blocks = blocks(page)
    out = []
    for i, block in enumerate(all_blocks):
        if block.lang not in RUNNABLE or block.skip is not None:
            continue
        after = all_blocks[i + 1] if i + 1 < len(all_blocks) else None
        is_output = after is not None and after.title == "Output" and block.lang != "pycon"
        out.append((block, after if is_output else None))
    return out


def _run_pycon(block: Block, namespace: dict[str, Any]) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.code, namespace, block.where, str(block.path), block.line)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    assert runner.failures == 0, f"doctest at {block.where} failed:\n" + "".join(report)


EXAMPLE_PAGES = [page for page in PAGES if _with_outputs(page)]


@pytest.fixture
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons (the HF Trainer makes them too)."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture
def fresh_frameworks() -> Any:
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_id)
def test_page_examples_run(
    page: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
    fresh_frameworks: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": f"docs_example_{page.stem}"}
    for block, output in _with_outputs(page):
        if block.lang == "pycon":
            _run_pycon(block, namespace)
        else:
            _run_python(block, namespace, output)


def test_every_guide_page_has_examples() -> None:
    guide = [p for p in PAGES if p.parent.name == "guide" and p.stem != "study"]
    assert guide and set(guide) <= set(EXAMPLE_PAGES), sorted(
        _id(p) for p in set(guide) - set(EXAMPLE_PAGES)
    )


def test_output_blocks_follow_python() -> None:
    """An Output block not right after a Python block would never be checked."""
    for page in PAGES:
        all_blocks = blocks(page)
        for before, block in zip([None, *all_blocks], all_blocks):
            if block.title == "Output":
                assert before is not None and before.lang in {"python", "py"}, block.where


def test_skipped_examples_are_few_and_say_why() -> None:
    skipped = [b for page in PAGES for b in blocks(page) if b.skip is not None]
    for block in skipped:
        assert block.skip, f"{block.where}: a no-run comment must give its reason"
        assert block.lang in RUNNABLE, f"{block.where}: no-run on a {block.lang!r} block"
    assert len(skipped) <= MAX_SKIPPED, "\n".join(f"{b.where}: {b.skip}" for b in skipped)


def test_every_python_fence_is_marked_python() -> None:
    """A block of Python code under another language would silently not run."""
    for page in PAGES:
        for block in blocks(page):
            if block.lang == "" and ("import " in block.code or ">>>" in block.code):
                pytest.fail(f"{block.where}: code block without a language looks like Python")


def _commands(block: Block) -> list[list[str]]:
    text = block.code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "gradclip":
            out.append(words[1:])
    return out


def _figure_commands() -> list[tuple[str, list[str]]]:
    """``(figure name, argv after "gradclip")`` of every command in ``scripts/figures.py``."""
    spec = importlib.util.spec_from_file_location(
        "figures_commands", ROOT / "scripts" / "figures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    out = []
    for figure in module.FIGURES:
        words = shlex.split(figure.command)
        assert words[0] == "gradclip", f"figure {figure.name!r}: {figure.command!r}"
        out.append((figure.name, words[1:]))
    return out


SHELL_COMMANDS = [
    pytest.param(argv, id=f"{block.where} gradclip {' '.join(argv[:2])}")
    for page in PAGES
    for block in blocks(page)
    if block.lang in SHELL
    for argv in _commands(block)
] + [
    pytest.param(argv, id=f"scripts/figures.py {name}: gradclip {' '.join(argv[:2])}")
    for name, argv in _figure_commands()
]


@pytest.mark.parametrize("argv", SHELL_COMMANDS)
def test_shell_commands_parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The real parser reads each documented command; specs and tasks are validated."""
    import gradclip.cli
    from gradclip.experiments.compare import validate
    from gradclip.experiments.sweep import parse_grid

    seen: list[Any] = []

    def dispatch(args: Any, argv: list[str]) -> int:
        if args.command in ("compare",):
            validate(args.task, args.clip, args.seeds)
        if args.command == "sweep":
            parse_grid(args.lr, "--lr")
            parse_grid(args.threshold, "--threshold")
        seen.append(args)
        return 0

    monkeypatch.setattr(gradclip.cli, "dispatch", dispatch)
    monkeypatch.setattr(gradclip.cli, "_report", lambda *a: seen.append(a) or 0)
    monkeypatch.setattr(gradclip.cli, "_suggest", lambda *a: seen.append(a) or 0)
    try:
        code = gradclip.cli.main(argv)
    except SystemExit as exit_:  # argparse: an unknown flag or a bad value
        pytest.fail(f"gradclip {shlex.join(argv)}: the command line rejects it ({exit_.code})")
    assert code == 0 and seen, f"gradclip {shlex.join(argv)} did not parse"
