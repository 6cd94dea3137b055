"""A clipping study: tasks × strategies × seeds, summarised, plotted and reported.

:func:`compare` runs every combination, writes ``results.csv`` (one row per step per
run, columns :data:`~gradclip.experiments.runner.RESULT_COLUMNS`), ``timings.csv``
(each step's wall time), ``summary.csv``
(one row per task and strategy, columns :data:`SUMMARY_COLUMNS`), the PNG plots and
``report.html``, and returns the :class:`Study`.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradclip.experiments.runner import RESULT_COLUMNS, TIMING_COLUMNS, RunResult, run
from gradclip.experiments.tasks import TaskOptions, get_task
from gradclip.spec import from_spec, parse_spec

SUMMARY_COLUMNS = (
    "task",
    "clip",
    "runs",
    "diverged",
    "first_divergence_step",
    "final_loss",
    "final_loss_spread",
    "best_loss",
    "loss_std",
    "loss_spikes",
    "clip_rate",
    "step_ms",
    "wall_time_s",
)
"""The columns of ``summary.csv``, before the task's own metrics (e.g. ``accuracy``).

``final_loss`` is the median over the runs that did not diverge of each run's mean
loss over its last tenth of steps; ``final_loss_spread`` is the range (max − min) of
those values over seeds; ``best_loss`` the median of each run's lowest loss;
``loss_std`` the median over those runs of the standard deviation of the loss over
the second half of training (how much it still jumps around);
``loss_spikes`` the mean count of loss spikes per run; ``clip_rate`` the fraction of
steps clipped; ``step_ms`` the median wall time of a step; ``wall_time_s`` the mean
wall time of a run. Metrics are means over the runs that did not diverge.
"""


@dataclass
class Summary:
    """One task's and strategy's aggregate over seeds (see :data:`SUMMARY_COLUMNS`)."""

    task: str
    clip: str
    runs: int
    diverged: int
    first_divergence_step: int | None
    final_loss: float
    final_loss_spread: float
    best_loss: float
    loss_std: float
    loss_spikes: float
    clip_rate: float
    step_ms: float
    wall_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    final_losses: list[float] = field(default_factory=list)
    """Each finished run's final loss (not a CSV column; the conclusion compares them)."""

    def row(self) -> dict[str, Any]:
        """The summary as a flat dict: the fixed columns, then the metrics."""
        fixed = {name: getattr(self, name) for name in SUMMARY_COLUMNS}
        return {**fixed, **self.metrics}


@dataclass
class Study:
    """Everything one :func:`compare` call produced.

    Attributes:
        tasks, clips, seeds: what was compared.
        results: every run.
        summaries: per task and strategy, in the order of ``clips``.
        out: the output directory (None if nothing was written).
        files: the files written, by role.
    """

    tasks: list[str]
    clips: list[str]
    seeds: list[int]
    results: list[RunResult]
    summaries: list[Summary]
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def for_task(self, task: str) -> tuple[list[RunResult], list[Summary]]:
        """The runs and summaries of one task."""
        return (
            [r for r in self.results if r.task == task],
            [s for s in self.summaries if s.task == task],
        )


def validate(tasks: Sequence[str], clips: Sequence[str], seeds: int) -> None:
    """Check a study's arguments before any training.

    Raises:
        ValueError: an unknown task or strategy, a malformed spec, or seeds < 1.
    """
    from gradclip.clippers.base import registry

    if not tasks:
        raise ValueError("at least one --task is needed")
    for task in tasks:
        get_task(task)
    if not clips:
        raise ValueError("at least one --clip is needed (e.g. --clip none --clip norm:1.0)")
    known = registry()
    probe = [torch.nn.Parameter(torch.zeros(2, 2))]
    for clip in clips:
        name, _ = parse_spec(clip)
        if name not in known:
            raise ValueError(
                f"unknown clipping strategy {name!r} in --clip {clip!r}; valid: "
                f"{', '.join(sorted(known))}"
            )
        from_spec(clip, probe)  # options are checked at construction
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}")


