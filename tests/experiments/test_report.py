"""The report's conclusion: what it claims follows from the numbers, seeds included.

Each run is judged against its own start (the loss at step 1) and a constant
prediction; strategies that never clipped are not evidence; and the plots keep
every strategy, the threshold and the useful loss range readable.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from gradclip.experiments import report
from gradclip.experiments.compare import Summary
from gradclip.experiments.report import conclude, plot_loss, plot_norms
from gradclip.experiments.runner import RunResult


def summary(
    clip: str,
    finals: list[float],
    *,
    diverged: int = 0,
    clip_rate: float = 0.3,
    initials: list[float] | None = None,
    constant: float = math.nan,
    step_ms: float = 1.0,
    spikes: float = 0.0,
) -> Summary:
    """A summary built by hand: ``initials`` default to 100 (every finished run trained)."""
    runs = len(finals) + diverged
    starts = initials if initials is not None else [100.0] * len(finals)
    pairs = list(zip(finals, starts))
    return Summary(
        task="t", clip=clip, runs=runs, diverged=diverged,
        first_divergence_step=16 if diverged else None,
        initial_loss=statistics.median(starts) if starts else 0.5,
        final_loss=statistics.median(finals) if finals else math.nan,
        final_loss_spread=max(finals) - min(finals) if finals else math.nan,
        constant_loss=constant,
        trained=sum(f < i and not f >= constant for f, i in pairs),
        blew_up=sum(f >= 10 * i for f, i in pairs),
        best_loss=min(finals) if finals else math.nan, loss_std=0.0, loss_spikes=spikes,
        clip_rate=clip_rate, step_ms=step_ms, wall_time_s=1.0, final_losses=finals,
        initial_losses=starts,
    )  # fmt: skip


def test_separated_seeds_are_a_real_difference_even_with_a_noisy_baseline() -> None:
    lines = conclude([summary("none", [3.0, 11.8, 20.0]), summary("norm:1.0", [1.5, 1.6, 1.8])])
    assert any("norm:1.0 ended 86% lower than no clipping in every seed" in line for line in lines)


def test_overlapping_seeds_are_not_conclusive() -> None:
    lines = conclude([summary("none", [1.0, 2.0, 3.0]), summary("norm:1.0", [1.5, 1.2, 2.5])])
    assert any("seeds overlap" in line and "not conclusive" in line for line in lines)


def test_small_changes_are_no_difference() -> None:
    lines = conclude([summary("none", [1.0, 1.01]), summary("norm:1.0", [1.02, 1.0])])
    assert any(
        "norm:1.0 clipped 30% of steps" in line and "no real difference" in line for line in lines
    )


def test_one_seed_is_flagged() -> None:
    lines = conclude([summary("none", [2.0]), summary("zclip", [1.0])])
    assert any("one seed only" in line for line in lines)


def test_divergence_and_a_real_rescue() -> None:
    lines = conclude(
        [
            summary("none", [], diverged=2),
            summary("norm:0.05", [0.0258, 0.0254], initials=[0.503, 0.53], constant=0.51,
                    clip_rate=0.99),
        ]
    )  # fmt: skip
    assert "no clipping diverged in 2 of 2 runs (first non-finite loss at step 16)." in lines
    assert (
        "Clipping rescued training: without it 0 of 2 runs trained, with norm:0.05 every run "
        "did (final loss 0.0254–0.0258, from 0.503–0.53 at step 1; a constant prediction "
        "scores 0.51)."
    ) in lines
    assert any(line.startswith("norm:0.05 clipped 99% of steps") for line in lines)
    assert any(
        line.startswith("Lowest final loss") and "norm:0.05 (0.0256)" in line for line in lines
    )


def test_finite_but_untrained_runs_are_no_rescue() -> None:
    """The audit's case: clipped runs end at 1.1-1.8, above their step-1 loss of ~0.5."""
    lines = conclude(
        [
            summary("none", [], diverged=2),
            summary("norm:1.0", [1.11, 1.14], initials=[0.503, 0.53], constant=0.51, clip_rate=0.98),
            summary("value:0.5", [1.5, 1.8], initials=[0.503, 0.53], constant=0.51, clip_rate=0.99),
        ]
    )  # fmt: skip
    text = " ".join(lines)
    assert "rescued training" not in text and "prevented" not in text
    assert (
        "norm:1.0 did not train in 2 of 2 runs: final loss 1.11–1.14, not below the loss at "
        "step 1 (0.503–0.53); a constant prediction scores 0.51."
    ) in lines
    assert any(line.startswith("value:0.5 did not train in 2 of 2 runs") for line in lines)
    assert any(line.startswith("No clipping strategy here trained in every run") for line in lines)
    assert lines[-1] != "Every run diverged: lower the learning rate or the threshold."
    assert "No strategy trained in every run." in lines


