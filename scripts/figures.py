"""Regenerate the guide's figures with gradclip's own commands: ``make figures``.

Every PNG in ``docs/figures/`` is written by this script and by nothing else; none is
drawn by hand. Each :class:`Figure` is one ``gradclip`` command line, printed in the
guide next to the figures it makes, with its seed, so a reader can rerun it. The
command writes into ``build/figures/`` (not committed); the PNGs the guide shows are
copied from there into ``docs/figures/`` under stable names.

One figure needs a log that no ``gradclip`` command writes: the histogram of
``gradclip suggest`` and the per-layer plots of ``gradclip report`` read a
:class:`gradclip.GradMonitor` log of an unclipped run. :func:`record_log` trains the
``char-rnn`` task (the study's tanh RNN) at a stable learning rate, unclipped, with a
monitor writing that CSV, before those commands run.

Usage (from the repository root)::

    python scripts/figures.py              # every figure (a few minutes on 2 cores)
    python scripts/figures.py explode      # only the figures whose name starts so
    python scripts/figures.py --list       # the commands, without running them

Generating the figures is deliberately not part of ``make test`` (it trains dozens of
small models); ``tests/docs`` checks instead that every figure exists, is referenced
by the guide, and that the guide prints the command below that made it.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path("build/figures")  # relative to ROOT, as in the printed commands
DEST = ROOT / "docs" / "figures"

LOG_TASK = "char-rnn"
LOG_LR = 1.0
LOG_SEED = 0
LOG_PATH = BUILD / "log" / "char-rnn-unclipped.csv"


@dataclass(frozen=True)
class Figure:
    """One command and the figures of the guide it makes.

    Attributes:
        name: a short name, for ``python scripts/figures.py NAME``.
        command: the ``gradclip`` command line, exactly as the guide prints it.
        copies: file written by the command (relative to ``build/figures``) ->
            name in ``docs/figures``.
        needs_log: run :func:`record_log` first.
    """

    name: str
    command: str
    copies: dict[str, str] = field(default_factory=dict)
    needs_log: bool = False


FIGURES: tuple[Figure, ...] = (
    Figure(
        "explode",
        "gradclip compare --task lstm-sine-unstable --clip none --clip norm:1.0 "
        "--clip value:0.5 --seeds 3 --seed 0 --out build/figures/explode",
        {
            "explode/lstm-sine-unstable-loss.png": "explode-loss.png",
            "explode/lstm-sine-unstable-norms.png": "explode-norms.png",
        },
    ),
    Figure(
        "sweep",
        "gradclip sweep --lr 1e-3:1:7 --threshold 0.01:100:7 --seed 0 --out build/figures/sweep",
        {"sweep/sweep.png": "sweep.png"},
    ),
    Figure(
        "suggest",
        "gradclip suggest build/figures/log/char-rnn-unclipped.csv "
        "--out build/figures/log/suggest.png",
        {"log/suggest.png": "suggest.png"},
        needs_log=True,
    ),
    Figure(
        "report",
        "gradclip report build/figures/log/char-rnn-unclipped.csv --out build/figures/log/report",
        {
            "log/report/norms.png": "monitor-norms.png",
            "log/report/layers.png": "monitor-layers.png",
        },
        needs_log=True,
    ),
    Figure(
        "adaptive",
        "gradclip compare --task char-rnn --clip none --clip norm:1.0 --clip autoclip:p=10 "
        "--clip agc:0.01 --clip adagc --seeds 3 --seed 0 --out build/figures/adaptive",
        {
            "adaptive/char-rnn-loss.png": "adaptive-loss.png",
            "adaptive/char-rnn-norms.png": "adaptive-norms.png",
        },
    ),
    Figure(
        "warmup",
        "gradclip compare --task char-rnn --clip none --clip zclip --clip zclip:warmup_steps=5 "
        "--clip emaratio:r=2 --clip adagc --seeds 3 --seed 0 --out build/figures/warmup",
        {
            "warmup/char-rnn-loss.png": "warmup-loss.png",
            "warmup/char-rnn-norms.png": "warmup-norms.png",
        },
    ),
    Figure(
        "stable",
        "gradclip compare --task lstm-sine --clip none --clip norm:1.0 --clip autoclip:p=10 "
        "--seeds 3 --seed 0 --out build/figures/stable",
        {
            "stable/lstm-sine-loss.png": "stable-loss.png",
            "stable/lstm-sine-norms.png": "stable-norms.png",
        },
    ),
)


def record_log(path: Path = LOG_PATH) -> Path:
    """Train ``char-rnn`` at lr 1.0, unclipped, seed 0, and log it with a GradMonitor.

    The log is what ``gradclip suggest`` and ``gradclip report`` read: the pre-clip
    total norm of every step, the loss, and each layer's norm.
    """
    import torch

    from gradclip import CSVWriter, GradMonitor
    from gradclip.experiments.tasks import TaskOptions, get_task

    torch.set_num_threads(1)
    out = ROOT / path
    out.unlink(missing_ok=True)
    task = get_task(LOG_TASK).build(TaskOptions(lr=LOG_LR), LOG_SEED)
    monitor = GradMonitor(task.model, log_every=50, writers=[CSVWriter(out)])
    with monitor:
        for step in range(task.steps):
            loss = task.loss(step)
            task.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            monitor.observe(loss=loss.detach())  # measures; nothing is clipped
            task.optimizer.step()
    return out


def run(figure: Figure) -> list[Path]:
    """Run one figure's command and copy its PNGs into ``docs/figures``."""
    argv = shlex.split(figure.command)
    assert argv[0] == "gradclip", figure.command
    subprocess.run([sys.executable, "-m", "gradclip", *argv[1:]], cwd=ROOT, check=True)
    written = []
    for source, name in figure.copies.items():
        DEST.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copyfile(ROOT / BUILD / source, DEST / name)))
    return written


def main(argv: list[str] | None = None) -> int:
    """Regenerate the figures (all, or those whose name starts with an argument)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these figures (name prefixes)")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    chosen = [f for f in FIGURES if not args.names or any(f.name.startswith(n) for n in args.names)]
    if not chosen:
        parser.error(f"no figure matches {args.names}; choose from {[f.name for f in FIGURES]}")
    if args.list:
        for figure in chosen:
            print(f"{figure.name}: {figure.command}")
        return 0
    if any(f.needs_log for f in chosen):
        started = time.perf_counter()
        print(f"recording {LOG_PATH} ({LOG_TASK}, lr {LOG_LR}, unclipped, seed {LOG_SEED})")
        record_log()
        print(f"  {time.perf_counter() - started:.0f} s")
    for figure in chosen:
        started = time.perf_counter()
        print(f"{figure.name}: {figure.command}")
        for path in run(figure):
            print(f"  -> {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")
        print(f"  {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
