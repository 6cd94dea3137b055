"""The command line: the interim demo and its argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradclip.cli import main
from gradclip.experiments.lstm_sine import CLASSIC, UNSTABLE, train


def test_unstable_setting_diverges_without_clipping_and_not_with_it() -> None:
    from dataclasses import replace

    setting = replace(UNSTABLE, epochs=3)
    unclipped = train(setting, None, seed=0)
    clipped = train(setting, 1.0, seed=0)
    assert unclipped.diverged_at_step is not None
    assert clipped.diverged_at_step is None
    assert all(e.clip_rate > 0 for e in clipped.epochs)


def test_classic_setting_learns_either_way() -> None:
    from dataclasses import replace

    setting = replace(CLASSIC, epochs=3)
    for clip in (None, 1.0):
        result = train(setting, clip, seed=0)
        assert result.diverged_at_step is None
        assert result.epochs[-1].loss < result.epochs[0].loss / 2


def test_same_seed_same_numbers() -> None:
    from dataclasses import replace

    setting = replace(CLASSIC, epochs=1, steps_per_epoch=3)
    assert train(setting, 1.0, seed=3).epochs == train(setting, 1.0, seed=3).epochs


def test_demo_prints_both_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "classic" in out and "unstable" in out and "summary" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--max-norm", "-1"], "--max-norm must be a finite number > 0; got -1.0"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
