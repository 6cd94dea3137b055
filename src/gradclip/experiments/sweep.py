"""The learning-rate × clipping-threshold sweep on the regression task, trained vectorized.

Every grid point is one linear model. All of them train at once: their parameters are
stacked along a leading dimension, ``torch.func.vmap`` of ``torch.func.grad`` gives
every model's gradient for the shared batch, each model is clipped by its own global
norm (torch's rule, ``min(1, c / (‖g‖ + 1e-6))``), and SGD steps each with its own
learning rate. The result equals training the grid one run at a time with
:class:`gradclip.NormClip` and ``torch.optim.SGD`` (tested to fp32 tolerance) and is
much faster (``benchmarks/sweep.py``).

Theory: above the threshold the clipped SGD step is ``lr · c · g/‖g‖``, so only the
product ``lr · c`` matters there (Zhang et al. 2020, arXiv:1905.11881): the heatmap
shows that diagonal, and where clipping lets a larger learning rate train.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from gradclip.experiments.tasks import (
    RegressionProblem,
    TaskOptions,
    regression,
    regression_metrics,
    regression_problem,
)
from gradclip.spec import from_spec


@dataclass(frozen=True)
class SweepPoint:
    """One grid point's outcome.

    Attributes:
        lr: learning rate.
        threshold: clipping threshold (``inf``: not clipped).
        final_loss: training MSE over all examples after the last step.
        clean_mse: MSE against the noise-free targets (what the model learned).
        weight_error: ‖w − w_true‖.
        clip_rate: fraction of steps whose gradient was scaled down.
        diverged: the loss or the weights became NaN or infinite.
    """

    lr: float
    threshold: float
    final_loss: float
    clean_mse: float
    weight_error: float
    clip_rate: float
    diverged: bool


def parse_grid(text: str, name: str) -> list[float]:
    """Parse ``"START:STOP:N"`` (N log-spaced values) or a comma list of numbers.

    >>> parse_grid("0.01:1:3", "--lr")
    [0.01, 0.1, 1.0]
    >>> parse_grid("0.5,2", "--threshold")
    [0.5, 2.0]

    Raises:
        ValueError: malformed, non-positive, or fewer than one value; names the option.
    """
    try:
        if ":" in text:
            start_text, stop_text, count_text = text.split(":")
            start, stop, count = float(start_text), float(stop_text), int(count_text)
            if count < 1 or start <= 0 or stop <= 0:
                raise ValueError
            if count == 1:
                return [start]
            ratio = math.log(stop / start) / (count - 1)
            return [float(f"{start * math.exp(ratio * i):.6g}") for i in range(count)]
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(
            f"{name} must be START:STOP:N (N log-spaced values, START and STOP > 0) or a "
            f"comma list of numbers; got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{name} values must be > 0; got {text!r}")
    return values


def grid_points(lrs: list[float], thresholds: list[float]) -> list[tuple[float, float]]:
    """Every (lr, threshold) pair, learning rate major."""
    return [(lr, c) for lr in lrs for c in thresholds]


def split(points: list[tuple[float, float]], rank: int, world: int) -> list[tuple[float, float]]:
    """Rank ``rank``'s share of the grid: every ``world``-th point (balanced load)."""
    return points[rank::world]


@torch.no_grad()
def sweep_vectorized(
    points: list[tuple[float, float]], *, seed: int = 0, options: TaskOptions | None = None
) -> list[SweepPoint]:
    """Train every grid point at once; see the module docstring."""
    options = options or TaskOptions()
    problem = regression_problem(options, seed)
    g = len(points)
    if g == 0:
        return []
    lr = torch.tensor([p[0] for p in points], device=problem.x.device)
    threshold = torch.tensor([p[1] for p in points], device=problem.x.device)
    weight = problem.weight.expand(g, *problem.weight.shape).clone()
    bias = problem.bias.expand(g, *problem.bias.shape).clone()
    clipped_steps = torch.zeros(g, device=problem.x.device)
    gradient = vmap(grad(_loss, argnums=(0, 1)), in_dims=(0, 0, None, None))
    for step in range(problem.steps):
        batch = problem.batch(step)
        with torch.enable_grad():
            g_weight, g_bias = gradient(weight, bias, problem.x[batch], problem.y[batch])
        norm = torch.sqrt(g_weight.pow(2).sum((1, 2)) + g_bias.pow(2).sum(1))
        scale = torch.clamp((norm + 1e-6).reciprocal() * threshold, max=1.0)
        clipped_steps += scale < 1.0
        weight -= lr[:, None, None] * (g_weight * scale[:, None, None])
        bias -= lr[:, None] * (g_bias * scale[:, None])
    return [
        _point(problem, points[i], weight[i, 0], bias[i], float(clipped_steps[i]) / problem.steps)
        for i in range(g)
    ]


def sweep_sequential(
    points: list[tuple[float, float]], *, seed: int = 0, options: TaskOptions | None = None
) -> list[SweepPoint]:
    """The reference: each grid point trained alone with the task, NormClip and torch SGD."""
    options = options or TaskOptions()
    out = []
    for lr, c in points:
        run_options = TaskOptions(**{**options.__dict__, "lr": lr})
        trainable = regression(run_options, seed)
        params = list(trainable.model.parameters())
        clipper = from_spec("none" if math.isinf(c) else f"norm:{c!r}", params)
        clipped = 0
        for step in range(trainable.steps):
            loss = trainable.loss(step)
            trainable.optimizer.zero_grad()
            loss.backward()
            clipped += int(clipper.clip_().clipped)
            trainable.optimizer.step()
        model = trainable.model
        assert isinstance(model, nn.Linear)
        problem = regression_problem(options, seed)
        out.append(
            _point(
                problem,
                (lr, c),
                model.weight.detach()[0],
                model.bias.detach(),
                clipped / trainable.steps,
            )
        )
    return out


