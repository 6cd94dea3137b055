"""The runner: rows, divergence recorded without a crash, determinism."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gradclip.experiments.compare import summarize
from gradclip.experiments.runner import RESULT_COLUMNS, run
from gradclip.experiments.tasks import TASKS, Task, TaskOptions, Trainable


def test_unstable_lstm_diverges_unclipped_and_is_recorded() -> None:
    result = run("lstm-sine-unstable", "none", 0, TaskOptions(max_steps=60), check_every=10)
    assert result.diverged and result.diverged_at is not None and result.diverged_at < 60
    assert [r["step"] for r in result.rows] == list(range(1, result.diverged_at + 1))
    assert not math.isfinite(result.rows[-1]["loss"])
    assert all(math.isfinite(r["loss"]) for r in result.rows[:-1])
    assert result.metrics == {}


def test_clipping_keeps_the_same_run_finite() -> None:
    result = run("lstm-sine-unstable", "norm:1.0", 0, TaskOptions(max_steps=60), check_every=10)
    assert not result.diverged and len(result.rows) == 60
    assert all(r["clipped_norm"] <= 1.0 + 1e-5 for r in result.rows)
    assert sum(r["clipped"] for r in result.rows) > 30
    assert set(result.rows[0]) == {*RESULT_COLUMNS, "time_ms"}
    assert math.isfinite(result.metrics["val_mse"])


def test_rows_record_what_the_clipper_did() -> None:
    result = run("digits-mlp", "norm:0.5", 1, TaskOptions(max_steps=12), check_every=5)
    for row in result.rows:
        assert row["threshold"] == pytest.approx(0.5)
        assert row["clipped"] == int(row["total_norm"] > 0.5)
        assert row["clipped_norm"] == pytest.approx(min(row["total_norm"], 0.5), rel=1e-5)
    assert [row["epoch"] for row in result.rows] == [1] * 12


def test_same_seed_same_rows() -> None:
    def strip(rows):  # type: ignore[no-untyped-def]
        return [{k: v for k, v in r.items() if k != "time_ms"} for r in rows]

    a = run("regression", "zclip:z=2.5", 7, TaskOptions(max_steps=40))
    b = run("regression", "zclip:z=2.5", 7, TaskOptions(max_steps=40))
    c = run("regression", "zclip:z=2.5", 8, TaskOptions(max_steps=40))
    assert strip(a.rows) == strip(b.rows)
    assert strip(a.rows) != strip(c.rows)


def test_bad_spec_fails_before_training() -> None:
    with pytest.raises(ValueError, match="unknown clipping strategy 'nrom'"):
        run("regression", "nrom:1.0")


def _regression_task(spike_at: int | None) -> Task:
    """Linear regression on fixed batches of 256: a loss that falls for ~30 steps, then
    flattens into minibatch noise; ``spike_at`` multiplies that step's loss value by 10
    (its gradient unchanged)."""

    def build(options: TaskOptions, seed: int) -> Trainable:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(4096, 8, generator=generator)
        y = x @ torch.randn(8, generator=generator) + 0.3 * torch.randn(4096, generator=generator)
        torch.manual_seed(seed)
        model = torch.nn.Linear(8, 1)

        def loss(step: int) -> torch.Tensor:
            batch = slice(step * 256 % 4096, step * 256 % 4096 + 256)
            value = torch.nn.functional.mse_loss(model(x[batch]).squeeze(-1), y[batch])
            return value + 9 * value.detach() if step + 1 == spike_at else value

        return Trainable(model, torch.optim.SGD(model.parameters(), lr=0.05), 120, 16, loss, dict)

    return Task("spiky" if spike_at else "smooth", "", build)


def test_an_injected_loss_spike_is_found_on_a_short_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """At step 60 the loss is 10x its neighbours; the monitor's default window (100 steps,
    spanning the descent) would miss it, the study's short one must not."""
    monkeypatch.setitem(TASKS, "smooth", _regression_task(None))
    monkeypatch.setitem(TASKS, "spiky", _regression_task(60))
    smooth = run("smooth", "none", 0, check_every=10)
    spiky = run("spiky", "none", 0, check_every=10)
    before = [r["loss"] for r in smooth.rows]
    after = [r["loss"] for r in spiky.rows]
    assert after[59] == pytest.approx(10 * before[59], rel=1e-5)  # the injection, and only it
    assert after[:59] == before[:59] and after[60:] == pytest.approx(before[60:], rel=1e-5)
    assert before[0] > 50 * statistics.median(before[40:60])  # a short run's fast descent
    assert [r["step"] for r in spiky.rows if r["loss_spike"]] == [60]
    assert sum(r["loss_spike"] for r in smooth.rows) == 0
    assert summarize([spiky]).loss_spikes == 1 and summarize([smooth]).loss_spikes == 0


def test_options_that_leave_no_step_are_an_error_not_an_empty_run() -> None:
    with pytest.raises(ValueError, match="batch size 100000 is larger than the 1438 training"):
        run("digits-mlp", "none", 0, TaskOptions(batch_size=100_000))