def test_a_finite_blow_up_is_named_and_is_no_rescue() -> None:
    lines = conclude(
        [
            summary("none", [], diverged=2),
            summary("zclip:warmup=5", [932.0, 3757.0], initials=[0.503, 0.53], clip_rate=0.57),
        ]
    )
    assert (
        "zclip:warmup=5 stayed finite but blew up in 2 of 2 runs: final loss 932–3,757, up to "
        "7,089 times the loss at step 1 (0.503–0.53)."
    ) in lines
    assert not any("rescued training" in line for line in lines)


def test_below_the_start_but_not_below_a_constant_prediction_is_not_training() -> None:
    lines = conclude(
        [
            summary("none", [], diverged=1),
            summary("norm:1.0", [0.45], initials=[0.5], constant=0.4),
        ]
    )
    assert any("not below a constant prediction in 1 of 1 runs" in line for line in lines)
    assert not any("rescued training" in line for line in lines)


def test_strategies_that_never_clipped_are_not_evidence() -> None:
    base = summary("none", [0.0189, 0.0192], clip_rate=0.0)
    lines = conclude(
        [
            base,
            summary("norm:1.0", [0.0189, 0.0192], clip_rate=0.0),
            summary("zclip", [0.0189, 0.0192], clip_rate=0.0),
            summary("autoclip:p=10", [0.0190, 0.0193], clip_rate=0.7),
        ]
    )
    assert lines[0] == (
        "norm:1.0 and zclip never clipped a step: identical to no clipping, so they say "
        "nothing about clipping here (the thresholds never came into play)."
    )
    others = lines[1:]
    assert not any("norm:1.0" in line or "zclip" in line for line in others[:-1])
    assert any(line.startswith("autoclip:p=10 clipped 70% of steps") for line in others)


def test_divergence_inside_a_warm_up_is_said_to_be_no_test_of_the_strategy() -> None:
    lines = conclude(
        [
            summary("none", [], diverged=2),
            summary("zclip", [], diverged=2, clip_rate=0.0),
            summary("zclip:warmup_steps=5", [], diverged=2, clip_rate=0.0),
        ]
    )
    assert lines[1].startswith(
        "zclip diverged in 2 of 2 runs (first non-finite loss at step 16). That was within "
        "its 25-step warm-up, before it could clip"
    )
    assert lines[2].startswith(
        "zclip:warmup_steps=5 diverged in 2 of 2 runs (first non-finite loss at step 16). It "
        "never clipped a step before that"
    )
    assert "Every run diverged: lower the learning rate or the threshold." in lines


def test_runs_without_steps_are_not_called_diverged() -> None:
    empty = [summary("none", []), summary("norm:1.0", [])]
    for s in empty:  # one run each, no step, so no loss at step 1 either
        s.runs, s.initial_loss, s.step_ms = 1, math.nan, math.nan
    assert conclude(empty) == ["No run took a step: there is nothing to conclude."]


