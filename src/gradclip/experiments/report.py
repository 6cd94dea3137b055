"""The study's report: PNG plots, an HTML page, and a conclusion drawn from the numbers.

Plots per task (matplotlib, Agg backend): the loss with a band over seeds, pre- and
post-clip gradient norms with the threshold, the clip rate over training, and the
time per step. ``report.html`` holds the settings, a table per strategy, the plots,
text samples for generative tasks, and ends with a conclusion written from the
summaries: which runs diverged, whether clipping changed the final loss by more than
the seed-to-seed spread, and at what cost in time.
"""

from __future__ import annotations

import html
import math
import platform
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradclip.experiments.compare import BLEW_UP
from gradclip.experiments.runner import SPIKE_THRESHOLD, SPIKE_WINDOW

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from gradclip.experiments.compare import Study, Summary
    from gradclip.experiments.runner import RunResult

BASELINE = "none"
"""The spec of the unclipped baseline the conclusion compares against."""

NOISE_FLOOR = 0.05
"""Relative final-loss differences below this count as no change."""


def write_report(study: Study, *, command: str = "") -> dict[str, Path]:
    """Write the plots and ``report.html`` into ``study.out``; returns the files by role."""
    assert study.out is not None
    files: dict[str, Path] = {}
    for task in study.tasks:
        runs, _ = study.for_task(task)
        stem = task.replace("/", "_")
        files[f"{task}:loss"] = plot_loss(runs, study.out / f"{stem}-loss.png")
        files[f"{task}:norms"] = plot_norms(runs, study.out / f"{stem}-norms.png")
        files[f"{task}:clip_rate"] = plot_clip_rate(runs, study.out / f"{stem}-clip-rate.png")
        files[f"{task}:time"] = plot_time(runs, study.out / f"{stem}-time.png")
    page = study.out / "report.html"
    page.write_text(render_html(study, files, command=command), encoding="utf-8")
    files["report"] = page
    return files


def conclude(summaries: Sequence[Summary]) -> list[str]:
    """Sentences that say what clipping did in one task, from its summaries alone.

    Each run is judged against where it started. A run that did not diverge
    *trained* when its final loss is below its loss at step 1 and, where the task
    has one, below the loss of the best constant prediction; it *did not train* when
    its final loss is not below its step-1 loss, and *blew up* at
    :data:`~gradclip.experiments.compare.BLEW_UP` times that or more. A strategy that
    never clipped a step ran exactly as no clipping does: it is named as such and
    left out of every comparison. Clipping *rescued* training only when training
    without it failed in some run (diverged, blew up, did not train) and a clipping
    strategy trained in every run.

    Args:
        summaries: one task's summaries, one per strategy (``"none"`` is the
            unclipped baseline).

    Returns:
        The conclusion, one sentence (or two) per line.

    Example:
        >>> import textwrap
        >>> from gradclip.experiments.compare import compare
        >>> from gradclip.experiments.tasks import TaskOptions
        >>> study = compare(["lstm-sine-unstable"], ["none", "norm:0.05", "zclip"],
        ...                 options=TaskOptions(max_steps=45))
        >>> for line in conclude(study.summaries):
        ...     print(textwrap.shorten(line, 88, placeholder=" ..."))
        no clipping diverged in 1 of 1 runs (first non-finite loss at step 16).
        zclip diverged in 1 of 1 runs (first non-finite loss at step 16). That was within ...
        Clipping rescued training: without it 0 of 1 runs trained, with norm:0.05 every run ...
        norm:0.05 clipped 100% of steps: its threshold sits below the typical gradient, so ...
        Lowest final loss among the strategies that trained in every run: norm:0.05 (...).
        Median time per step: ...
    """
    by_clip = {s.clip: s for s in summaries}
    base = by_clip.get(BASELINE)
    idle = [s for s in summaries if s.clip != BASELINE and s.clip_rate == 0]
    active = [s for s in summaries if s.clip != BASELINE and s not in idle]
    lines: list[str] = []
    if base is None:
        lines.append(
            "No unclipped baseline was run (add --clip none), so the strategies are "
            "compared with each other only."
        )
    if not any(math.isfinite(s.initial_loss) for s in summaries):
        lines.append("No run took a step: there is nothing to conclude.")
        return lines
    for s in summaries:
        if s.diverged:
            lines.append(_diverged(s))
    quiet = [s for s in idle if not s.diverged]
    if quiet:
        lines.append(_never_clipped(quiet, base))
    judged = ([base] if base is not None else []) + active
    trained = [s for s in judged if s.runs and s.trained == s.runs]
    if base is not None and base.trained < base.runs:
        lines += _rescue(base, active)
    elif base is not None:
        lines += [_versus_baseline(s, base) for s in active if s.trained == s.runs]
    for s in judged:
        lines += _outcomes(s)
    always = [s for s in active if s.clip_rate >= 0.95]
    if always:
        lines.append(_always_clipped(always))
    if all(s.diverged == s.runs for s in summaries):
        lines.append("Every run diverged: lower the learning rate or the threshold.")
    elif trained:
        lines.append(_lowest(trained))
    else:
        lines.append("No strategy trained in every run.")
    spiky = [s for s in judged if s.loss_spikes > 0]
    if spiky:
        counts = ", ".join(f"{label(s.clip)} {s.loss_spikes:.3g}" for s in spiky)
        others = (
            f"; the other strategies had none (a run is scored from step {SPIKE_WINDOW + 1} on)"
            if len(spiky) < len(judged)
            else ""
        )
        lines.append(
            f"Loss spikes per run (a loss more than {SPIKE_THRESHOLD:g} robust standard "
            f"deviations above the previous {SPIKE_WINDOW} steps'): {counts}{others}."
        )
    lines += _timing(base, [s for s in summaries if s.clip != BASELINE])
    return lines


