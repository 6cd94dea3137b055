"""The ``gradclip`` command line.

``gradclip demo`` compares clipping strategies on the tutorial's LSTM in a stable and
an unstable setting and writes a report; ``gradclip compare`` does the same for any
tasks, strategies and seeds; ``gradclip sweep`` trains the learning-rate × threshold
grid on the regression task (see :mod:`gradclip.experiments.commands`).

``gradclip report LOG`` turns a monitor's CSV/JSONL log into PNG plots and prints a
summary; ``gradclip suggest LOG`` prints candidate clipping thresholds and draws
them on the norm histogram. A bad argument or an unreadable log is a one-line
error and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gradclip.experiments.commands import UsageError, add_commands, dispatch


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="gradclip", description="Gradient clipping you can trust and measure."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(commands)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            return _report(args.logfile, args.out)
        if args.command == "suggest":
            return _suggest(args)
        code = dispatch(args, argv)
    except UsageError as error:
        parser.error(str(error))  # one line, exit code 2
    except (ValueError, OSError, ImportError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"gradclip {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 2 if code is None else code


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


if __name__ == "__main__":
    raise SystemExit(main())
