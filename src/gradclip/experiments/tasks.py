"""The registered training tasks of the clipping study.

Each task builds a :class:`Trainable` from :class:`TaskOptions` and a seed: a model,
its optimizer, a deterministic batch for every step, the loss, and an evaluation.
The runner (:mod:`gradclip.experiments.runner`) adds clipping and measurement.

| task | what it shows |
| --- | --- |
| ``lstm-sine`` | the tutorial's LSTM on noisy sine waves, Adam lr 0.01: stable either way |
| ``lstm-sine-unstable`` | the same task with SGD at lr 2.0: diverges unless clipped |
| ``digits-mlp`` | a feed-forward classifier: stability, spikes and accuracy |
| ``char-rnn`` | a from-scratch tanh RNN, truncated BPTT at SGD lr 3: thresholds matter |
| ``regression`` | linear regression with heavy-tailed noise: the lr × threshold grid |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from gradclip.experiments import data
from gradclip.experiments.models import MLP, CharRNN, LSTMPredictor


@dataclass(frozen=True)
class TaskOptions:
    """Options common to the tasks; ``None`` means the task's own default.

    Attributes:
        epochs: passes over the training data.
        lr: learning rate.
        batch_size: examples per step.
        max_steps: stop after this many steps (for quick runs and tests).
        data: a data file or directory (``digits-mlp``: MNIST IDX or ``.npz``).
        text: a UTF-8 text file (``char-rnn``).
        device: where to train.
    """

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    data: str | None = None
    text: str | None = None
    device: str = "cpu"


@dataclass
class Trainable:
    """A built task, ready for the runner.

    Attributes:
        model: the model.
        optimizer: its optimizer.
        steps: how many optimizer steps the run takes.
        steps_per_epoch: steps in one pass over the data.
        loss: the training loss of step ``i`` (runs the forward pass).
        evaluate: held-out metrics after training (e.g. ``accuracy``).
        sample: for generative tasks, a text sample from the trained model.
        settings: the task's hyperparameters, for the report.
        constant_loss: the training loss of the best constant prediction (the
            targets' mean for a squared error, the class or character frequencies for
            a cross-entropy): a run whose final loss is not below it learned nothing
            from the inputs. None where a task has no such reference.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    steps_per_epoch: int
    loss: Callable[[int], Tensor]
    evaluate: Callable[[], dict[str, float]]
    sample: Callable[[], str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    constant_loss: float | None = None


@dataclass(frozen=True)
class Task:
    """A registered task: a name, a one-line description, and its builder.

    Attributes:
        inputs: the file options of :class:`TaskOptions` the task reads (``"data"``,
            ``"text"``); the others are rejected for it.
    """

    name: str
    description: str
    build: Callable[[TaskOptions, int], Trainable]
    inputs: tuple[str, ...] = ()


TASKS: dict[str, Task] = {}


def register(
    name: str, description: str, *, inputs: tuple[str, ...] = ()
) -> Callable[[Callable[[TaskOptions, int], Trainable]], Callable[[TaskOptions, int], Trainable]]:
    """Register a task builder under ``name`` (``inputs``: the file options it reads)."""

    def decorate(
        build: Callable[[TaskOptions, int], Trainable],
    ) -> Callable[[TaskOptions, int], Trainable]:
        TASKS[name] = Task(name, description, build, inputs)
        return build

    return decorate


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: no such task; the message lists the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _steps(options: TaskOptions, epochs: int, steps_per_epoch: int) -> int:
    total = (options.epochs or epochs) * steps_per_epoch
    return min(total, options.max_steps) if options.max_steps else total


def _steps_per_epoch(examples: int, batch_size: int) -> int:
    """Full batches in one pass over ``examples``.

    Raises:
        ValueError: not one full batch (a run would take no step).
    """
    if batch_size > examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the {examples} training examples, so "
            f"a run would take no step; use a batch size <= {examples}"
        )
    return examples // batch_size


def _constant_mse(y: Tensor) -> float:
    """The mean squared error of predicting the mean of ``y`` (its variance)."""
    return float((y - y.mean()).pow(2).mean())


def _constant_cross_entropy(labels: Tensor, classes: int) -> float:
    """The cross-entropy (nats) of predicting the label frequencies: their entropy."""
    p = torch.bincount(labels.flatten().cpu(), minlength=classes).double() / labels.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _sine(options: TaskOptions, seed: int, optimizer: str, lr: float) -> Trainable:
    device = torch.device(options.device)
    batch_size = options.batch_size or 32
    steps_per_epoch = 15
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = batch_size * steps_per_epoch
    x, y = data.noisy_sine(n, 100, generator)
    x_val, y_val = data.noisy_sine(256, 100, generator)
    x, y, x_val, y_val = (t.to(device) for t in (x, y, x_val, y_val))
    model = LSTMPredictor().to(device)
    lr = options.lr or lr
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=lr)
    )
    epochs = options.epochs or 10
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)]).to(device)

    def loss(step: int) -> Tensor:
        batch = _batch(order, step, batch_size, n)
        return nn.functional.mse_loss(model(x[batch]), y[batch])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return {"val_mse": float(nn.functional.mse_loss(model(x_val), y_val))}

    return Trainable(
        model,
        opt,
        _steps(options, epochs, steps_per_epoch),
        steps_per_epoch,
        loss,
        evaluate,
        settings={
            "optimizer": optimizer,
            "lr": lr,
            "batch_size": batch_size,
            "seq_len": 100,
            "epochs": epochs,
            "hidden": 50,
        },
        constant_loss=_constant_mse(y),
    )