def _rescue(base: Summary, active: Sequence[Summary]) -> list[str]:
    """Whether clipping rescued a baseline that failed in some run."""
    rescuers = [s for s in active if s.trained == s.runs]
    if not rescuers:
        if not active:
            return []
        return [
            "No clipping strategy here trained in every run, so clipping did not make up "
            "for the failed runs without it: try a lower threshold (or learning rate)."
        ]
    finals = (
        _span(rescuers[0].final_losses)
        if len(rescuers) == 1
        else _join([f"{label(s.clip)} {_span(s.final_losses)}" for s in rescuers])
    )
    starts = _span([i for s in rescuers for i in s.initial_losses])
    reference = next((s for s in [base, *rescuers] if math.isfinite(s.constant_loss)), base)
    return [
        f"Clipping rescued training: without it {base.trained} of {base.runs} runs "
        f"trained, with {_join([label(s.clip) for s in rescuers])} every run did "
        f"(final loss {finals}, from {starts} at step 1{_constant(reference)})."
    ]


def _lowest(trained: Sequence[Summary]) -> str:
    """The lowest final loss, and the strategies within the noise floor of it."""
    best = min(trained, key=lambda s: s.final_loss)
    close = [
        s
        for s in trained
        if s is not best and s.final_loss - best.final_loss <= NOISE_FLOOR * abs(best.final_loss)
    ]
    line = (
        "Lowest final loss among the strategies that trained in every run: "
        f"{label(best.clip)} ({_num3(best.final_loss, 4)})"
    )
    if close:
        tied = _join([f"{label(s.clip)} ({_num3(s.final_loss, 4)})" for s in close])
        line += f", within {NOISE_FLOOR:.0%} of {tied}: no real difference between them"
    return line + "."


