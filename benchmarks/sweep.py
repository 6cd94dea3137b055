"""The vectorized lr × threshold sweep against the same grid trained one run at a time.

Run: ``python -m benchmarks.sweep`` (``--quick`` for a smaller grid). Both sides train
the regression task's grid in this process with the same thread setting (1 intra-op
thread, what ``gradclip sweep`` uses), alternating, and the result is the median
ratio of wall times. Target (issue): vectorized ≥ 10× faster.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, markers, write_section
from gradclip.experiments.sweep import grid_points, parse_grid, sweep_sequential, sweep_vectorized
from gradclip.experiments.tasks import TaskOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 4x4 grid, 60 steps")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown report path"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = 4 if args.quick else 9
    lrs = parse_grid(f"1e-4:1:{size}", "--lr")
    thresholds = [*parse_grid(f"0.01:100:{size}", "--threshold"), float("inf")]
    points = grid_points(lrs, thresholds)
    options = TaskOptions(max_steps=60) if args.quick else TaskOptions()
    times: dict[str, list[float]] = {"vectorized": [], "sequential": []}
    warmup = grid_points(lrs[:1], thresholds[:1])  # functorch's first call costs ~1 s once
    sweep_vectorized(warmup, options=TaskOptions(max_steps=2))
    sweep_sequential(warmup, options=TaskOptions(max_steps=2))
    for _ in range(args.rounds):
        for name, fn in (("vectorized", sweep_vectorized), ("sequential", sweep_sequential)):
            start = time.perf_counter()
            fn(points, options=options)
            times[name].append(time.perf_counter() - start)
    vec, seq = statistics.median(times["vectorized"]), statistics.median(times["sequential"])
    steps = options.max_steps or "all"
    grid = f"{len(lrs)}×{len(thresholds)} = {len(points)} runs, {steps} steps each"
    speedup = seq / vec
    verdict = "pass" if speedup >= 10 else "FAIL"
    begin, end = markers("sweep")
    machine = "\n".join(f"- {k}: {v}" for k, v in machine_info().items())
    section = f"""{begin}
## Vectorized lr × threshold sweep

Command: `{shlex.join(["python", "-m", "benchmarks.sweep", *sys.argv[1:]])}`

The regression task's grid ({grid}) trained with `sweep_vectorized` (stacked states,
`vmap(grad)`, per-model clipping) and one run at a time with `NormClip` and
`torch.optim.SGD` (`sweep_sequential`), alternating, {args.rounds} rounds, after one
untimed warm-up of each (functorch's first call costs about a second once).

| | median wall time | speed-up | target | result |
| --- | --- | --- | --- | --- |
| vectorized | {vec:.3g} s | {speedup:.1f}× | ≥ 10× | {verdict} |
| sequential | {seq:.3g} s | | | |

{machine}
{end}
"""
    print(section)
    write_section(args.out, "sweep", section)


if __name__ == "__main__":
    main()
