"""The tutorial's LSTM predictor on noisy sine waves, with and without clipping.

An LSTM (input 1, hidden 50) with a linear head reads a noisy sine wave of random
phase and frequency and predicts the next value (MSE). Two settings:

* ``classic``: Adam, lr 0.01 — the tutorial's setup. Training is stable with or
  without clipping; clipping changes little.
* ``unstable``: plain SGD at lr 2.0 — without clipping the gradient norm explodes
  and the loss becomes NaN within a few dozen steps; clipping at 1.0 keeps the
  same run finite.

An honest demo shows both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradclip.functional import clip_grad_norm_
from gradclip.norms import get_total_norm


@dataclass(frozen=True)
class SineSetting:
    """A training setting of the LSTM sine task.

    Attributes:
        name: short label.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: learning rate.
        seq_len: sequence length.
        batch_size: sequences per step.
        epochs: passes over the training set.
        steps_per_epoch: batches per epoch.
    """

    name: str
    optimizer: str
    lr: float
    seq_len: int = 100
    batch_size: int = 32
    epochs: int = 10
    steps_per_epoch: int = 15


CLASSIC = SineSetting("classic", "adam", 0.01)
UNSTABLE = SineSetting("unstable", "sgd", 2.0)


class LSTMPredictor(nn.Module):
    """LSTM (input 1, hidden 50) and a linear head: predicts the next value of a series."""

    def __init__(self, hidden_size: int = 50) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, seq, 1)`` inputs to ``(batch, seq, 1)`` next-value predictions."""
        out, _ = self.lstm(x)
        prediction: Tensor = self.head(out)
        return prediction


def noisy_sine(
    n: int, seq_len: int, generator: torch.Generator, noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """``n`` noisy sine sequences of random phase and frequency, split into inputs and targets.

    Returns:
        ``(x, y)`` of shape ``(n, seq_len, 1)`` each; ``y`` is ``x`` shifted by one step.
    """
    t = torch.arange(seq_len + 1, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    freq = 0.05 + 0.15 * torch.rand(n, 1, generator=generator)
    wave = torch.sin(freq * t + phase)
    wave = wave + noise * torch.randn(wave.shape, generator=generator)
    return wave[:, :-1, None], wave[:, 1:, None]


@dataclass
class EpochRecord:
    """Per-epoch means of the training loss and of the pre-clip gradient norm."""

    epoch: int
    loss: float
    grad_norm: float
    clip_rate: float


@dataclass
class RunResult:
    """One training run: its per-epoch records and whether (and when) it diverged."""

    setting: str
    clip: str
    epochs: list[EpochRecord] = field(default_factory=list)
    diverged_at_step: int | None = None


def train(
    setting: SineSetting,
    max_norm: float | None,
    *,
    seed: int = 0,
    on_epoch: Callable[[RunResult], None] | None = None,
) -> RunResult:
    """Train the LSTM predictor in ``setting``, clipping at ``max_norm`` (``None``: never).

    A non-finite loss stops the run and is recorded, never raised.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    n = setting.batch_size * setting.steps_per_epoch
    x, y = noisy_sine(n, setting.seq_len, generator)
    model = LSTMPredictor()
    optimizer: torch.optim.Optimizer
    if setting.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=setting.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
    params = list(model.parameters())
    result = RunResult(setting.name, "none" if max_norm is None else f"norm:{max_norm:g}")
    step = 0
    for epoch in range(1, setting.epochs + 1):
        losses: list[Tensor] = []
        norms: list[Tensor] = []
        clipped: list[Tensor] = []
        order = torch.randperm(n, generator=generator)
        for batch in order.split(setting.batch_size):
            step += 1
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_norm is None:
                total_norm = get_total_norm([p.grad for p in params if p.grad is not None])
                clipped.append(torch.tensor(False))
            else:
                total_norm = clip_grad_norm_(params, max_norm)
                clipped.append(total_norm > max_norm)
            optimizer.step()
            losses.append(loss.detach())
            norms.append(total_norm)
            if not math.isfinite(loss.item()):  # the demo stops a diverged run
                result.diverged_at_step = step
                break
        result.epochs.append(
            EpochRecord(
                epoch,
                torch.stack(losses).mean().item(),
                torch.stack(norms).mean().item(),
                torch.stack(clipped).float().mean().item(),
            )
        )
        if on_epoch is not None:
            on_epoch(result)
        if result.diverged_at_step is not None:
            break
    return result