def _diverged(s: Summary) -> str:
    name = label(s.clip)
    line = (
        f"{name} diverged in {s.diverged} of {s.runs} runs (first non-finite loss at step "
        f"{s.first_divergence_step})."
    )
    if s.clip == BASELINE or s.clip_rate > 0:
        return line
    warmup = _warmup_steps(s.clip)
    step = s.first_divergence_step
    if warmup is not None and step is not None and step <= warmup:
        return (
            f"{line} That was within its {warmup}-step warm-up, before it could clip: these "
            f"are no-clipping runs, not a test of {name} (a shorter warm-up: "
            f"{s.clip.split(':')[0]}:warmup_steps=N)."
        )
    return (
        f"{line} It never clipped a step before that: these are no-clipping runs, not a "
        f"test of {name}."
    )


def _never_clipped(quiet: Sequence[Summary], base: Summary | None) -> str:
    names = _join([label(s.clip) for s in quiet])
    one = len(quiet) == 1
    if base is not None and all(s.final_losses == base.final_losses for s in quiet):
        return (
            f"{names} never clipped a step: identical to no clipping, so "
            f"{'it says' if one else 'they say'} nothing about clipping here (the "
            f"threshold{'' if one else 's'} never came into play)."
        )
    return (
        f"{names} never clipped a step, so {'it' if one else 'they'} trained as no "
        "clipping would: no conclusion about clipping can be drawn from "
        f"{'it' if one else 'them'}."
    )


def _outcomes(s: Summary) -> list[str]:
    """Sentences on the finished runs of ``s`` that did not train."""
    name = label(s.clip)
    pairs = list(zip(s.final_losses, s.initial_losses))
    blew = [(f, i) for f, i in pairs if f >= BLEW_UP * i]
    flat = [(f, i) for f, i in pairs if i <= f < BLEW_UP * i]
    constant = s.constant_loss
    weak = [(f, i) for f, i in pairs if f < i and math.isfinite(constant) and f >= constant]
    lines = []
    if blew:
        ratio = max(f / i for f, i in blew)
        times = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.2g}"
        lines.append(
            f"{name} stayed finite but blew up in {len(blew)} of {s.runs} runs: final loss "
            f"{_span([f for f, _ in blew])}, up to {times} times the loss at step 1 "
            f"({_span([i for _, i in blew])})."
        )
    if flat:
        lines.append(
            f"{name} did not train in {len(flat)} of {s.runs} runs: final loss "
            f"{_span([f for f, _ in flat])}, not below the loss at step 1 "
            f"({_span([i for _, i in flat])}){_constant(s)}."
        )
    if weak:
        lines.append(
            f"{name} ended below its step-1 loss but not below a constant prediction in "
            f"{len(weak)} of {s.runs} runs: final loss {_span([f for f, _ in weak])} vs "
            f"{constant:.3g}, so it learned no more than the targets' average."
        )
    return lines


def _always_clipped(group: Sequence[Summary]) -> str:
    names = _join([label(s.clip) for s in group])
    low, high = (
        f"{100 * r:.0f}" for r in (min(s.clip_rate for s in group), max(s.clip_rate for s in group))
    )
    rates = low if low == high else f"{low}–{high}"
    one = len(group) == 1
    line = (
        f"{names} clipped {rates}% of steps: {'its' if one else 'their'} "
        f"threshold{'' if one else 's'} sit{'s' if one else ''} below the typical gradient, "
        "so nearly every update is cut down"
    )
    if any(s.clip.split(":")[0].strip().lower() == "norm" for s in group):
        line += (
            " (norm clipping on every step is normalized gradient descent, with steps of "
            "lr × threshold)"
        )
    return line + "."


