"""The ``gradclip`` command line.

``gradclip demo`` trains the tutorial's LSTM on noisy sine waves in a stable and an
unstable setting, with and without clipping, and prints what clipping changed.

``gradclip report LOG`` turns a monitor's CSV/JSONL log into PNG plots and prints a
summary; ``gradclip suggest LOG`` prints candidate clipping thresholds and draws
them on the norm histogram. A bad argument or an unreadable log is a one-line
error and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from gradclip.experiments.lstm_sine import CLASSIC, UNSTABLE, RunResult, train


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="gradclip", description="Gradient clipping you can trust and measure."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="LSTM on noisy sine waves, with and without clipping")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--max-norm", type=float, default=1.0, help="clipping threshold (default 1.0)"
    )
    demo.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: the setting's, 10)"
    )
    report = commands.add_parser("report", help="plots and a summary of a monitor's log file")
    report.add_argument("logfile", type=Path, help="a CSV or JSONL log written by GradMonitor")
    report.add_argument(
        "--out", type=Path, default=None, help="directory for the PNGs (default: LOGFILE_report)"
    )
    suggest = commands.add_parser("suggest", help="candidate clipping thresholds from a log file")
    suggest.add_argument("logfile", type=Path, help="a CSV or JSONL log written by GradMonitor")
    suggest.add_argument(
        "--out", type=Path, default=None, help="histogram PNG (default: LOGFILE_thresholds.png)"
    )
    suggest.add_argument(
        "--percentiles", type=float, nargs="+", default=[10.0], metavar="P",
        help="AutoClip percentiles, in (0, 100] (default 10)",
    )  # fmt: skip
    suggest.add_argument(
        "--multiples", type=float, nargs="+", default=[1.0], metavar="M",
        help="multiples of the mean norm (Pascanu et al.), > 0 (default 1)",
    )  # fmt: skip
    suggest.add_argument(
        "--fractions", type=float, nargs="+", default=[0.05], metavar="F",
        help="fractions of steps to clip, in (0, 1) (default 0.05)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command in ("report", "suggest"):
        try:
            if args.command == "report":
                return _report(args.logfile, args.out)
            return _suggest(args)
        except (ValueError, OSError, ImportError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"gradclip {args.command}: error: {message}", file=sys.stderr)
            return 2
    if args.command == "demo":
        if not (args.max_norm > 0 and math.isfinite(args.max_norm)):
            parser.error(f"--max-norm must be a finite number > 0; got {args.max_norm}")
        if args.epochs is not None and args.epochs < 1:
            parser.error(f"--epochs must be >= 1; got {args.epochs}")
        return _demo(args.seed, args.max_norm, args.epochs)
    return 2  # pragma: no cover - argparse enforces the choices


def _demo(seed: int, max_norm: float, epochs: int | None) -> int:
    from dataclasses import replace

    results: list[RunResult] = []
    for setting in (CLASSIC, UNSTABLE):
        if epochs is not None:
            setting = replace(setting, epochs=epochs)
        print(
            f"\n== {setting.name}: {setting.optimizer} lr {setting.lr}, "
            f"sequence {setting.seq_len}, batch {setting.batch_size} =="
        )
        print(f"{'clip':>10} {'epoch':>5} {'loss':>12} {'grad norm':>12} {'clipped':>8}")
        for clip in (None, max_norm):
            result = train(setting, clip, seed=seed, on_epoch=_print_epoch)
            results.append(result)
            if result.diverged_at_step is not None:
                print(
                    f"{result.clip:>10} diverged: non-finite loss at step {result.diverged_at_step}"
                )
    print("\n== summary ==")
    for result in results:
        last = result.epochs[-1]
        status = (
            f"diverged at step {result.diverged_at_step}"
            if result.diverged_at_step is not None
            else f"final loss {last.loss:.4f}"
        )
        print(f"{result.setting:>9} {result.clip:>9}: {status}")
    sys.stdout.flush()
    return 0


def _report(logfile: Path, out: Path | None) -> int:
    from gradclip.plots import plot_report
    from gradclip.writers import read_log

    log = read_log(logfile)
    out_dir = out if out is not None else logfile.with_name(logfile.stem + "_report")
    paths = plot_report(log, out_dir)
    print(f"== {logfile} ==")
    print(log.history().summary())
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0


def _suggest(args: argparse.Namespace) -> int:
    from gradclip.plots import plot_histogram
    from gradclip.suggest import suggest_threshold
    from gradclip.writers import read_log

    log = read_log(args.logfile)
    norms = log.values["total_norm"]
    candidates = suggest_threshold(
        norms,
        percentiles=args.percentiles,
        mean_multiples=args.multiples,
        clip_fractions=args.fractions,
    )
    out = args.out or args.logfile.with_name(args.logfile.stem + "_thresholds.png")
    path = plot_histogram(norms, out, candidates=candidates)
    print(f"== candidate thresholds from {len(norms)} steps of {args.logfile} ==")
    for candidate in candidates:
        print(candidate)
    print(f"wrote: {path}")
    return 0


def _print_epoch(result: RunResult) -> None:
    e = result.epochs[-1]
    print(
        f"{result.clip:>10} {e.epoch:>5} {e.loss:>12.5g} {e.grad_norm:>12.5g} {e.clip_rate:>8.0%}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
