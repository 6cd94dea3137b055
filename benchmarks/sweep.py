"""The vectorized lr × threshold sweep against the same grid trained one run at a time.

Run: ``python -m benchmarks.sweep`` (``--quick`` for a smaller grid). Both sides train
the regression task's grid in this process with the same thread setting (1 intra-op
thread, what ``gradclip sweep`` uses), alternating, and the result is the median
ratio of wall times. Target (issue): vectorized ≥ 10× faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine_info
from gradclip.experiments.sweep import grid_points, parse_grid, sweep_sequential, sweep_vectorized
from gradclip.experiments.tasks import TaskOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 4x4 grid, 60 steps")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
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
    info = machine_info()
    steps = options.max_steps or "all"
    print(f"grid {len(lrs)}x{len(thresholds)} = {len(points)} runs, {steps} steps each")
    print(f"median wall time: vectorized {vec:.3g} s, sequential {seq:.3g} s")
    print(f"speed-up (sequential / vectorized): {seq / vec:.1f}x  (target >= 10x)")
    print(", ".join(f"{k}: {v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
