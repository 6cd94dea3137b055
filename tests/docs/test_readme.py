"""The README's promises hold: the quickstart commands exist, and its numbers are measured ones.

The benchmark ratios quoted in the README must be the ones in ``benchmarks/RESULTS.md``
(rerunning a benchmark that changes a quoted ratio makes this fail until the README
is updated), and the Quickstart's two commands must be targets of the Makefile.
"""

from __future__ import annotations

import re

from ._markdown import README, ROOT

RATIO = re.compile(r"\*\*(\d+(?:\.\d+)?×)\*\*")


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_benchmark_ratios_are_copied_from_results() -> None:
    quoted = RATIO.findall(_section("Benchmarks"))
    assert len(quoted) >= 5, "the README should quote the headline ratios"
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    measured = set(re.findall(r"(\d+(?:\.\d+)?×)", results))
    missing = [ratio for ratio in quoted if ratio not in measured]
    assert not missing, f"README ratios not in benchmarks/RESULTS.md: {missing}"


def test_quickstart_commands_are_make_targets() -> None:
    quickstart = _section("Quickstart")
    commands = re.findall(r"^make (\w+)", quickstart, flags=re.M)
    assert commands == ["demo", "test"], commands
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in commands:
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"no make target {target!r}"