def sweep(
    lrs: list[float],
    thresholds: list[float],
    *,
    seed: int = 0,
    options: TaskOptions | None = None,
    include_unclipped: bool = True,
) -> list[SweepPoint]:
    """The grid, vectorized; under ``torchrun`` split across ranks and gathered on rank 0.

    With ``include_unclipped``, an unclipped column (threshold ``inf``) is added as the
    baseline. Under torch.distributed (``WORLD_SIZE`` > 1 in the environment), every
    rank trains its share and rank 0 returns the whole grid in order; other ranks
    return an empty list.
    """
    if include_unclipped and math.inf not in thresholds:
        thresholds = [*thresholds, math.inf]
    points = grid_points(lrs, thresholds)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return sweep_vectorized(points, seed=seed, options=options)
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    rank = int(os.environ.get("RANK", "0")) if owns_group else dist.get_rank()
    # Train before joining the group: the training's first torch.func call imports
    # torch._dynamo, which, once a gloo group exists, keeps references to it that
    # destroy_process_group() does not release; the group then dies at interpreter
    # exit and can abort the process (pytorch/pytorch PR #179291). The group is needed
    # only to gather the shares.
    mine = sweep_vectorized(split(points, rank, world), seed=seed, options=options)
    if owns_group:
        dist.init_process_group("gloo")
    try:
        gathered: list[list[SweepPoint] | None] = [None] * world if rank == 0 else []
        dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
        if owns_group:
            dist.barrier()  # no rank closes the group while a peer still uses it
    finally:
        if owns_group:
            dist.destroy_process_group()
    if rank != 0:
        return []
    by_point = {(p.lr, p.threshold): p for share in gathered if share for p in share}
    return [by_point[point] for point in points]


SWEEP_COLUMNS = (
    "lr", "threshold", "final_loss", "clean_mse", "weight_error", "clip_rate", "diverged",
)  # fmt: skip
"""The columns of ``sweep.csv``, one row per grid point (threshold ``inf``: unclipped)."""


def write_sweep(points: list[SweepPoint], path: Path) -> Path:
    """Write the grid to ``path`` as CSV (:data:`SWEEP_COLUMNS`)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SWEEP_COLUMNS)
        for p in points:
            writer.writerow(
                [
                    repr(getattr(p, c)) if isinstance(getattr(p, c), float) else int(getattr(p, c))
                    for c in SWEEP_COLUMNS
                ]
            )
    return path


def plot_sweep(points: list[SweepPoint], path: Path, *, command: str = "") -> Path:
    """Heatmap of the clean MSE over learning rate (rows) × threshold (columns).

    Diverged cells are marked with a cross; the cell annotations give the clean MSE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    lrs = sorted({p.lr for p in points})
    thresholds = sorted({p.threshold for p in points})
    grid = {(p.lr, p.threshold): p for p in points}
    values = [[math.nan] * len(thresholds) for _ in lrs]
    finite = [p.clean_mse for p in points if not p.diverged and p.clean_mse > 0]
    for i, lr in enumerate(lrs):
        for j, c in enumerate(thresholds):
            point = grid.get((lr, c))
            if point is not None and not point.diverged:
                values[i][j] = point.clean_mse
    fig, ax = plt.subplots(figsize=(1.1 * len(thresholds) + 3, 0.6 * len(lrs) + 2))
    norm = LogNorm(vmin=min(finite), vmax=max(finite)) if finite else None
    image = ax.imshow(values, cmap="viridis_r", norm=norm, aspect="auto", origin="lower")
    for i, lr in enumerate(lrs):
        for j, c in enumerate(thresholds):
            point = grid.get((lr, c))
            if point is None:
                continue
            text = "×" if point.diverged else f"{point.clean_mse:.2g}"
            color = "black"  # diverged cells are blank (white)
            if not point.diverged and norm is not None and point.clean_mse > 0:
                color = _text_color(image.cmap(norm(point.clean_mse)))
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(
        range(len(thresholds)),
        ["none" if math.isinf(c) else f"{c:g}" for c in thresholds],
        rotation=45,
    )
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("clipping threshold")
    ax.set_ylabel("learning rate")
    ax.set_title("final clean MSE (× = diverged)", fontsize=10)
    fig.colorbar(image, ax=ax, label="clean MSE")
    if command:
        fig.text(0.01, 0.01, command, fontsize=6, color="#666")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _text_color(rgba: tuple[float, ...]) -> str:
    """Black on a light cell, white on a dark one (relative luminance, WCAG weights).

    >>> _text_color((0.99, 0.91, 0.14, 1.0)), _text_color((0.27, 0.0, 0.33, 1.0))
    ('black', 'white')
    """

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # the luminance where black and white text have the same contrast ratio
    return "black" if luminance > 0.179 else "white"


def _loss(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> Tensor:
    prediction = (x @ weight.T + bias).squeeze(-1)
    return torch.mean((prediction - y) ** 2)


def _point(
    problem: RegressionProblem,
    point: tuple[float, float],
    weight: Tensor,
    bias: Tensor,
    clip_rate: float,
) -> SweepPoint:
    final_loss = float(_loss(weight[None], bias, problem.x, problem.y))
    metrics = regression_metrics(problem, weight, bias)
    finite = all(math.isfinite(v) for v in (final_loss, *metrics.values()))
    return SweepPoint(
        lr=point[0],
        threshold=point[1],
        final_loss=final_loss,
        clean_mse=metrics["clean_mse"],
        weight_error=metrics["weight_error"],
        clip_rate=clip_rate,
        diverged=not finite,
    )
