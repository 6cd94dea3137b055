"""Shared timing helpers: interleaved, paired measurements reported as median ratios.

Rules every benchmark here follows:

* Everything is measured in one process, interleaved: each round times every
  implementation once, in an order that rotates from round to round, so slow drift
  on a shared machine (other jobs, frequency changes) hits all of them alike.
* Clipping works in place, and clipping the same gradients again converges to a
  state where nothing is clipped. So before *every* timed call the gradients are
  restored from a saved copy, outside the timed region.
* The result is a ratio of medians, ``median(gradclip) / median(reference)``; the
  absolute times are context for the ratio, not results of their own.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

Fn = Callable[[], object]


def restore_(grads: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Copy the saved gradients back, in place (one fused call)."""
    torch._foreach_copy_(list(grads), list(saved))


@dataclass(frozen=True)
class Samples:
    """Seconds per call for each implementation, one entry per round, rounds aligned."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        """Median seconds per call of ``name``."""
        return statistics.median(self.times[name])

    def ratio(self, name: str, reference: str) -> float:
        """``median(name) / median(reference)``: the reported result."""
        return self.median(name) / self.median(reference)

    def paired_quartiles(self, name: str, reference: str) -> tuple[float, float]:
        """Lower and upper quartiles of the per-round ratios: how noisy the ratio is."""
        ratios = [a / b for a, b in zip(self.times[name], self.times[reference])]
        if len(ratios) < 2:
            return ratios[0], ratios[0]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        return q1, q3


def measure(
    impls: Mapping[str, Fn],
    grads: Sequence[Tensor],
    saved: Sequence[Tensor],
    *,
    rounds: int,
    warmup: int,
) -> Samples:
    """Time each implementation ``rounds`` times, interleaved, restoring gradients each call.

    Args:
        impls: name -> a call that clips ``grads`` in place.
        grads: the gradients the calls modify.
        saved: a copy of ``grads`` to restore before every call (not timed).
        rounds: timed calls per implementation.
        warmup: untimed rounds first (allocator, caches, lazy initialisation).
    """
    names = list(impls)
    grads, saved = list(grads), list(saved)
    for _ in range(warmup):
        for name in names:
            restore_(grads, saved)
            impls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                restore_(grads, saved)
                fn = impls[name]
                start = time.perf_counter_ns()
                fn()
                times[name].append((time.perf_counter_ns() - start) * 1e-9)
    finally:
        if gc_was_enabled:
            gc.enable()
    restore_(grads, saved)
    return Samples(times)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str]:
    """What a reader needs to judge the numbers: cores, CPU, versions, date, load."""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "nproc": str(nproc),
        "CPU": cpu_model(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "Python": platform.python_version(),
        "OS": platform.platform(),
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "load average at start (1, 5, 15 min)": load,
    }


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds with three significant digits."""
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms >= 1 else f"{ms:.3f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markers(name: str) -> tuple[str, str]:
    """The begin/end comment lines that delimit benchmark ``name``'s section of RESULTS.md."""
    return f"<!-- benchmarks/{name}.py: begin -->", f"<!-- benchmarks/{name}.py: end -->"


def write_section(path: Path, name: str, section: str) -> None:
    """Replace benchmark ``name``'s section of ``path`` (between its markers), or append it.

    ``section`` must start with ``markers(name)[0]`` and end with ``markers(name)[1]``;
    the other benchmarks' sections are left as they are.
    """
    begin, end = markers(name)
    if not (section.lstrip().startswith(begin) and section.rstrip().endswith(end)):
        raise ValueError(f"section of {name} must be wrapped in {begin} ... {end}")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.strip("\n") + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section.strip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