def test_the_time_sentence_never_calls_a_faster_strategy_the_slowest() -> None:
    lines = conclude(
        [
            summary("none", [1.0, 1.1], step_ms=3.0),
            summary("norm:1.0", [1.0, 1.1], step_ms=2.5),
            summary("value:0.5", [1.0, 1.1], step_ms=2.8),
        ]
    )
    timing = [line for line in lines if line.startswith("Median time per step")]
    assert timing and "slowest" not in timing[0]
    assert timing[0].startswith(
        "Median time per step: 3 ms without clipping, 2.5 ms (norm:1.0, -17%) to 2.8 ms "
        "(value:0.5, -7%) with clipping."
    )


def test_loss_spikes_are_reported_when_there_are_some() -> None:
    lines = conclude([summary("none", [1.0, 1.1], spikes=1.5), summary("norm:1.0", [1.0, 1.1])])
    assert any("Loss spikes per run" in line and "no clipping 1.5" in line for line in lines)
    quiet = conclude([summary("none", [1.0, 1.1]), summary("norm:1.0", [1.0, 1.1])])
    assert not any("spike" in line.lower() for line in quiet)


# -- plots ---------------------------------------------------------------------------


def rows(clip: str, seed: int, losses: list[float], threshold: float = math.inf) -> RunResult:
    result = RunResult("t", clip, seed)
    for step, loss in enumerate(losses, 1):
        result.rows.append(
            {"step": step, "loss": loss, "total_norm": 2.0, "clipped_norm": min(2.0, threshold),
             "threshold": threshold, "clipped": int(threshold < 2.0), "loss_spike": 0,
             "time_ms": 1.0}
        )  # fmt: skip
        if not math.isfinite(loss):
            result.diverged_at = step
    return result


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Keep each figure the report would save, instead of closing it."""
    kept: list[Any] = []

    def keep(fig: Any, path: Path) -> Path:
        kept.append(fig)
        return path

    monkeypatch.setattr(report, "_save", keep)
    return kept


def test_the_loss_axis_ends_at_the_finished_runs_not_at_a_divergence(
    figures: list[Any], tmp_path: Path
) -> None:
    exploding = [0.5 * 100.0**k for k in range(17)] + [math.nan]  # up to 5e31, then NaN
    decaying = [0.5 * 0.8**k for k in range(30)]
    plot_loss(
        [rows("none", 0, exploding), rows("norm:0.05", 0, decaying, 0.05)], tmp_path / "l.png"
    )
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log"
    assert 0.5 <= high < 1.0 and low < min(decaying)  # not squashed by 5e31
    markers = [
        line for line in ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())
    ]
    diverged_marks = [m for m in markers if list(m.get_xdata()) == [18]]
    assert diverged_marks and list(diverged_marks[0].get_ydata()) == [high]  # at the top edge
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "first non-finite loss (diverged)" in labels


def test_every_strategy_gets_its_own_colour_and_line_style(
    figures: list[Any], tmp_path: Path
) -> None:
    runs = [rows(f"norm:{k}", 0, [1.0, 0.9, 0.8], float(k)) for k in range(1, 13)]
    plot_loss(runs, tmp_path / "l.png")
    curves = [
        line for line in figures[0].axes[0].get_lines() if line.get_label().startswith("norm")
    ]
    assert len(curves) == 12
    colours = {str(c.get_color()) for c in curves}
    # matplotlib names every custom dash pattern "--"; the pattern itself tells them apart
    dashes = {(c.get_linestyle(), str(c._unscaled_dash_pattern)) for c in curves}
    assert len(colours) == 12
    assert len(dashes) == 12


def test_the_norms_legend_names_the_threshold(figures: list[Any], tmp_path: Path) -> None:
    plot_norms(
        [rows("none", 0, [1.0, 0.9]), rows("norm:1.0", 0, [1.0, 0.9], 1.0)], tmp_path / "n.png"
    )
    legend = figures[0].axes[0].get_legend()  # the first panel is no clipping: no threshold
    assert [t.get_text() for t in legend.get_texts()] == [
        "before clipping", "after clipping", "threshold",
    ]  # fmt: skip