def _timing(base: Summary | None, others: Sequence[Summary]) -> list[str]:
    if base is None or not (math.isfinite(base.step_ms) and base.step_ms > 0):
        return []
    timed = sorted((s for s in others if math.isfinite(s.step_ms)), key=lambda s: s.step_ms)
    if not timed:
        return []
    note = (
        " Wall times vary with machine load; benchmarks/RESULTS.md has the controlled comparison."
    )
    lo, hi = timed[0], timed[-1]
    if lo is hi:
        with_clip = (
            f"{lo.step_ms:.3g} ms with {label(lo.clip)} ({lo.step_ms / base.step_ms - 1:+.0%})"
        )
    else:
        with_clip = (
            f"{lo.step_ms:.3g} ms ({label(lo.clip)}, {lo.step_ms / base.step_ms - 1:+.0%}) to "
            f"{hi.step_ms:.3g} ms ({label(hi.clip)}, {hi.step_ms / base.step_ms - 1:+.0%}) with "
            "clipping"
        )
    return [f"Median time per step: {base.step_ms:.3g} ms without clipping, {with_clip}.{note}"]


def _join(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _span(values: Sequence[float], digits: int = 3) -> str:
    """``1.08`` or ``1.08–1.14``: the range of a few values.

    >>> _span([1.14, 1.085]), _span([0.0372, 0.03716]), _span([932.0, 3757.0])
    ('1.08–1.14', '0.0372', '932–3,757')
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    lo, hi = _num3(min(finite), digits), _num3(max(finite), digits)
    return lo if lo == hi else f"{lo}–{hi}"


def _num3(value: float, digits: int = 3) -> str:
    """A number to ``digits`` significant digits; from 1,000 to 10⁹ as a grouped integer."""
    if math.isfinite(value) and 1e3 <= abs(value) < 1e9:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _constant(s: Summary) -> str:
    if not math.isfinite(s.constant_loss):
        return ""
    return f"; a constant prediction scores {s.constant_loss:.3g}"


def _warmup_steps(clip: str) -> int | None:
    """The warm-up of a strategy (steps before it clips at all), if it has one."""
    from gradclip.spec import from_spec

    try:
        clipper = from_spec(clip, [torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError):
        return None
    warmup = clipper.defaults.get("warmup_steps")
    return warmup if isinstance(warmup, int) and not isinstance(warmup, bool) else None


def render_html(study: Study, files: dict[str, Path], *, command: str = "") -> str:
    """The report page (images referenced by file name, beside it)."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>gradclip study</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Does clipping help? A gradclip study</h1>",
        _meta(study, command),
    ]
    for task in study.tasks:
        runs, summaries = study.for_task(task)
        parts.append(f'<section id="{html.escape(task)}"><h2>{html.escape(task)}</h2>')
        parts.append(_settings(runs))
        parts.append(_table(summaries))
        for role, title in (
            ("loss", "Training loss (median over seeds, band: min to max)"),
            ("norms", "Gradient norm before and after clipping, and the threshold"),
            ("clip_rate", "Fraction of steps clipped (rolling)"),
            ("time", "Time per step"),
        ):
            image = files.get(f"{task}:{role}")
            if image is not None:
                parts.append(
                    f'<figure><img src="{html.escape(image.name)}" alt="{html.escape(title)}">'
                    f"<figcaption>{html.escape(title)}</figcaption></figure>"
                )
        samples = [r for r in runs if r.sample]
        if samples:
            parts.append("<h3>Samples</h3>")
            for r in samples:
                parts.append(
                    f"<p><b>{html.escape(label(r.clip))}</b>, seed {r.seed}:</p>"
                    f"<pre>{html.escape(r.sample or '')}</pre>"
                )
        parts.append("<h3>Conclusion</h3><ul>")
        parts += [f"<li>{html.escape(line)}</li>" for line in conclude(summaries)]
        parts.append("</ul></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def plot_loss(runs: Sequence[RunResult], path: Path) -> Path:
    """Loss per step: median over seeds per strategy with a min–max band.

    The y-range is the finite, useful one: it ends at the largest loss of the runs
    that did not diverge (or, if every run diverged, at 100 times their median step-1
    loss), so the losses of a run about to diverge (up to 1e30 and more) do not
    squash the others. Curves above it leave the plot at its top edge, where an x
    marks the step of each run's first non-finite loss.
    """
    from matplotlib.lines import Line2D

    fig, ax = _figure()
    groups = _by_clip(runs)
    bottom, top = _loss_range(runs)
    for (color, style), (clip, group) in zip(_styles(len(groups)), groups.items()):
        steps, low, mid, high = _band(group, "loss")
        if steps:
            ax.plot(steps, mid, linestyle=style, color=color, label=label(clip), linewidth=1.2)
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    wide = bottom > 0 and top / bottom > 100
    if wide:
        ax.set_yscale("log")
        ax.set_ylim(bottom / 1.2, top * 1.2)
    else:
        pad = 0.05 * (top - bottom) or 0.05 * abs(top) or 1.0
        ax.set_ylim(bottom - pad, top + pad)
    edge = ax.get_ylim()[1]
    diverged = False
    for (color, _), group in zip(_styles(len(groups)), groups.values()):
        for r in group:
            if r.diverged_at is not None:
                diverged = True
                ax.axvline(r.diverged_at, color=color, linestyle=":", linewidth=1)
                ax.plot(
                    [r.diverged_at], [edge], marker="x", color=color, markersize=8,
                    markeredgewidth=2, clip_on=False, zorder=5,
                )  # fmt: skip
    handles, _ = ax.get_legend_handles_labels()
    if diverged:
        handles.append(
            Line2D([], [], marker="x", color="0.3", linestyle="none", markeredgewidth=2,
                   label="first non-finite loss (diverged)")
        )  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if wide else ""))
    _legend_right(ax, handles)
    return _save(fig, path)