def _batch(order: Tensor, step: int, batch_size: int, n: int) -> Tensor:
    """Indices of step ``step``'s batch: consecutive slices of a per-epoch permutation."""
    per_epoch = n // batch_size
    epoch, index = divmod(step, per_epoch)
    start = epoch * n + index * batch_size
    return order[start : start + batch_size]


@register("lstm-sine", "LSTM (hidden 50) on noisy sine waves, Adam lr 0.01: the classic setup")
def lstm_sine(options: TaskOptions, seed: int) -> Trainable:
    """The tutorial's setup: Adam at lr 0.01, batch 32, sequence 100, 10 epochs."""
    return _sine(options, seed, "adam", 0.01)


@register("lstm-sine-unstable", "the same LSTM with SGD at lr 2.0: unstable without clipping")
def lstm_sine_unstable(options: TaskOptions, seed: int) -> Trainable:
    """The harder setting: plain SGD at lr 2.0, where unclipped training diverges."""
    return _sine(options, seed, "sgd", 2.0)


@register(
    "digits-mlp",
    "feed-forward classifier on 8x8 digits (or --data MNIST), SGD lr 0.5",
    inputs=("data",),
)
def digits_mlp(options: TaskOptions, seed: int) -> Trainable:
    """An MLP (two hidden layers of 128) on the digits, SGD with momentum at a high lr."""
    device = torch.device(options.device)
    x, y = data.load_images(options.data) if options.data else data.load_digits()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(x), generator=generator)
    n_val = max(1, len(x) // 5)
    val, train = perm[:n_val], perm[n_val:]
    x, y = x.to(device), y.to(device)
    classes = int(y.max()) + 1
    model = MLP(x.shape[1], (128, 128), classes).to(device)
    lr = options.lr or 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batch_size = options.batch_size or 64
    n = len(train)
    steps_per_epoch = _steps_per_epoch(n, batch_size)
    epochs = options.epochs or 15
    order = torch.cat([train[torch.randperm(n, generator=generator)] for _ in range(epochs)])
    order = order.to(device)

    def loss(step: int) -> Tensor:
        batch = _batch(order, step, batch_size, n)
        return nn.functional.cross_entropy(model(x[batch]), y[batch])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits = model(x[val])
        return {
            "val_loss": float(nn.functional.cross_entropy(logits, y[val])),
            "accuracy": float((logits.argmax(1) == y[val]).float().mean()),
        }

    return Trainable(
        model,
        opt,
        _steps(options, epochs, steps_per_epoch),
        steps_per_epoch,
        loss,
        evaluate,
        settings={
            "optimizer": "sgd+momentum 0.9",
            "lr": lr,
            "batch_size": batch_size,
            "epochs": epochs,
            "hidden": "128,128",
            "examples": n,
        },
        constant_loss=_constant_cross_entropy(y[train], classes),
    )


@register(
    "char-rnn",
    "from-scratch tanh RNN on Python's pydoc text (or --text), truncated BPTT",
    inputs=("text",),
)
def char_rnn(options: TaskOptions, seed: int) -> Trainable:
    """A character RNN (hidden 128) trained with truncated BPTT over 50 characters, SGD lr 3.0.

    At lr 3.0 the unclipped loss climbs back up as gradients explode, a loose
    threshold barely helps and a tight one trains; at ``--lr 1`` training is stable
    with or without clipping. Samples start from ``"The "``, or from the corpus' first
    characters when it lacks one of those.
    """
    device = torch.device(options.device)
    text = data.load_text(options.text)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    torch.manual_seed(seed)
    batch_size = options.batch_size or 32
    bptt = 50
    streams = len(ids) // batch_size
    if streams <= bptt + 1:
        raise data.DataError(
            f"text of {len(ids)} characters is too short for batch size {batch_size}: each of "
            f"the {batch_size} streams needs more than {bptt + 1} characters; use a smaller "
            "batch size or a longer text"
        )
    ids = ids[: streams * batch_size].view(batch_size, streams)
    constant = _constant_cross_entropy(ids[:, 1:], len(vocab))
    ids = ids.to(device)
    prompt = "The " if set("The ") <= set(index) else text[:4]
    model = CharRNN(len(vocab)).to(device)
    lr = options.lr or 3.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps_per_epoch = (streams - 1) // bptt
    epochs = options.epochs or 1
    state = {"h": model.initial_state(batch_size, device)}
    held_out = ids[:, -bptt - 1 :]

    def loss(step: int) -> Tensor:
        start = (step % steps_per_epoch) * bptt
        if start == 0:
            state["h"] = model.initial_state(batch_size, device)
        chunk = ids[:, start : start + bptt + 1]
        logits, h = model(chunk[:, :-1], state["h"].detach())
        state["h"] = h
        return nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), chunk[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits, _ = model(held_out[:, :-1], model.initial_state(batch_size, device))
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, len(vocab)), held_out[:, 1:].reshape(-1)
        )
        return {"val_loss": float(nll), "bits_per_char": float(nll) / math.log(2)}

    def sample() -> str:
        start = torch.tensor([index[c] for c in prompt], device=device)
        out = model.sample(start, 120, torch.Generator(device=device).manual_seed(seed))
        return prompt + "".join(vocab[i] for i in out)

    return Trainable(
        model,
        opt,
        _steps(options, epochs, steps_per_epoch),
        steps_per_epoch,
        loss,
        evaluate,
        sample,
        settings={
            "optimizer": "sgd",
            "lr": lr,
            "batch_size": batch_size,
            "bptt": bptt,
            "hidden": 128,
            "epochs": epochs,
            "characters": len(text),
        },
        constant_loss=constant,
    )


