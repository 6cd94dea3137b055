"""The README's promises hold: the quickstart commands exist, and its numbers are measured ones.

Each row of the README's benchmark table (workload, case, what it is compared with,
ratio) must be copied from one row of ``benchmarks/RESULTS.md``: the test finds that
row in the block the benchmark wrote (same workload, same case, same reference) and
compares the ratio, the "× faster" note and the missed target with it. Rerunning a
benchmark that changes a quoted ratio makes this fail until the README is updated,
and so does quoting a ratio next to the wrong case. The Quickstart's two commands
must be targets of the Makefile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from ._markdown import README, ROOT

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
NUMBER = re.compile(r"(\d+(?:\.\d+)?)×")
SECTION = re.compile(
    r"<!-- benchmarks/(?P<name>\w+)\.py: begin -->(?P<body>.*?)<!-- benchmarks/(?P=name)\.py: end -->",
    re.S,
)
PIPE = re.compile(r"(?<!\\)\|")
PARENTHESES = re.compile(r"\s*\([^)]*\)")
FASTER = re.compile(r"\((\d+(?:\.\d+)?)× faster\)")
MISSED = re.compile(r"\(target (?P<target>[^)]*?) missed\)")


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in PIPE.split(line.strip().strip("|"))]


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``markdown``, as rows keyed by the header's column names."""
    out: list[list[dict[str, str]]] = []
    lines = markdown.splitlines()
    i = 0
    while i + 1 < len(lines):
        header, rule = lines[i].strip(), lines[i + 1].strip()
        if header.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rule):
            names = _cells(header)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(dict(zip(names, _cells(lines[i]))))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def _plain(cell: str) -> str:
    """A cell without Markdown emphasis, code marks and parenthesised details."""
    text = cell.replace("`", "").replace("**", "")
    return " ".join(PARENTHESES.sub("", text).split())


def same_cell(quoted: str, measured: str, *, prefix: bool = False) -> bool:
    """Whether a README cell names what a RESULTS.md cell does.

    Parenthesised details may be left out in the README (``GPT-2 small (124M)`` for
    ``GPT-2 small (124M, 148 tensors)``), but those it gives must be in the measured
    cell; with ``prefix``, the README may also shorten the text after a word
    (``AGC`` for ``AGC, clip_factor 0.01``).
    """
    a, b = _plain(quoted), _plain(measured)
    if prefix:
        if not (b == a or (b.startswith(a) and not b[len(a)].isalnum())):
            return False
    elif a != b:
        return False
    details = re.findall(r"\(([^)]*)\)", quoted.replace("`", ""))
    return all(part.strip() in measured for d in details for part in d.split(","))


@dataclass(frozen=True)
class Source:
    """Where RESULTS.md measures a README row.

    Attributes:
        benchmark: the benchmark whose block holds the row (``clip`` for
            ``benchmarks/clip.py``).
        cells: column name -> README text that must name that cell (``same_cell``;
            ``case`` is matched as a prefix).
        column: the column holding the ratio.
    """

    benchmark: str
    cells: dict[str, str] = field(default_factory=dict)
    column: str = "ratio (median)"


def source(workload: str, case: str, against: str) -> Source:
    """The RESULTS.md row a README benchmark row is copied from.

    The functional clipping benchmark has workload, case and "compared with" columns
    to match; the fused, monitor and sweep benchmarks each measure one comparison
    per workload, named differently in their own tables.
    """
    if "fused" in case:
        return Source("fused", {"workload": workload, "case": "gradclip (folded) vs torch"})
    if "GradMonitor" in case:
        writer = "no writer" if "no writer" in case else "CSV"
        return Source("monitor", {"workload": workload}, f"amortised ratio, {writer}")
    if "sweep" in case:
        return Source("sweep", {"": "vectorized"}, "speed-up")
    return Source("clip", {"workload": workload, "case": case, "compared with": against})


def results_rows(results: str, benchmark: str) -> list[dict[str, str]]:
    blocks = {m["name"]: m["body"] for m in SECTION.finditer(results)}
    assert benchmark in blocks, f"benchmarks/RESULTS.md has no block of benchmarks/{benchmark}.py"
    return [row for table in tables(blocks[benchmark]) for row in table]


