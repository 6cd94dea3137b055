"""The ``gradclip`` command line.

``gradclip demo`` trains the tutorial's LSTM on noisy sine waves in a stable and an
unstable setting, with and without clipping, and prints what clipping changed.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

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
    args = parser.parse_args(argv)
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


def _print_epoch(result: RunResult) -> None:
    e = result.epochs[-1]
    print(
        f"{result.clip:>10} {e.epoch:>5} {e.loss:>12.5g} {e.grad_norm:>12.5g} {e.clip_rate:>8.0%}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
