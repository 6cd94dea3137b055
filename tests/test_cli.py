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
        (
            ["compare", "--task", "regression", "--clip", "norm:abc"],
            "--clip 'norm:abc': max_norm must be a real number; got 'abc'",
        ),
        (["demo", "--threads", "0"], "--threads must be >= 1; got 0"),
        (["sweep", "--threads", "-1"], "--threads must be >= 1; got -1"),
        (["demo", "--device", "meta"], "--device 'meta' is not usable here"),
        (
            ["compare", "--task", "regression", "--clip", "none", "--clip", "none"],
            "--clip 'none' is given twice",
        ),
        (
            ["compare", "--task", "regression", "--clip", "norm:1", "--clip", "norm:1.0"],
            "--clip 'norm:1.0' is given twice (as 'norm:1' and 'norm:1.0')",
        ),
        (
            ["compare", "--task", "lstm-sine", "--clip", "none", "--text", __file__],
            "--text is read only by char-rnn, and no --task here is one (tasks: lstm-sine)",
        ),
        (
            [
                "compare",
                "--task",
                "regression",
                "--clip",
                "none",
                "--data",
                str(Path(__file__).parent),
            ],
            "--data is read only by digits-mlp",
        ),
        (
            ["compare", "--task", "digits-mlp", "--clip", "none", "--batch-size", "100000"],
            "task digits-mlp: batch size 100000 is larger than the 1438 training examples",
        ),
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
    assert "diverged" not in proc.stderr and proc.stdout == ""  # nothing ran


def test_a_run_of_zero_steps_never_reports_a_divergence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compare", "--task", "regression", "--clip", "none", "--batch-size", "3000",
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "no step" in captured.err and "diverged" not in captured.out + captured.err
    assert not (tmp_path / "report.html").exists()


def test_demo_table_says_which_runs_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compare", "--task", "lstm-sine-unstable", "--clip", "none", "--clip", "norm:0.05",
            "--clip", "norm:1.0", "--max-steps", "40", "--seeds", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    assert lines[head].split()[1:4] == ["diverged", "trained", "step"]
    table = {line.split()[0]: line.split() for line in lines[head + 1 : head + 4]}
    assert table["no"][2:5] == ["1/1", "0/1", "0.503"]  # "no clipping": diverged, trained, step 1
    assert table["norm:0.05"][1:3] == ["0/1", "1/1"]
    assert table["norm:1.0"][1:3] == ["0/1", "0/1"]
    assert "Clipping rescued training: without it 0 of 1 runs trained, with norm:0.05" in out
    assert "norm:1.0 did not train in 1 of 1 runs" in out
