"""The study's commands: ``gradclip compare``, ``gradclip sweep`` and ``gradclip demo``.

Each adds its subparser with :func:`add_commands` and runs through :func:`dispatch`.
Bad arguments and specs are caught before any training and reported by the caller as
one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradclip.experiments.tasks import TASKS, TaskOptions

DEMO_TASKS = ("lstm-sine", "lstm-sine-unstable")
DEMO_CLIPS: dict[str, tuple[str, ...]] = {
    "lstm-sine": ("none", "norm:1.0", "value:0.5", "autoclip:p=10", "zclip"),
    "lstm-sine-unstable": (
        "none", "norm:0.05", "norm:0.1", "value:0.01", "norm:1.0", "autoclip:p=10",
        "zclip:warmup_steps=5",
    ),
}  # fmt: skip
"""The demo's strategies per setting.

The classic setting gets the usual thresholds. At SGD lr 2.0 a norm-clipped step is
at most lr × threshold long, so the unstable setting needs tight thresholds to train
(norm 0.05 and 0.1, value 0.01); norm 1.0, AutoClip and ZClip (its warm-up cut to 5
steps, or it would diverge before its first clip) stay finite or not but do not
train there, and the report says so.
"""


class UsageError(ValueError):
    """A bad argument: reported as one line, exit code 2."""


def add_commands(commands: Any) -> None:
    """Add ``compare``, ``sweep`` and ``demo`` to an argparse subparsers object."""
    compare = commands.add_parser(
        "compare",
        help="train tasks with several clipping strategies and seeds; write a report",
        description="Train each --task with each --clip strategy over --seeds seeds and write "
        "results.csv, summary.csv, PNG plots and report.html into --out.",
    )
    compare.add_argument(
        "--task", action="append", required=True, metavar="TASK",
        help=f"a task (repeatable): {', '.join(sorted(TASKS))}",
    )  # fmt: skip
    compare.add_argument(
        "--clip", action="append", required=True, metavar="SPEC",
        help="a strategy spec (repeatable), e.g. none, norm:1.0, value:0.5, agc:0.01, "
        "autoclip:p=10, zclip:z=2.5, adagc, emaratio:r=2",
    )  # fmt: skip
    compare.add_argument("--seeds", type=int, default=1, help="seeds per combination (default 1)")
    compare.add_argument(
        "--out", type=Path, default=Path("gradclip-study"), help="output directory"
    )
    _common(compare)
    _task_options(compare)

    sweep = commands.add_parser(
        "sweep",
        help="learning rate x clipping threshold grid on the regression task (vectorized)",
        description="Train one linear model per (lr, threshold) on the regression task, all at "
        "once, and write sweep.csv and a heatmap of the final loss. Under torchrun the grid is "
        "split across ranks.",
    )
    sweep.add_argument("--task", default="regression", choices=["regression"], help="the task")
    sweep.add_argument("--lr", default="1e-3:1:7", help="START:STOP:N log-spaced, or a list a,b,c")
    sweep.add_argument(
        "--threshold", default="0.01:100:7", help="START:STOP:N log-spaced, or a list a,b,c"
    )
    sweep.add_argument(
        "--no-unclipped", action="store_true", help="leave out the unclipped baseline column"
    )
    sweep.add_argument("--out", type=Path, default=Path("gradclip-sweep"), help="output directory")
    _common(sweep)
    sweep.add_argument("--epochs", type=int, default=None, help="epochs (default 3)")

    demo = commands.add_parser(
        "demo",
        help="the LSTM study: stable and unstable settings, with and without clipping",
        description="Compare no clipping, norm, value, AutoClip and ZClip on the tutorial's LSTM "
        "in its classic (stable) setting and an unstable one (SGD lr 2.0, with tighter "
        "thresholds); print the table and write the report.",
    )
    demo.add_argument("--out", type=Path, default=Path("gradclip-demo"), help="output directory")
    demo.add_argument("--seeds", type=int, default=2, help="seeds per combination (default 2)")
    _common(demo)
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10)")


def dispatch(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run the command if it is one of these; None otherwise."""
    handlers: dict[str, Callable[[argparse.Namespace, str], int]] = {
        "compare": _compare,
        "sweep": _sweep,
        "demo": _demo,
    }
    handler = handlers.get(args.command)
    if handler is None:
        return None
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    return handler(args, "gradclip " + shlex.join(argv))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: small models run fastest single-threaded)",
    )  # fmt: skip


def _task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the task's)")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the task's)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps")
    parser.add_argument("--data", default=None, help="digits-mlp: MNIST IDX file/dir or .npz")
    parser.add_argument("--text", default=None, help="char-rnn: a UTF-8 text file")


def _options(args: argparse.Namespace) -> TaskOptions:
    for name in ("epochs", "batch_size", "max_steps", "seeds", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    lr = getattr(args, "lr", None)
    if isinstance(lr, float) and not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"--lr must be a finite number > 0; got {lr}")
    _check_device(args.device)
    for flag in ("data", "text"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"--{flag} {path}: no such file or directory")
    return TaskOptions(
        epochs=args.epochs,
        lr=lr if isinstance(lr, float) else None,
        batch_size=getattr(args, "batch_size", None),
        max_steps=getattr(args, "max_steps", None),
        data=getattr(args, "data", None),
        text=getattr(args, "text", None),
        device=args.device,
    )


