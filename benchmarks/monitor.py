"""Cost of monitoring per-layer norms every step, on top of clipping.

Run from the repository root::

    python -m benchmarks.monitor            # about 3-4 minutes on 2 cores
    python -m benchmarks.monitor --quick    # about a minute, noisier

Workloads (from :mod:`benchmarks.clip`): GPT-2-small-shaped gradients (124M float32
parameters in 148 tensors) and 500 tensors of 32x32. Each step clips with
``NormClip`` (threshold active, half the gradients' norm); the monitored variant
also calls ``GradMonitor.observe(stats)`` with per-parameter and per-module
("leaf") norms. The target is **(clip + block / 50) / clip <= 1.15**, where a
*block* is 50 ``observe`` calls followed by their flush (one transfer, spike
detection, history), timed as one call: a per-step median would hide the one step
in 50 that flushes, and a mean over steps is noisier than a median of blocks. The
target is about monitoring, so it is checked without a writer; the same ratio with a
CSV writer is reported as information (what formatting every value costs on top),
with no verdict. All cases are interleaved round by round.

Appends (or replaces) its section of ``benchmarks/RESULTS.md``, between markers,
leaving the other sections alone. See :mod:`benchmarks.common` for the method.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.clip import Workload, gpt2_small_shapes, make_workload, small_shapes
from benchmarks.common import (
    Samples,
    format_ms,
    machine_info,
    markdown_table,
    markers,
    measure,
    write_section,
)
from gradclip.clippers.fixed import NormClip
from gradclip.monitor import GradMonitor
from gradclip.writers import CSVWriter

LOG_EVERY = 50
TARGET = 1.15
BEGIN, END = markers("monitor")


@dataclass(frozen=True)
class Result:
    """The measurements of one workload."""

    workload: str
    columns: int
    samples: Samples
    consistent: str

    def amortised(self, block: str) -> float:
        """(clip + block / LOG_EVERY) / clip, where block = LOG_EVERY observes + 1 flush."""
        clip = self.samples.median("clip")
        return (clip + self.samples.median(block) / LOG_EVERY) / clip


def check_consistent(work: Workload, named: list, max_norm: float) -> str:
    """The logged per-parameter norms equal per-tensor norms computed independently."""
    torch._foreach_copy_(work.grads, work.saved)
    expected = torch.stack([torch.linalg.vector_norm(g) for g in work.grads])
    rows: list[dict] = []
    monitor = GradMonitor(named, log_every=1, writers=[rows.append])
    monitor.observe(NormClip(work.params, max_norm=max_norm).clip_())
    torch._foreach_copy_(work.grads, work.saved)
    got = torch.tensor([rows[0][f"param/{n}"] for n, _ in named])
    ok = torch.allclose(got, expected, rtol=1e-5, atol=0)
    return "per-param norms match" if ok else "**MISMATCH**"


def run_workload(work: Workload, names: list[str], warmup: int) -> Result:
    named = list(zip(names, work.params))
    max_norm = 0.5 * work.total_norm
    clipper = NormClip(work.params, max_norm=max_norm)
    calls = work.rounds + warmup + 10
    monitor = GradMonitor(named, log_every=calls)  # never flushes while timing single steps
    alone = GradMonitor(named, log_every=calls)
    plain = GradMonitor(named, log_every=LOG_EVERY)
    csv = GradMonitor(named, log_every=LOG_EVERY, writers=[CSVWriter(os.devnull)])
    stats = clipper.clip_()

    def block(m: GradMonitor) -> None:  # LOG_EVERY steps' records; the last one flushes
        for _ in range(LOG_EVERY):
            m.observe(stats)

    # measure() rotates this order each round, which keeps each case's cyclic
    # predecessor fixed, and the case after a block (whose flush formats thousands of
    # values and leaves the caches cold) runs measurably slower. So the last case only
    # separates the blocks from "clip", which follows the same work it does in
    # training (a clipped and monitored step), as does "clip + observe".
    separator = GradMonitor(named, log_every=calls)
    impls = {
        "clip": lambda: clipper.clip_(),
        "clip + observe": lambda: monitor.observe(clipper.clip_()),
        "observe alone": lambda: alone.observe(),
        "block": lambda: block(plain),
        "block + CSV": lambda: block(csv),
        "separator (not reported)": lambda: separator.observe(clipper.clip_()),
    }
    start = time.perf_counter()
    samples = measure(impls, work.grads, work.saved, rounds=work.rounds, warmup=warmup)
    print(f"  measured in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    csv.close()
    return Result(work.name, len(monitor.columns), samples, check_consistent(work, named, max_norm))


def _verdict(ratio: float) -> str:
    return f"pass (≤ {TARGET:.2f}×)" if ratio <= TARGET else f"**FAIL** (> {TARGET:.2f}×)"


def notes(results: Sequence[Result]) -> str:
    """Explanations that depend on the measured numbers."""
    out = [
        "- `observe(stats)` does a handful of tensor ops on a few hundred values (a stack "
        "of the scalars, a copy of the per-tensor norms the clipper already computed) and "
        "some Python bookkeeping (matching the clipper's parameter tuple to the monitor's "
        "through a cached index), independent of the gradients' size. It never reads a "
        "device value; the flush does one transfer per block."
    ]
    costs = []
    for r in results:
        s = r.samples
        per_value = (s.median("block + CSV") - s.median("block")) / (LOG_EVERY * r.columns)
        costs.append(f"{per_value * 1e6:.2f} µs per value on {r.workload} ({r.columns} columns)")
    out.append(
        "- The CSV column is information, not part of the target: the target is the cost of "
        "monitoring, and what a writer adds depends on the writer and on how many columns "
        "are logged. The CSV writer's cost is Python's float formatting: "
        + "; ".join(costs)
        + f"; {LOG_EVERY} rows per flush. It grows with the number of columns, one per "
        "parameter and one per module (for 500 one-tensor layers, twice 500); fewer "
        "columns (`modules=None`, a module depth, or `per_layer=False`) cost "
        "proportionally less."
    )
    close = [r.workload for r in results if abs(r.amortised("block") - TARGET) <= 0.05]
    if close:
        out.append(
            f"- **Borderline**: {', '.join(close)} is within 0.05 of the {TARGET:.2f}× target. "
            "On this shared 2-core machine repeated runs move such ratios by a few hundredths "
            'either way, so read pass/fail there as "at the target", not as a margin.'
        )
    out.append(
        '- The "clip + observe, no flush" ratio compares two medians of calls that differ '
        "by well under a millisecond; on a shared machine its spread (IQR) is wide, so the "
        "amortised ratios, built from the clip median and the block median, are the result."
    )
    out.append(
        "- TensorBoard writes one event per value (`add_scalar`, ~50 µs each here), so per-layer "
        "logging to TensorBoard on thousands of columns costs far more than the CSV; log "
        "per-layer norms to a file and use `TensorBoardWriter(per_layer=False)` there."
    )
    return "\n".join(out)


def render(results: Sequence[Result], command: str, machine: dict[str, str]) -> str:
    """The markdown section."""
    header = [
        "workload",
        "log columns",
        "clip (ms)",
        "monitoring per step, no writer / CSV (ms)",
        "amortised ratio, no writer",
        "result",
        "amortised ratio with CSV writer (info: writer cost)",
        "clip + observe, no flush: ratio (IQR)",
        "observe alone (ms, info)",
        "check",
    ]
    body = []
    for r in results:
        s = r.samples
        q1, q3 = s.paired_quartiles("clip + observe", "clip")
        a_none, a_csv = r.amortised("block"), r.amortised("block + CSV")
        body.append(
            [
                r.workload,
                str(r.columns),
                format_ms(s.median("clip")),
                f"{format_ms(s.median('block') / LOG_EVERY)} / "
                f"{format_ms(s.median('block + CSV') / LOG_EVERY)}",
                f"**{a_none:.3f}×**",
                _verdict(a_none),
                f"{a_csv:.3f}×",
                f"{s.ratio('clip + observe', 'clip'):.3f} ({q1:.2f}–{q3:.2f})",
                format_ms(s.median("observe alone")),
                r.consistent,
            ]
        )
    machine_lines = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    return f"""{BEGIN}
