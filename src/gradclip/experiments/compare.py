"""A clipping study: tasks × strategies × seeds, summarised, plotted and reported.

:func:`compare` runs every combination, writes ``results.csv`` (one row per step per
run, columns :data:`~gradclip.experiments.runner.RESULT_COLUMNS`), ``timings.csv``
(each step's wall time), ``summary.csv``
(one row per task and strategy, columns :data:`SUMMARY_COLUMNS`), the PNG plots and
``report.html``, and returns the :class:`Study`.

Example:
    >>> from gradclip.experiments.tasks import TaskOptions
    >>> study = compare(["regression"], ["none", "norm:0.5"], options=TaskOptions(max_steps=30))
    >>> [(s.clip, s.runs, s.diverged, s.trained) for s in study.summaries]
    [('none', 1, 0, 1), ('norm:0.5', 1, 0, 1)]
    >>> study.summaries[1].clip_rate > 0.5  # a tight threshold clips most steps
    True
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradclip.experiments.runner import RESULT_COLUMNS, TIMING_COLUMNS, RunResult, run
from gradclip.experiments.tasks import TASKS, TaskOptions, get_task
from gradclip.spec import from_spec, parse_spec

SUMMARY_COLUMNS = (
    "task",
    "clip",
    "runs",
    "diverged",
    "first_divergence_step",
    "initial_loss",
    "final_loss",
    "final_loss_spread",
    "constant_loss",
    "trained",
    "blew_up",
    "best_loss",
    "loss_std",
    "loss_spikes",
    "clip_rate",
    "step_ms",
    "wall_time_s",
)
"""The columns of ``summary.csv``, before the task's own metrics (e.g. ``accuracy``).

``initial_loss`` is the median over the runs of the loss of step 1 (before any
update); ``final_loss`` is the median over the runs that did not diverge of each
run's mean loss over its last tenth of steps; ``final_loss_spread`` is the range
(max − min) of those values over seeds; ``constant_loss`` the task's loss of the best
constant prediction (see :class:`~gradclip.experiments.tasks.Trainable`; NaN where
it has none); ``trained`` counts the runs that did not diverge and ended below both
their step-1 loss and the constant prediction; ``blew_up`` the runs that stayed
finite but ended at :data:`BLEW_UP` times their step-1 loss or more;
``best_loss`` the median of each run's lowest loss;
``loss_std`` the median over those runs of the standard deviation of the loss over
the second half of training (how much it still jumps around);
``loss_spikes`` the mean count of loss spikes per run; ``clip_rate`` the fraction of
steps clipped; ``step_ms`` the median wall time of a step; ``wall_time_s`` the mean
wall time of a run. Metrics are means over the runs that did not diverge.
"""

BLEW_UP = 10.0
"""A finite run whose final loss is this many times its step-1 loss (or more) blew up."""


@dataclass
class Summary:
    """One task's and strategy's aggregate over seeds (see :data:`SUMMARY_COLUMNS`)."""

    task: str
    clip: str
    runs: int
    diverged: int
    first_divergence_step: int | None
    initial_loss: float
    final_loss: float
    final_loss_spread: float
    constant_loss: float
    trained: int
    blew_up: int
    best_loss: float
    loss_std: float
    loss_spikes: float
    clip_rate: float
    step_ms: float
    wall_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    final_losses: list[float] = field(default_factory=list)
    """Each finished run's final loss (not a CSV column; the conclusion compares them)."""
    initial_losses: list[float] = field(default_factory=list)
    """The step-1 loss of the same runs, in the same order (not a CSV column)."""

    @property
    def finished(self) -> int:
        """Runs that did not diverge."""
        return self.runs - self.diverged

    @property
    def not_trained(self) -> int:
        """Finished runs whose final loss is not below their step-1 loss."""
        return sum(f >= i for f, i in zip(self.final_losses, self.initial_losses))

    def row(self) -> dict[str, Any]:
        """The summary as a flat dict: the fixed columns, then the metrics."""
        fixed = {name: getattr(self, name) for name in SUMMARY_COLUMNS}
        return {**fixed, **self.metrics}


@dataclass
class Study:
    """Everything one :func:`compare` call produced.

    Attributes:
        tasks, clips, seeds: what was compared (``clips``: every strategy, in order
            of first use).
        results: every run.
        summaries: per task and strategy, in the order of the task's strategies.
        out: the output directory (None if nothing was written).
        files: the files written, by role.
        task_clips: each task's strategies (all of ``clips`` unless :func:`compare`
            got a mapping).
    """

    tasks: list[str]
    clips: list[str]
    seeds: list[int]
    results: list[RunResult]
    summaries: list[Summary]
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    task_clips: dict[str, list[str]] = field(default_factory=dict)

    def clips_of(self, task: str) -> list[str]:
        """The strategies run on ``task``."""
        return self.task_clips.get(task, self.clips)

    def for_task(self, task: str) -> tuple[list[RunResult], list[Summary]]:
        """The runs and summaries of one task."""
        return (
            [r for r in self.results if r.task == task],
            [s for s in self.summaries if s.task == task],
        )


ClipsArg = Sequence[str] | Mapping[str, Sequence[str]]
"""Strategy specs for every task, or per task (a mapping from each task to its specs)."""


