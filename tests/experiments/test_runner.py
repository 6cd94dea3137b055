"""The runner: rows, divergence recorded without a crash, determinism."""

from __future__ import annotations

import math

import pytest

from gradclip.experiments.runner import RESULT_COLUMNS, run
from gradclip.experiments.tasks import TaskOptions


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