# Monitoring overhead

Generated by `benchmarks/monitor.py`. Command (from the repository root):

    {command}

## Machine

{machine_lines}

## Method

All cases are interleaved round by round, with the gradients restored before every
call (see `benchmarks/common.py`), and reported as medians. The rotation keeps each
case's predecessor fixed, and a call right after a block runs slower (the flush's
formatting leaves the caches cold), so an unreported case separates the blocks from
**clip**; **clip** and **clip + observe** each follow a clipped, monitored step, as
in training. **clip** is
`NormClip.clip_()` with the threshold active (half the gradients' norm); **clip +
observe** is the same followed by `GradMonitor.observe(stats)`, which records the
pre/post-clip norms, threshold, scale, clipped flag and per-parameter norms into
the on-device buffer (this monitor never flushes during the run). A **block** is
{LOG_EVERY} `observe(stats)` calls on a monitor with `log_every={LOG_EVERY}`, so the
last call flushes: per-module ("leaf") aggregation, the one device-to-host
transfer, spike detection, the history, and the writer (none, or a `CSVWriter` to
`/dev/null`, which still formats every value). **amortised ratio = (clip + block /
{LOG_EVERY}) / clip** is the cost of monitoring every step, flushes included;
the {TARGET:.2f}× target applies to it without a writer. With the CSV writer it is
information: the writer's cost on top, which depends on the writer and the number of
columns, so it gets no verdict. **observe alone** is `observe()` without stats:
the monitor's own fused norm pass (information: monitoring without a clipper).
**monitoring per step** is block / {LOG_EVERY}.
"check" compares the logged per-parameter norms with
`torch.linalg.vector_norm` of each gradient, computed independently.

## Results

{markdown_table(header, body)}

## Notes

{notes(results)}
{END}
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its section of the report."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.monitor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed steps per case on the GPT-2 workload; the small one uses 10x as many "
        "(default 30, or 6 with --quick)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="few repeats: about a minute")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown report path"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (6 if args.quick else 30)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    warmup = 1 if args.quick else 2
    machine = machine_info()
    command = shlex.join(["python", "-m", "benchmarks.monitor", *sys.argv[1:]])
    start = time.perf_counter()
    results = []
    for name, shapes, rounds, wu in (
        ("500 × 32×32", small_shapes(), 10 * repeats, 10 * warmup),
        ("GPT-2 small (124M, 148 tensors)", gpt2_small_shapes(), repeats, warmup),
    ):
        print(f"{name}: building gradients", file=sys.stderr, flush=True)
        work = make_workload(name, shapes, rounds)
        results.append(run_workload(work, [n for n, _ in shapes], wu))
        del work
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, "monitor", render(results, command, machine))
    print(f"done in {time.perf_counter() - start:.0f}s; wrote {args.out}", file=sys.stderr)
    for r in results:
        print(
            f"{r.workload:34s} per step {r.samples.ratio('clip + observe', 'clip'):.3f}x, "
            f"amortised {r.amortised('block'):.3f}x (no writer; target <= {TARGET}), "
            f"{r.amortised('block + CSV'):.3f}x with the CSV writer (info)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
