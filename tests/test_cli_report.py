"""``gradclip report`` and ``gradclip suggest`` on monitor logs; errors are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradclip.cli import main
from gradclip.clippers.fixed import NormClip
from gradclip.monitor import GradMonitor
from gradclip.writers import CSVWriter, JSONLWriter


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short monitored run with one spike, logged as CSV and JSONL."""
    out = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    clipper = NormClip(net.parameters(), max_norm=1.0)
    paths = {"csv": out / "run.csv", "jsonl": out / "run.jsonl"}
    with GradMonitor(net, log_every=16, writers=[CSVWriter(paths["csv"]),
                                                 JSONLWriter(paths["jsonl"])]) as monitor:  # fmt: skip
        for step in range(1, 81):
            x = torch.randn(16, 4) * (30.0 if step == 70 else 1.0)
            loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
            loss.backward()
            monitor.observe(clipper.clip_(), loss=loss)
            net.zero_grad()
    return paths


def png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_report_writes_plots_and_prints_a_summary(
    logs: dict[str, Path], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["report", str(logs[kind]), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "steps: 80" in out and "clipped:" in out and "total norm: min" in out
    assert "step 70: total_norm" in out
    for name in ("norms.png", "layers.png", "histogram.png"):
        assert png(tmp_path / "r" / name)


def test_report_default_out_dir(logs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    log = tmp_path / "a.csv"
    log.write_bytes(logs["csv"].read_bytes())
    assert main(["report", str(log)]) == 0
    assert png(tmp_path / "a_report" / "norms.png")


def test_suggest_prints_candidates_and_draws_them(
    logs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "t.png"
    args = ["suggest", str(logs["jsonl"]), "--out", str(out_png), "--percentiles", "10", "90",
            "--fractions", "0.1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "candidate thresholds from 80 steps" in out
    assert out.count("autoclip (") == 2 and "pascanu (1)" in out and "clip_fraction (0.1)" in out
    assert png(out_png)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "{missing}"], "no such file"),
        (["report", "{garbage}"], "no 'step' column"),
        (["suggest", "{garbage}"], "no 'step' column"),
        (["report", "{dir}"], "is a directory"),
        (["suggest", "{csv}", "--fractions", "2"], "clip_fractions must be in (0, 1); got 2.0"),
        (["suggest", "{csv}", "--percentiles", "x"], "invalid float value: 'x'"),
        (["report"], "the following arguments are required: logfile"),
    ],
)
def test_errors_exit_2_without_traceback(
    logs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("hello world\n")
    values = {"missing": tmp_path / "nope.csv", "garbage": garbage, "dir": tmp_path,
              "csv": logs["csv"]}  # fmt: skip
    try:
        code = main([a.format(**values) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    if "{" in "".join(args[1:2]) and "invalid" not in message:  # our errors: exactly one line
        assert err.count("\n") == 1
        assert err.startswith(f"gradclip {args[0]}: error: ")


def test_bad_file_in_a_real_process_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "total_norm": 1.0}\n{oops\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "report", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"gradclip report: error: {bad}:2: not JSON (Expecting property name enclosed in double quotes)\n"
    )


def test_missing_matplotlib_is_a_one_line_error(
    logs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", str(logs["csv"]), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "gradclip report: error: gradclip's plots need matplotlib: pip install 'gradclip[plot]'"
    )


def test_demo_still_parses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "--seeds" in capsys.readouterr().out