def plot_norms(runs: Sequence[RunResult], path: Path) -> Path:
    """Small multiples per strategy: pre-clip norm, post-clip norm and threshold (medians).

    One legend names the three lines (the threshold too, even when the first panel,
    no clipping, has none to draw).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_clip(runs)
    cols = min(len(groups), 4)
    rows = -(-len(groups) // cols)
    fig, grid = plt.subplots(
        rows, cols, figsize=(max(4.0, 3.4 * cols), 2.9 * rows + 0.3), squeeze=False
    )
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    lines = (
        ("total_norm", "-", 2.0, "C0", "before clipping"),
        ("clipped_norm", "-", 1.0, "C1", "after clipping"),
        ("threshold", "--", 1.2, "C3", "threshold"),
    )
    handles: dict[str, Any] = {}
    for ax, (clip, group) in zip(axes, groups.items()):
        for column, style, width, color, name in lines:
            steps, _, mid, _ = _band(group, column)
            if steps and any(math.isfinite(v) for v in mid):
                (handles[name],) = ax.plot(
                    steps, mid, linestyle=style, color=color, label=name, linewidth=width
                )
        ax.set_title(label(clip), fontsize=9)
        ax.set_xlabel("step")
        values = [
            row[k]
            for r in group
            for row in r.rows
            for k in ("total_norm", "clipped_norm", "threshold")
            if math.isfinite(row[k]) and row[k] > 0
        ]
        _log_if_wide(ax, values)
    for row in grid:
        row[0].set_ylabel("gradient norm")
    ordered = [handles[name] for *_, name in lines if name in handles]
    axes[0].legend(handles=ordered, loc="best", fontsize=7)
    return _save(fig, path)


def plot_clip_rate(runs: Sequence[RunResult], path: Path) -> Path:
    """Rolling fraction of clipped steps per strategy (mean over seeds)."""
    fig, ax = _figure()
    groups = _by_clip(runs)
    for (color, style), (clip, group) in zip(_styles(len(groups)), groups.items()):
        steps, _, mid, _ = _band(group, "clipped", reduce=statistics.fmean)
        if steps:
            rolling = _rolling(mid, max(1, len(mid) // 20))
            ax.plot(steps, rolling, linestyle=style, color=color, label=label(clip))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction clipped")
    _legend_right(ax, ax.get_legend_handles_labels()[0])
    return _save(fig, path)


def plot_time(runs: Sequence[RunResult], path: Path) -> Path:
    """Median time per step per strategy, with the interquartile range."""
    fig, ax = _figure()
    groups = _by_clip(runs)
    medians, errors = [], []
    for group in groups.values():
        times = sorted(row["time_ms"] for r in group for row in r.rows) or [math.nan]
        q1, q2, q3 = _quartiles(times)
        medians.append(q2)
        errors.append((q2 - q1, q3 - q2))
    positions = list(range(len(groups)))
    colors = [color for color, _ in _styles(len(groups))]
    ax.bar(positions, medians, yerr=list(zip(*errors)), color=colors)
    ax.set_xticks(positions, [label(c) for c in groups], rotation=20, fontsize=8)
    ax.set_ylabel("ms per step")
    return _save(fig, path)


# -- helpers -------------------------------------------------------------------------


def label(clip: str) -> str:
    """How a strategy spec reads in the report: ``none`` is "no clipping"."""
    return "no clipping" if clip == BASELINE else clip


def _by_clip(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.clip, []).append(r)
    return groups


def _band(
    group: Sequence[RunResult], column: str, reduce: Any = statistics.median
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step over the runs that reached it: min, ``reduce`` (median) and max."""
    by_step: dict[int, list[float]] = {}
    for r in group:
        for row in r.rows:
            value = float(row[column])
            if math.isfinite(value):
                by_step.setdefault(int(row["step"]), []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [min(by_step[s]) for s in steps],
        [reduce(by_step[s]) for s in steps],
        [max(by_step[s]) for s in steps],
    )


