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
    """Sentences that say what clipping did in one task, from its summaries alone."""
    by_clip = {s.clip: s for s in summaries}
    base = by_clip.get(BASELINE)
    others = [s for s in summaries if s.clip != BASELINE]
    lines: list[str] = []
    if base is None:
        lines.append(
            "No unclipped baseline was run (add --clip none), so the strategies are "
            "compared with each other only."
        )
    diverging = [s for s in summaries if s.diverged]
    for s in diverging:
        lines.append(
            f"{label(s.clip)} diverged in {s.diverged} of {s.runs} runs (first non-finite "
            f"loss at step {s.first_divergence_step})."
        )
    stable = [s for s in others if not s.diverged]
    if base is not None and base.diverged and stable:
        names = ", ".join(label(s.clip) for s in stable)
        lines.append(
            f"Clipping prevented divergence: {names} finished every run where training "
            "without clipping did not."
        )
    finished = [s for s in summaries if s.diverged < s.runs and math.isfinite(s.final_loss)]
    if not finished:
        lines.append("Every run diverged: lower the learning rate or the threshold.")
        return lines
    best = min(finished, key=lambda s: s.final_loss)
    if base is not None and base.diverged == 0 and math.isfinite(base.final_loss):
        for s in [s for s in others if s.diverged == 0 and math.isfinite(s.final_loss)]:
            lines.append(_versus_baseline(s, base))
    lines.append(f"Lowest final loss: {label(best.clip)} ({best.final_loss:.4g}).")
    for s in others:
        if s.clip_rate >= 0.95:
            lines.append(
                f"{label(s.clip)} clipped {s.clip_rate:.0%} of steps: its threshold sits "
                "below the typical gradient, so nearly every update is rescaled (for norm "
                "clipping that is normalized gradient descent with step lr × threshold)."
            )
    if base is not None and math.isfinite(base.step_ms) and base.step_ms > 0:
        costs = [(s, s.step_ms / base.step_ms - 1) for s in others if math.isfinite(s.step_ms)]
        if costs:
            worst = max(costs, key=lambda c: c[1])
            lines.append(
                f"Median time per step: {base.step_ms:.3g} ms without clipping; the slowest "
                f"strategy, {label(worst[0].clip)}, {worst[0].step_ms:.3g} ms "
                f"({worst[1]:+.0%}). Wall times vary with machine load; "
                "benchmarks/RESULTS.md has the controlled comparison."
            )
    return lines


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
    """Loss per step: median over seeds per strategy with a min–max band; x marks divergence."""
    fig, ax = _figure()
    all_losses = [row["loss"] for r in runs for row in r.rows if math.isfinite(row["loss"])]
    for (color, style), (clip, group) in zip(_styles(), _by_clip(runs).items()):
        steps, low, mid, high = _band(group, "loss")
        if steps:
            ax.plot(steps, mid, style, color=color, label=label(clip), linewidth=1.2)
            ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        for r in group:
            if r.diverged_at is not None:
                ax.axvline(r.diverged_at, color=color, linestyle=":", linewidth=1)
                ax.plot([r.diverged_at], [_top(all_losses)], marker="x", color=color, markersize=8)
    _log_if_wide(ax, all_losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_norms(runs: Sequence[RunResult], path: Path) -> Path:
    """Small multiples per strategy: pre-clip norm, post-clip norm and threshold (medians)."""
    import matplotlib.pyplot as plt

    groups = _by_clip(runs)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(max(4.0, 3.2 * len(groups)), 3.2), squeeze=False
    )
    for ax, (clip, group) in zip(axes[0], groups.items()):
        for column, style, width, name in (
            ("total_norm", "-", 2.0, "before clipping"),
            ("clipped_norm", "-", 1.0, "after clipping"),
            ("threshold", "--", 1.0, "threshold"),
        ):
            steps, _, mid, _ = _band(group, column)
            if steps and any(math.isfinite(v) for v in mid):
                ax.plot(steps, mid, style, label=name, linewidth=width)
        ax.set_title(label(clip), fontsize=9)
        ax.set_xlabel("step")
        values = [
            row[k]
            for r in group
            for row in r.rows
            for k in ("total_norm", "clipped_norm")
            if math.isfinite(row[k]) and row[k] > 0
        ]
        _log_if_wide(ax, values)
    axes[0][0].set_ylabel("gradient norm")
    axes[0][0].legend(loc="best", fontsize=7)
    return _save(fig, path)


def plot_clip_rate(runs: Sequence[RunResult], path: Path) -> Path:
    """Rolling fraction of clipped steps per strategy (mean over seeds)."""
    fig, ax = _figure()
    for (color, style), (clip, group) in zip(_styles(), _by_clip(runs).items()):
        steps, _, mid, _ = _band(group, "clipped", reduce=statistics.fmean)
        if steps:
            rolling = _rolling(mid, max(1, len(mid) // 20))
            ax.plot(steps, rolling, style, color=color, label=label(clip))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction clipped")
    ax.legend(loc="best", fontsize=8)
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
    ax.bar(positions, medians, yerr=list(zip(*errors)), color=list(_colors())[: len(groups)])
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
            f"{name} changed the final loss by {change:+.1%}: no real difference, so "
            "clipping is not needed in this setting."
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


def _top(values: list[float]) -> float:
    return max(values) if values else 1.0


def _log_if_wide(ax: Axes, values: list[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


def _colors() -> list[str]:
    return [f"C{i}" for i in range(10)]


def _styles() -> list[tuple[str, str]]:
    """Colour and line style per strategy, so curves that coincide stay visible."""
    dashes = ["-", "--", "-.", ":"]
    return [(f"C{i}", dashes[i % len(dashes)]) for i in range(10)]


def _figure() -> tuple[Any, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    return fig, ax


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
        ("strategies", ", ".join(label(c) for c in study.clips)),
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


def _settings(runs: Sequence[RunResult]) -> str:
    if not runs:
        return ""
    settings = runs[0].settings
    text = ", ".join(f"{k} {v}" for k, v in settings.items())
    return f"<p class=settings>{html.escape(text)}</p>"


def _table(summaries: Sequence[Summary]) -> str:
    metric_names = sorted({m for s in summaries for m in s.metrics})
    head = [
        "strategy", "diverged", "final loss", "seed spread", "best loss", "late loss std",
        "loss spikes",
        "clip rate", "ms/step", "wall s", *metric_names,
    ]  # fmt: skip
    rows = []
    for s in summaries:
        cells = [
            label(s.clip),
            f"{s.diverged}/{s.runs}" + (f" (step {s.first_divergence_step})" if s.diverged else ""),
            _num(s.final_loss),
            _num(s.final_loss_spread),
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