def validate(
    tasks: Sequence[str], clips: ClipsArg, seeds: int, options: TaskOptions | None = None
) -> None:
    """Check a study's arguments before any training.

    With ``options``, each task is also built once (data loaded, model made, no
    step taken), so that options it cannot use fail here rather than after the
    tasks before it trained.

    Raises:
        ValueError: an unknown task or strategy, a malformed spec or a bad option
            value in one, the same spec twice for a task, seeds < 1; with
            ``options``, a file option no task reads, unusable data, or options
            that leave a task no step to take.
    """
    from gradclip.clippers.base import registry

    if not tasks:
        raise ValueError("at least one --task is needed")
    for task in tasks:
        get_task(task)
    per_task = _per_task(tasks, clips)
    known = registry()
    probe = [torch.nn.Parameter(torch.zeros(2, 2))]
    for specs in per_task.values():
        if not specs:
            raise ValueError("at least one --clip is needed (e.g. --clip none --clip norm:1.0)")
        seen: list[tuple[tuple[str, dict[str, Any]], str]] = []
        for clip in specs:
            parsed = parse_spec(clip)
            if parsed[0] not in known:
                raise ValueError(
                    f"unknown clipping strategy {parsed[0]!r} in --clip {clip!r}; valid: "
                    f"{', '.join(sorted(known))}"
                )
            earlier = next((c for p, c in seen if p == parsed), None)
            if earlier is not None:
                spelled = "" if earlier == clip else f" (as {earlier!r} and {clip!r})"
                raise ValueError(f"--clip {clip!r} is given twice{spelled}")
            seen.append((parsed, clip))
            try:
                from_spec(clip, probe)  # options are checked at construction
            except TypeError as error:  # a value of the wrong type, e.g. norm:abc
                raise ValueError(f"--clip {clip!r}: {error}") from None
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be >= 1; got {seeds}")
    if options is not None:
        _check_options(tasks, options)


def _per_task(tasks: Sequence[str], clips: ClipsArg) -> dict[str, list[str]]:
    if isinstance(clips, str):
        raise ValueError(f"clips must be a list of specs, not the string {clips!r}")
    if isinstance(clips, Mapping):
        if set(clips) != set(tasks):
            raise ValueError(
                f"clips per task must name exactly the tasks {sorted(tasks)}; got {sorted(clips)}"
            )
        return {task: list(clips[task]) for task in tasks}
    return {task: list(clips) for task in tasks}


def _check_options(tasks: Sequence[str], options: TaskOptions) -> None:
    for flag in ("data", "text"):
        if getattr(options, flag) is None:
            continue
        readers = sorted(name for name, task in TASKS.items() if flag in task.inputs)
        if not any(flag in get_task(task).inputs for task in tasks):
            raise ValueError(
                f"--{flag} is read only by {', '.join(readers)}, and no --task here is one "
                f"(tasks: {', '.join(tasks)})"
            )
    for task in tasks:
        try:
            trainable = get_task(task).build(options, 0)
        except ValueError as error:
            raise ValueError(f"task {task}: {error}") from None
        if trainable.steps < 1:
            raise ValueError(f"task {task}: these options leave no step to take")


def compare(
    tasks: Sequence[str],
    clips: ClipsArg,
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
        clips: strategy specs for every task, or a mapping from each task to its
            own; include ``"none"`` for the unclipped baseline.
        seeds: how many seeds per combination, starting at ``seed``.
        seed: the first seed.
        options: task options shared by every run.
        out: a directory for results.csv, summary.csv, plots and report.html.
        on_run: called before each run with (task, clip, seed); may return a
            per-step progress callback.
        command: the command line, recorded in the report.

    Returns:
        The study.

    Raises:
        ValueError: bad arguments (see :func:`validate`), before any training.
    """
    validate(tasks, clips, seeds)
    per_task = _per_task(tasks, clips)
    options = options or TaskOptions()
    seed_list = list(range(seed, seed + seeds))
    results: list[RunResult] = []
    for task in tasks:
        for clip in per_task[task]:
            for s in seed_list:
                progress = on_run(task, clip, s) if on_run else None
                results.append(run(task, clip, s, options, on_step=progress))
    summaries = [
        summarize([r for r in results if r.task == task and r.clip == clip])
        for task in tasks
        for clip in per_task[task]
    ]
    every_clip = list(dict.fromkeys(c for task in tasks for c in per_task[task]))
    study = Study(list(tasks), every_clip, seed_list, results, summaries, task_clips=per_task)
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
    initials = [r.initial_loss for r in finished]
    started = [r.initial_loss for r in runs if r.rows]
    constants = [r.constant_loss for r in runs if r.constant_loss is not None]
    constant = statistics.median(constants) if constants else math.nan
    trained = sum(
        f < i and (math.isnan(constant) or f < constant) for f, i in zip(finals, initials)
    )
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
        initial_loss=statistics.median(started) if started else math.nan,
        final_loss=statistics.median(finals) if finals else math.nan,
        final_loss_spread=(max(finals) - min(finals)) if finals else math.nan,
        constant_loss=constant,
        trained=trained,
        blew_up=sum(f >= BLEW_UP * i for f, i in zip(finals, initials)),
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
        initial_losses=initials,
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