def _check_device(device: str) -> None:
    """Compute on ``device`` and read the result back, as training will.

    Allocating is not enough: a ``meta`` tensor allocates but holds no data.
    """
    import torch

    try:
        (torch.ones(2, device=device) * 2).sum().cpu()
    except Exception as error:  # RuntimeError, ValueError, AssertionError, NotImplementedError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--device {device!r} is not usable here: {first}") from None


def _progress(quiet: bool) -> Callable[[str, str, int], Callable[[int], None] | None]:
    """A per-run progress bar on stderr; silent when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return lambda task, clip, seed: None
    from tqdm import tqdm

    bars: list[Any] = []

    def on_run(task: str, clip: str, seed: int) -> Callable[[int], None]:
        for bar in bars:
            bar.close()
        bars.clear()
        bar = tqdm(desc=f"{task} {clip} seed {seed}", unit="step", leave=False, file=sys.stderr)
        bars.append(bar)

        def advance(done: int) -> None:
            bar.update(done - bar.n)

        return advance

    return on_run


def _study(tasks: list[str], clips: Any, args: argparse.Namespace, command: str) -> int:
    from gradclip.experiments.compare import compare, validate

    options = _options(args)
    try:
        validate(tasks, clips, args.seeds, options)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    study = compare(
        tasks,
        clips,
        seeds=args.seeds,
        seed=args.seed,
        options=options,
        out=args.out,
        on_run=_progress(args.json),
        command=command,
    )
    if args.json:
        summary = [s.row() for s in study.summaries]
        _print_json({"summary": summary, "files": study.files})
        return 0
    from gradclip.experiments.report import conclude

    for task in study.tasks:
        _, summaries = study.for_task(task)
        print(f"\n== {task} ==")
        print(_text_table(summaries))
        for line in conclude(summaries):
            print(f"  - {line}")
    print(f"\nreport: {study.files['report']}")
    return 0


def _compare(args: argparse.Namespace, command: str) -> int:
    return _study(args.task, args.clip, args, command)


def _demo(args: argparse.Namespace, command: str) -> int:
    args.batch_size = args.max_steps = args.data = args.text = args.lr = None
    return _study(list(DEMO_TASKS), {t: list(DEMO_CLIPS[t]) for t in DEMO_TASKS}, args, command)


def _sweep(args: argparse.Namespace, command: str) -> int:
    from gradclip.experiments.sweep import parse_grid, plot_sweep, sweep, write_sweep

    try:
        lrs = parse_grid(args.lr, "--lr")
        thresholds = parse_grid(args.threshold, "--threshold")
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1; got {args.epochs}")
    _check_device(args.device)
    options = TaskOptions(epochs=args.epochs, device=args.device)
    points = sweep(
        lrs, thresholds, seed=args.seed, options=options, include_unclipped=not args.no_unclipped
    )
    if not points:  # a non-zero rank under torchrun: rank 0 writes
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": write_sweep(points, args.out / "sweep.csv"),
        "heatmap": plot_sweep(points, args.out / "sweep.png", command=command),
    }
    if args.json:
        _print_json({"points": [p.__dict__ for p in points], "files": files})
        return 0
    best = min((p for p in points if not p.diverged), key=lambda p: p.clean_mse, default=None)
    diverged = sum(p.diverged for p in points)
    print(f"{len(points)} grid points, {diverged} diverged")
    if best is not None:
        clip = "unclipped" if math.isinf(best.threshold) else f"threshold {best.threshold:g}"
        print(f"best: lr {best.lr:g}, {clip}: clean MSE {best.clean_mse:.4g}")
    print(f"heatmap: {files['heatmap']}\ncsv: {files['csv']}")
    return 0


def _text_table(summaries: list[Any]) -> str:
    """The summary table the commands print.

    ``trained`` counts the runs that trained, ``step 1`` is the loss before any update
    and ``spikes`` the loss spikes per run (see
    :data:`~gradclip.experiments.compare.SUMMARY_COLUMNS`).
    """
    from gradclip.experiments.report import label

    width = max(16, *(len(label(s.clip)) + 2 for s in summaries))
    head = (
        f"{'strategy':<{width}}{'diverged':>9}{'trained':>9}{'step 1':>9}{'final loss':>12}"
        f"{'best loss':>11}{'clip rate':>10}{'spikes':>8}{'ms/step':>9}"
    )
    lines = [head]
    for s in summaries:
        lines.append(
            f"{label(s.clip):<{width}}{f'{s.diverged}/{s.runs}':>9}{f'{s.trained}/{s.runs}':>9}"
            f"{_g(s.initial_loss, 3):>9}{_g(s.final_loss, 4):>12}{_g(s.best_loss, 4):>11}"
            f"{s.clip_rate:>10.0%}{s.loss_spikes:>8.2g}{s.step_ms:>9.2f}"
        )
    return "\n".join(lines)


def _g(value: float, digits: int) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else "-"


def _print_json(payload: dict[str, Any]) -> None:
    """Print strict JSON: non-finite numbers become null, paths strings."""
    print(json.dumps(_jsonable(payload), allow_nan=False))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
