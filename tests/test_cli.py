"""The command line: demo, compare, sweep; and argument errors as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradclip.cli import main


def test_demo_runs_both_settings_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== lstm-sine ==" in out and "== lstm-sine-unstable ==" in out
    assert f"report: {tmp_path / 'report.html'}" in out
    assert (tmp_path / "report.html").exists() and (tmp_path / "results.csv").exists()


def test_compare_json_is_strict_and_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compare", "--task", "lstm-sine-unstable", "--clip", "none", "--clip", "norm:1.0",
            "--max-steps", "30", "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)  # strict JSON: NaN would not parse back
    summary = {row["clip"]: row for row in payload["summary"]}
    assert summary["none"]["diverged"] == 1 and summary["none"]["final_loss"] is None
    assert summary["norm:1.0"]["diverged"] == 0
    assert Path(payload["files"]["report"]).exists()


def test_sweep_writes_heatmap_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "sweep",
                "--lr",
                "0.01,3",
                "--threshold",
                "0.5",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "6 grid points" not in out and "4 grid points" in out
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--seeds", "0"], "--seeds must be >= 1; got 0"),
        (["demo", "--device", "banana"], "--device 'banana' is not usable here"),
        (["compare", "--task", "nope", "--clip", "none"], "unknown task 'nope'; valid: char-rnn"),
        (
            ["compare", "--task", "regression", "--clip", "nrom:1"],
            "unknown clipping strategy 'nrom'",
        ),
        (
            ["compare", "--task", "regression", "--clip", "norm:-1"],
            "max_norm must be > 0; got -1.0",
        ),
        (
            ["compare", "--task", "digits-mlp", "--clip", "none", "--data", "/no/such"],
            "--data /no/such: no such file",
        ),
        (
            ["compare", "--task", "regression", "--clip", "none", "--lr", "-2"],
            "--lr must be a finite number > 0",
        ),
        (["sweep", "--lr", "1:x:3"], "--lr must be START:STOP:N"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", *args, *(["--out", str(tmp_path)] if args[0] in ("compare", "demo") else [])],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # usage line + the error
