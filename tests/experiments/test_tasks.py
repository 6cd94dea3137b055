"""Every registered task trains on its default data and on small custom inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradclip.experiments import data
from gradclip.experiments.models import CharRNN, TanhRNNCell
from gradclip.experiments.runner import run
from gradclip.experiments.tasks import TASKS, TaskOptions, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_trains_a_few_steps_on_its_defaults(name: str) -> None:
    trainable = get_task(name).build(TaskOptions(max_steps=4), 0)
    assert trainable.steps == 4
    before = [p.detach().clone() for p in trainable.model.parameters()]
    for step in range(trainable.steps):
        loss = trainable.loss(step)
        assert loss.ndim == 0 and math.isfinite(loss.item())
        trainable.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.model.parameters(), 1.0)
        trainable.optimizer.step()
    after = list(trainable.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    metrics = trainable.evaluate()
    assert metrics and all(math.isfinite(v) for v in metrics.values())


def test_digits_mlp_on_a_custom_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (200, 12, 12), dtype=np.uint8),
        y_train=rng.integers(0, 3, 200),
    )
    trainable = get_task("digits-mlp").build(
        TaskOptions(data=str(path), max_steps=3, batch_size=16), 0
    )
    assert trainable.model.net[0].in_features == 144  # type: ignore[index]
    assert trainable.model.net[-1].out_features == 3  # type: ignore[index]
    trainable.loss(0).backward()
    assert 0.0 <= trainable.evaluate()["accuracy"] <= 1.0


def test_digits_mlp_bad_data_is_a_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, nothing=np.zeros(2))
    with pytest.raises(data.DataError, match="expected arrays"):
        get_task("digits-mlp").build(TaskOptions(data=str(bad)), 0)


def test_char_rnn_on_a_custom_text_and_its_sample(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    trainable = get_task("char-rnn").build(
        TaskOptions(text=str(path), max_steps=3, batch_size=4), 0
    )
    for step in range(3):
        loss = trainable.loss(step)
        trainable.optimizer.zero_grad()
        loss.backward()
        trainable.optimizer.step()
    assert trainable.sample is not None
    sample = trainable.sample()
    assert sample.startswith("The ") and len(sample) == 4 + 120
    assert set(sample) <= set("The quick brown fox jumps over the lazy dog. ")


def test_char_rnn_is_from_scratch() -> None:
    model = CharRNN(10)
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU, torch.nn.RNNCell}
    cell = TanhRNNCell(3, 4)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    expected = torch.tanh(x @ cell.w_xh.T + h @ cell.w_hh.T + cell.bias)
    torch.testing.assert_close(cell(x, h), expected)


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'lstm'; valid: char-rnn, digits-mlp"):
        get_task("lstm")


def test_char_rnn_samples_from_a_text_without_the_default_prompt(tmp_path: Path) -> None:
    """A lowercase text has no "T": the prompt comes from the corpus, not a KeyError."""
    path = tmp_path / "lower.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 200
    path.write_text(text, encoding="utf-8")
    result = run("char-rnn", "none", 0, TaskOptions(text=str(path), max_steps=3, batch_size=4))
    assert not result.diverged and len(result.rows) == 3
    assert result.sample is not None
    assert result.sample.startswith("the ") and len(result.sample) == 4 + 120
    assert set(result.sample) <= set(text)


@pytest.mark.parametrize(
    ("name", "constant"),
    [
        ("lstm-sine", (0.5 + 0.01, 0.05)),  # sin² averages 1/2, plus the noise's 0.1²
        ("digits-mlp", (math.log(10), 0.01)),  # ten balanced classes: ln 10 nats
        ("regression", None),
    ],
)
def test_constant_prediction_loss(name: str, constant: tuple[float, float] | None) -> None:
    trainable = get_task(name).build(TaskOptions(max_steps=1), 0)
    assert trainable.constant_loss is not None
    if constant is not None:
        assert trainable.constant_loss == pytest.approx(constant[0], abs=constant[1])
    else:  # heavy-tailed targets: their variance, far above the clean signal's (20 features)
        assert trainable.constant_loss > 20


def test_char_rnn_constant_is_the_unigram_entropy(tmp_path: Path) -> None:
    path = tmp_path / "ab.txt"
    path.write_text("ab" * 1000, encoding="utf-8")  # two characters, equally frequent
    trainable = get_task("char-rnn").build(TaskOptions(text=str(path), batch_size=4), 0)
    # the targets (every character but the first of each stream) are nearly balanced
    assert trainable.constant_loss == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize(
    ("name", "batch_size", "examples"), [("digits-mlp", 100_000, 1438), ("regression", 4096, 2048)]
)
def test_a_batch_larger_than_the_data_is_an_error(
    name: str, batch_size: int, examples: int
) -> None:
    with pytest.raises(
        ValueError,
        match=f"batch size {batch_size} is larger than the {examples} training examples, so a "
        "run would take no step",
    ):
        get_task(name).build(TaskOptions(batch_size=batch_size), 0)


def test_file_options_are_declared_by_the_tasks_that_read_them() -> None:
    assert {name: task.inputs for name, task in TASKS.items() if task.inputs} == {
        "digits-mlp": ("data",),
        "char-rnn": ("text",),
    }
