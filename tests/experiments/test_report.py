"""The report's conclusion: what it claims follows from the numbers, seeds included."""

from __future__ import annotations

import math
import statistics

from gradclip.experiments.compare import Summary
from gradclip.experiments.report import conclude


def summary(
    clip: str, finals: list[float], *, diverged: int = 0, clip_rate: float = 0.3
) -> Summary:
    runs = len(finals) + diverged
    return Summary(
        task="t", clip=clip, runs=runs, diverged=diverged,
        first_divergence_step=7 if diverged else None,
        final_loss=statistics.median(finals) if finals else math.nan,
        final_loss_spread=max(finals) - min(finals) if finals else math.nan,
        best_loss=min(finals) if finals else math.nan, loss_std=0.0, loss_spikes=0.0,
        clip_rate=clip_rate, step_ms=1.0, wall_time_s=1.0, final_losses=finals,
    )  # fmt: skip


def test_separated_seeds_are_a_real_difference_even_with_a_noisy_baseline() -> None:
    lines = conclude([summary("none", [3.0, 11.8, 20.0]), summary("norm:1.0", [1.5, 1.6, 1.8])])
    assert any("norm:1.0 ended 86% lower than no clipping in every seed" in line for line in lines)


def test_overlapping_seeds_are_not_conclusive() -> None:
    lines = conclude([summary("none", [1.0, 2.0, 3.0]), summary("norm:1.0", [1.5, 1.2, 2.5])])
    assert any("seeds overlap" in line and "not conclusive" in line for line in lines)


def test_small_changes_are_no_difference() -> None:
    lines = conclude([summary("none", [1.0, 1.01]), summary("norm:1.0", [1.02, 1.0])])
    assert any("no real difference" in line for line in lines)


def test_one_seed_is_flagged() -> None:
    lines = conclude([summary("none", [2.0]), summary("zclip", [1.0])])
    assert any("one seed only" in line for line in lines)


def test_divergence_and_rescue() -> None:
    lines = conclude(
        [summary("none", [], diverged=2), summary("norm:1.0", [1.0, 1.1], clip_rate=0.99)]
    )
    assert "no clipping diverged in 2 of 2 runs (first non-finite loss at step 7)." in lines
    assert any(line.startswith("Clipping prevented divergence: norm:1.0") for line in lines)
    assert any("clipped 99% of steps" in line for line in lines)
    assert "Lowest final loss: norm:1.0 (1.05)." in lines


def test_everything_diverged() -> None:
    lines = conclude([summary("none", [], diverged=1), summary("norm:9", [], diverged=1)])
    assert lines[-1] == "Every run diverged: lower the learning rate or the threshold."