@dataclass(frozen=True)
class RegressionProblem:
    """The regression task's data, batch order and initial weights (shared with the sweep).

    Attributes:
        x, y: inputs ``(n, features)`` and noisy targets ``(n,)``.
        w_true: the clean weights.
        order: example indices for every step, epoch after epoch.
        batch_size, steps: the batch size and the number of steps.
        weight, bias: the initial parameters (``nn.Linear``'s default init, seeded).
    """

    x: Tensor
    y: Tensor
    w_true: Tensor
    order: Tensor
    batch_size: int
    steps: int
    steps_per_epoch: int
    weight: Tensor
    bias: Tensor

    def batch(self, step: int) -> Tensor:
        """Indices of step ``step``'s batch."""
        return _batch(self.order, step, self.batch_size, len(self.x))


REGRESSION_FEATURES = 20


def regression_problem(options: TaskOptions, seed: int) -> RegressionProblem:
    """Build the regression task's data and initial weights, deterministically from ``seed``."""
    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(seed)
    x, y, w_true = data.heavy_tailed_regression(2048, REGRESSION_FEATURES, generator)
    batch_size = options.batch_size or 32
    n = len(x)
    epochs = options.epochs or 3
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    steps_per_epoch = _steps_per_epoch(n, batch_size)
    torch.manual_seed(seed)
    init = nn.Linear(REGRESSION_FEATURES, 1)
    return RegressionProblem(
        x=x.to(device),
        y=y.to(device),
        w_true=w_true.to(device),
        order=order.to(device),
        batch_size=batch_size,
        steps=_steps(options, epochs, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        weight=init.weight.detach().to(device),
        bias=init.bias.detach().to(device),
    )


@register("regression", "linear regression with heavy-tailed noise and outliers, SGD")
def regression(options: TaskOptions, seed: int) -> Trainable:
    """Linear regression (20 features) on Student-t noise with 2% outliers; SGD lr 0.1."""
    problem = regression_problem(options, seed)
    model = nn.Linear(REGRESSION_FEATURES, 1).to(problem.x.device)
    with torch.no_grad():
        model.weight.copy_(problem.weight)
        model.bias.copy_(problem.bias)
    lr = options.lr or 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def loss(step: int) -> Tensor:
        batch = problem.batch(step)
        return nn.functional.mse_loss(model(problem.x[batch]).squeeze(-1), problem.y[batch])

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        return regression_metrics(problem, model.weight.squeeze(0), model.bias)

    return Trainable(
        model,
        opt,
        problem.steps,
        problem.steps_per_epoch,
        loss,
        evaluate,
        settings={
            "optimizer": "sgd",
            "lr": lr,
            "batch_size": problem.batch_size,
            "features": REGRESSION_FEATURES,
            "epochs": options.epochs or 3,
        },
        constant_loss=_constant_mse(problem.y),
    )


def regression_metrics(
    problem: RegressionProblem, weight: Tensor, bias: Tensor
) -> dict[str, float]:
    """``weight_error`` = ‖w − w_true‖ and ``clean_mse``, the MSE against noise-free targets."""
    error = weight - problem.w_true
    clean = (problem.x @ error + bias).pow(2).mean()
    return {"weight_error": float(error.norm()), "clean_mse": float(clean)}


def with_options(options: TaskOptions, **changes: Any) -> TaskOptions:
    """A copy of ``options`` with ``changes``."""
    return replace(options, **changes)
