"""Run one training: a task, a clipping strategy (spec string) and a seed.

The runner measures with :class:`gradclip.GradMonitor`: each step's loss and
clipping stats stay on the device and reach the host every ``check_every`` steps in
one transfer. A non-finite loss marks the run as diverged at its first such step; the
run stops at that check, and the steps after the divergence are dropped. A diverged
run is a result, never an exception.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradclip.experiments.tasks import TaskOptions, get_task
from gradclip.monitor import GradMonitor
from gradclip.spec import from_spec

RESULT_COLUMNS = (
    "task",
    "clip",
    "seed",
    "step",
    "epoch",
    "loss",
    "total_norm",
    "clipped_norm",
    "threshold",
    "clipped",
    "loss_spike",
)
"""The columns of ``results.csv``: one row per step per run.

``total_norm`` is the global gradient norm before clipping and ``clipped_norm`` after;
``threshold`` is what the strategy clipped to (``inf`` when it did not clip);
``clipped`` is 1 when the gradient was scaled down; ``loss_spike`` is 1 where the
monitor's robust spike detector flagged the loss (with :data:`SPIKE_WINDOW` and
:data:`SPIKE_THRESHOLD`). Same seed, same file, byte for byte.
"""

SPIKE_WINDOW = 16
"""Steps in the spike detectors' rolling window (the monitor's ``spike_window``).

The study's runs are short (150 to a few hundred steps) and their loss falls fast at
first. The monitor's default window, 100 steps, then spans most of the descent, whose
spread hides any spike short of several hundred times the loss. Sixteen steps follow
the descent (a loss that alternates between two levels step by step, as large-step
SGD's does, is not scored as spiking: see :func:`gradclip.spikes.robust_score`). A
loss is scored from step 17 on.
"""

SPIKE_THRESHOLD = 6.0
"""Robust z-score above which a loss (or total norm) is a spike (``spike_threshold``)."""

TIMING_COLUMNS = ("task", "clip", "seed", "step", "time_ms")
"""The columns of ``timings.csv``: each step's wall time (forward, backward, clipping and
optimizer step), kept apart from ``results.csv`` because it differs from run to run."""


@dataclass
class RunResult:
    """One run's per-step rows and outcome.

    Attributes:
        task, clip, seed: what was run.
        rows: per-step dicts with :data:`RESULT_COLUMNS` and ``time_ms``.
        diverged_at: the first step with a non-finite loss, or None.
        wall_time: seconds for the whole run.
        metrics: the task's held-out evaluation after training (empty if diverged).
        sample: generated text, for generative tasks that did not diverge.
        settings: the task's hyperparameters.
        constant_loss: the task's loss of the best constant prediction, if it has one.
    """

    task: str
    clip: str
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    diverged_at: int | None = None
    wall_time: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    sample: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    constant_loss: float | None = None

    @property
    def diverged(self) -> bool:
        """Whether the loss became NaN or infinite."""
        return self.diverged_at is not None

    @property
    def initial_loss(self) -> float:
        """The loss of step 1, before any update (NaN for a run without steps)."""
        return float(self.rows[0]["loss"]) if self.rows else math.nan


def run(
    task: str,
    clip: str,
    seed: int = 0,
    options: TaskOptions | None = None,
    *,
    check_every: int = 25,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``task`` with the clipping strategy ``clip`` from ``seed``.

    Args:
        task: a registered task name (:data:`gradclip.experiments.tasks.TASKS`).
        clip: a strategy spec, e.g. ``"none"``, ``"norm:1.0"``, ``"zclip:z=2.5"``.
        seed: the seed of data order, initialisation and noise.
        options: task options (epochs, lr, data files, device).
        check_every: steps between host transfers (and divergence checks).
        on_step: called with the number of steps done, for progress bars.

    Returns:
        The run's rows and outcome.

    Raises:
        ValueError: an unknown task, a bad spec, or options that leave no step to
            take (before any training).
    """
    options = options or TaskOptions()
    trainable = get_task(task).build(options, seed)
    if trainable.steps < 1:
        raise ValueError(f"task {task!r} has no step to take with these options ({options})")
    clipper = from_spec(clip, list(trainable.model.parameters()))
    result = RunResult(
        task, clip, seed, settings=dict(trainable.settings), constant_loss=trainable.constant_loss
    )
    times: list[float] = []
    pending: list[dict[str, Any]] = []
    lr = float(trainable.optimizer.param_groups[0]["lr"])
    monitor = GradMonitor(
        trainable.model,
        log_every=check_every,
        per_layer=False,
        writers=[pending.append],
        norm_type=clipper.norm_type,
        spike_window=SPIKE_WINDOW,
        spike_threshold=SPIKE_THRESHOLD,
    )
    start = time.perf_counter()
    with monitor:
        for step in range(trainable.steps):
            began = time.perf_counter()
            loss = trainable.loss(step)
            trainable.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stats = clipper.clip_()
            trainable.optimizer.step()
            monitor.observe(stats, loss=loss.detach(), lr=lr)
            times.append(time.perf_counter() - began)
            if on_step is not None:
                on_step(step + 1)
            if pending and _collect(result, pending, times, trainable.steps_per_epoch):
                break
        monitor.flush()
    _collect(result, pending, times, trainable.steps_per_epoch)
    result.wall_time = time.perf_counter() - start
    if not result.diverged:
        with torch.no_grad():
            result.metrics = trainable.evaluate()
        if trainable.sample is not None:
            result.sample = trainable.sample()
    return result


def _collect(
    result: RunResult, pending: list[dict[str, Any]], times: list[float], per_epoch: int
) -> bool:
    """Move flushed monitor records into ``result.rows``; True once the run diverged."""
    for record in pending:
        if result.diverged:
            break
        step = int(record["step"])
        loss = float(record["loss"])
        result.rows.append(
            {
                "task": result.task,
                "clip": result.clip,
                "seed": result.seed,
                "step": step,
                "epoch": (step - 1) // per_epoch + 1,
                "loss": loss,
                "total_norm": float(record["total_norm"]),
                "clipped_norm": float(record["clipped_norm"]),
                "threshold": float(record["threshold"]),
                "clipped": int(record["clipped"]),
                "loss_spike": int(record["loss_spike"]),
                "time_ms": 1000.0 * times[step - 1],
            }
        )
        if not math.isfinite(loss):
            result.diverged_at = step
    pending.clear()
    return result.diverged