def check_row(row: dict[str, str], results: str) -> list[str]:
    """What is wrong with one README benchmark row (nothing: an empty list)."""
    where = f"README row {row['workload']!r} / {row['case']!r} / {row['against']!r}"
    wanted = source(row["workload"], row["case"], row["against"])
    candidates = [
        measured
        for measured in results_rows(results, wanted.benchmark)
        if wanted.column in measured
        and all(
            name in measured and same_cell(text, measured[name], prefix=name == "case")
            for name, text in wanted.cells.items()
        )
    ]
    if len(candidates) != 1:
        return [
            f"{where}: {len(candidates)} rows of benchmarks/{wanted.benchmark}.py's block in "
            f"benchmarks/RESULTS.md match {wanted.cells} (need exactly one)"
        ]
    measured = candidates[0]
    errors = []
    quoted_ratio = re.search(r"\*\*" + NUMBER.pattern + r"\*\*", row["ratio"])
    measured_ratio = NUMBER.search(measured[wanted.column])
    if quoted_ratio is None or measured_ratio is None:
        return [f"{where}: no ratio in {row['ratio']!r} or in {measured[wanted.column]!r}"]
    if quoted_ratio[1] != measured_ratio[1]:
        errors.append(
            f"{where}: the README says {quoted_ratio[1]}×, RESULTS.md measured "
            f"{measured_ratio[1]}× ({measured[wanted.column]})"
        )
    faster = FASTER.search(row["ratio"])
    if faster is not None:
        found = FASTER.search(measured[wanted.column])
        if found is None or found[1] != faster[1]:
            errors.append(f"{where}: {faster[0]} is not in {measured[wanted.column]!r}")
    missed = MISSED.search(row["ratio"])
    failed = "FAIL" in measured.get("result", "")
    if failed and missed is None:
        errors.append(f"{where}: RESULTS.md marks this target missed; the README must say so")
    if missed is not None:
        if not failed:
            errors.append(f"{where}: the README says a target was missed, RESULTS.md does not")
        elif _plain(missed["target"]) != _plain(measured.get("target", "")):
            errors.append(
                f"{where}: the README's target {missed['target']!r} is not RESULTS.md's "
                f"{measured.get('target')!r}"
            )
    return errors


def readme_rows(section: str) -> list[dict[str, str]]:
    (table,) = [t for t in tables(section) if t and "ratio" in t[0]]
    return [
        {"workload": r["workload"], "case": r["case"], "against": r["against"], "ratio": r["ratio"]}
        for r in table
    ]


def test_benchmark_rows_are_copied_from_their_results_rows() -> None:
    rows = readme_rows(_section("Benchmarks"))
    assert len(rows) >= 5, "the README should quote the headline ratios"
    results = RESULTS.read_text(encoding="utf-8")
    errors = [error for row in rows for error in check_row(row, results)]
    assert not errors, "\n".join(errors)


def _mutated(rows: list[dict[str, str]], index: int, **changes: str) -> dict[str, str]:
    return {**rows[index], **changes}


def test_a_ratio_quoted_against_the_wrong_row_is_caught() -> None:
    """The check itself: ratios that appear in RESULTS.md, but on another row, fail."""
    rows = readme_rows(_section("Benchmarks"))
    results = RESULTS.read_text(encoding="utf-8")
    clip_rows = [i for i, r in enumerate(rows) if source(**_keys(r)).benchmark == "clip"]
    first, second = clip_rows[0], clip_rows[1]
    assert rows[first]["ratio"] != rows[second]["ratio"]
    swapped = _mutated(rows, first, ratio=rows[second]["ratio"])
    assert check_row(swapped, results), swapped
    other_case = _mutated(rows, first, case="no such case")
    assert check_row(other_case, results) != []
    unmarked = [r for r in rows if MISSED.search(r["ratio"])]
    assert unmarked, "the README quotes no missed target: nothing to mutate"
    hidden = {**unmarked[0], "ratio": MISSED.sub("", unmarked[0]["ratio"]).strip()}
    assert any("missed" in e for e in check_row(hidden, results))


def _keys(row: dict[str, str]) -> dict[str, str]:
    return {k: row[k] for k in ("workload", "case", "against")}


@pytest.mark.parametrize(
    ("quoted", "measured", "prefix", "same"),
    [
        ("GPT-2 small (124M)", "GPT-2 small (124M, 148 tensors)", False, True),
        ("GPT-2 small (125M)", "GPT-2 small (124M, 148 tensors)", False, False),
        ("`torch.nn.utils.clip_grad_norm_`", "torch.nn.utils.clip_grad_norm_", False, True),
        ("AGC", "AGC, clip_factor 0.01 (7485 of 16000 units clipped)", True, True),
        ("AG", "AGC, clip_factor 0.01", True, False),
        ("value clipping", "↳ floor, not gradclip: value clipping", True, False),
    ],
)
def test_same_cell(quoted: str, measured: str, prefix: bool, same: bool) -> None:
    assert same_cell(quoted, measured, prefix=prefix) is same


def test_quickstart_commands_are_make_targets() -> None:
    quickstart = _section("Quickstart")
    commands = re.findall(r"^make (\w+)", quickstart, flags=re.M)
    assert commands == ["demo", "test"], commands
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in commands:
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"no make target {target!r}"