def compare(
    tasks: Sequence[str],
    clips: Sequence[str],
    *,
    seeds: int = 1,
    seed: int = 0,
    options: TaskOptions | None = None,
    out: str | Path | None = None,
    on_run: Callable[[str, str, int], Callable[[int], None] | None] | None = None,
    command: str = "",
) -> Study:
    """Run every task × strategy × seed, then summarise and (with ``out``) report.

    Args:
        tasks: registered task names.
        clips: strategy specs; include ``"none"`` for the unclipped baseline.
        seeds: how many seeds per combination, starting at ``seed``.
        seed: the first seed.
        options: task options shared by every run.
        out: a directory for results.csv, summary.csv, plots and report.html.
        on_run: called before each run with (task, clip, seed); may return a
            per-step progress callback.
        command: the command line, recorded in the report.

    Returns:
        The study.
    """
    validate(tasks, clips, seeds)
    options = options or TaskOptions()
    seed_list = list(range(seed, seed + seeds))
    results: list[RunResult] = []
    for task in tasks:
        for clip in clips:
            for s in seed_list:
                progress = on_run(task, clip, s) if on_run else None
                results.append(run(task, clip, s, options, on_step=progress))
    summaries = [
        summarize([r for r in results if r.task == task and r.clip == clip])
        for task in tasks
        for clip in clips
    ]
    study = Study(list(tasks), list(clips), seed_list, results, summaries)
    if out is not None:
        from gradclip.experiments.report import write_report

        study.out = Path(out)
        study.out.mkdir(parents=True, exist_ok=True)
        study.files["results"] = write_results(study.results, study.out / "results.csv")
        study.files["timings"] = write_results(
            study.results, study.out / "timings.csv", TIMING_COLUMNS
        )
        study.files["summary"] = write_summary(study.summaries, study.out / "summary.csv")
        study.files.update(write_report(study, command=command))
    return study


def summarize(runs: Sequence[RunResult]) -> Summary:
    """Aggregate the runs of one task and strategy over seeds."""
    finished = [r for r in runs if not r.diverged and r.rows]
    finals = [_final_loss(r) for r in finished]
    bests = [min(row["loss"] for row in r.rows) for r in finished]
    rows = [row for r in runs for row in r.rows]
    divergences = [r.diverged_at for r in runs if r.diverged_at is not None]
    metric_names = sorted({k for r in finished for k in r.metrics})
    return Summary(
        task=runs[0].task,
        clip=runs[0].clip,
        runs=len(runs),
        diverged=len(divergences),
        first_divergence_step=min(divergences) if divergences else None,
        final_loss=statistics.median(finals) if finals else math.nan,
        final_loss_spread=(max(finals) - min(finals)) if finals else math.nan,
        best_loss=statistics.median(bests) if bests else math.nan,
        loss_std=statistics.median(_late_std(r) for r in finished) if finished else math.nan,
        loss_spikes=statistics.fmean(sum(row["loss_spike"] for row in r.rows) for r in runs),
        clip_rate=statistics.fmean(row["clipped"] for row in rows) if rows else math.nan,
        step_ms=statistics.median(row["time_ms"] for row in rows) if rows else math.nan,
        wall_time_s=statistics.fmean(r.wall_time for r in runs),
        metrics={
            m: statistics.fmean(r.metrics[m] for r in finished if m in r.metrics)
            for m in metric_names
        },
        final_losses=finals,
    )


def _late_std(result: RunResult) -> float:
    late = [row["loss"] for row in result.rows[len(result.rows) // 2 :]]
    return statistics.pstdev(late) if len(late) > 1 else 0.0


def _final_loss(result: RunResult) -> float:
    tail = result.rows[-max(1, len(result.rows) // 10) :]
    return statistics.fmean(row["loss"] for row in tail)


def write_results(
    results: Sequence[RunResult], path: Path, columns: Sequence[str] = RESULT_COLUMNS
) -> Path:
    """Write every step of every run to ``path`` (CSV with ``columns``)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore"
        )
        writer.writeheader()
        for result in results:
            for row in result.rows:
                writer.writerow({k: _fmt(v) for k, v in row.items()})
    return path


def write_summary(summaries: Sequence[Summary], path: Path) -> Path:
    """Write the summaries to ``path`` (CSV, :data:`SUMMARY_COLUMNS` then metrics)."""
    metric_names = sorted({m for s in summaries for m in s.metrics})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=[*SUMMARY_COLUMNS, *metric_names], lineterminator="\n", restval=""
        )
        writer.writeheader()
        for summary in summaries:
            writer.writerow({k: _fmt(v) for k, v in summary.row().items()})
    return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return "" if value is None else value