def _rolling(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[1], q[2]


def _versus_baseline(s: Summary, base: Summary) -> str:
    """One sentence on a strategy's final loss against no clipping, honest about seeds.

    A difference counts when every seed of one is below every seed of the other;
    overlapping seeds are called inconclusive, and a single seed is flagged as such.
    """
    change = (s.final_loss - base.final_loss) / abs(base.final_loss)
    name = label(s.clip)
    if abs(change) <= NOISE_FLOOR:
        return (
            f"{name} clipped {s.clip_rate:.0%} of steps and changed the final loss by "
            f"{change:+.1%}: no real difference, so it is not needed in this setting."
        )
    verdict = "lower" if change < 0 else "higher"
    numbers = f"final loss {s.final_loss:.4g} vs {base.final_loss:.4g}"
    ours, theirs = s.final_losses, base.final_losses
    if len(ours) > 1 and len(theirs) > 1:
        if max(ours) < min(theirs) or min(ours) > max(theirs):
            return (
                f"{name} ended {abs(change):.0%} {verdict} than no clipping in every seed "
                f"({numbers})."
            )
        return (
            f"{name}'s median final loss is {abs(change):.0%} {verdict} than no clipping "
            f"({numbers}), but the seeds overlap ({min(ours):.4g}-{max(ours):.4g} vs "
            f"{min(theirs):.4g}-{max(theirs):.4g}): not conclusive with these seeds."
        )
    return (
        f"{name} ended {abs(change):.0%} {verdict} than no clipping ({numbers}); one seed "
        "only, so run more (--seeds) to tell this from seed-to-seed noise."
    )


def _loss_range(runs: Sequence[RunResult]) -> tuple[float, float]:
    """The finite, useful y-range of the loss plot (see :func:`plot_loss`)."""
    finite = [row["loss"] for r in runs for row in r.rows if math.isfinite(row["loss"])]
    if not finite:
        return 0.0, 1.0
    kept = [row["loss"] for r in runs if not r.diverged for row in r.rows]
    if kept:
        top = max(kept)
    else:
        starts = [r.initial_loss for r in runs if math.isfinite(r.initial_loss)]
        top = min(max(finite), 100 * abs(statistics.median(starts))) if starts else max(finite)
    bottom = min(v for v in finite if v <= top) if any(v <= top for v in finite) else top
    return bottom, top


def _log_if_wide(ax: Axes, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


LineStyle = str | tuple[int, tuple[int, ...]]

_DASHES: tuple[LineStyle, ...] = (
    "-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 3, 2, 3)),
)  # fmt: skip


def _styles(n: int) -> list[tuple[Any, LineStyle]]:
    """A distinct colour and line style for each of ``n`` strategies.

    Curves that coincide (a strategy that never clipped lies on no clipping) stay
    told apart by their dashes. Up to 10: the default colour cycle; beyond it,
    colours sampled evenly from a colour map. The first eight dash patterns are
    hand-picked; the next ones are generated, each different.

    Example:
        >>> styles = _styles(12)
        >>> len(set(c for c, _ in styles)), len(set(d for _, d in styles))
        (12, 12)
    """
    if n <= 10:
        colors: list[Any] = [f"C{i}" for i in range(n)]
    else:
        from matplotlib import colormaps

        cmap = colormaps["tab20" if n <= 20 else "turbo"]
        colors = [cmap(i / max(1, n - 1)) if n > 20 else cmap(i) for i in range(n)]
    dashes = [_DASHES[i] if i < len(_DASHES) else (0, (2 + i % 7, 2 + i // 7)) for i in range(n)]
    return list(zip(colors, dashes))


def _figure() -> tuple[Any, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    return fig, ax


def _legend_right(ax: Axes, handles: list[Any]) -> None:
    """The legend beside the axes, where it hides no curve."""
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _meta(study: Study, command: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = [
        ("command", command or "(library call)"),
        ("strategies", _strategies(study)),
        ("seeds", ", ".join(map(str, study.seeds))),
        (
            "machine",
            f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        ),
        ("written", when),
    ]
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(v)}</code></td></tr>"
        for k, v in items
    )
    return f'<table class="meta">{rows}</table>'


def _strategies(study: Study) -> str:
    """The strategies compared: one list, or one per task when they differ."""
    lists = {task: [label(c) for c in study.clips_of(task)] for task in study.tasks}
    if len({tuple(v) for v in lists.values()}) <= 1:
        return ", ".join(label(c) for c in study.clips)
    return "; ".join(f"{task}: {', '.join(names)}" for task, names in lists.items())


def _settings(runs: Sequence[RunResult]) -> str:
    if not runs:
        return ""
    settings = runs[0].settings
    text = ", ".join(f"{k} {v}" for k, v in settings.items())
    return f"<p class=settings>{html.escape(text)}</p>"


def _table(summaries: Sequence[Summary]) -> str:
    metric_names = sorted({m for s in summaries for m in s.metrics})
    head = [
        "strategy", "diverged", "trained", "loss at step 1", "final loss", "seed spread",
        "constant prediction", "best loss", "late loss std", "loss spikes",
        "clip rate", "ms/step", "wall s", *metric_names,
    ]  # fmt: skip
    rows = []
    for s in summaries:
        cells = [
            label(s.clip),
            f"{s.diverged}/{s.runs}" + (f" (step {s.first_divergence_step})" if s.diverged else ""),
            f"{s.trained}/{s.runs}" + (f" ({s.blew_up} blew up)" if s.blew_up else ""),
            _num(s.initial_loss),
            _num(s.final_loss),
            _num(s.final_loss_spread),
            _num(s.constant_loss),
            _num(s.best_loss),
            _num(s.loss_std),
            f"{s.loss_spikes:.1f}",
            f"{s.clip_rate:.0%}" if math.isfinite(s.clip_rate) else "–",
            _num(s.step_ms),
            f"{s.wall_time_s:.1f}",
            *(_num(s.metrics.get(m, math.nan)) for m in metric_names),
        ]
        css = ' class="diverged"' if s.diverged else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _num(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "–"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.diverged td{background:#fdecea}
table.meta td,table.meta th{text-align:left}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap}
.settings{color:#444}
"""
