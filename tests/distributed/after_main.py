"""Run a script as ``__main__`` on a torchrun rank, then report the gloo threads left.

``torchrun --nproc-per-node 2 tests/distributed/after_main.py examples/ddp_train.py ARGS``
runs the example as ``torchrun --nproc-per-node 2 examples/ddp_train.py ARGS`` does,
then each rank prints one line, ``rank R gloo threads after main: [...]``. A program that
really released its process group leaves none; one whose group is still alive leaves
gloo's worker threads, which can abort the interpreter's finalization
(pytorch/pytorch#179291). Thread names are read from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import runpy
import sys

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (sorted)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(name for name in names if name in GLOO_THREADS)


if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
    # One write per line: both ranks share torchrun's stdout.
    sys.stdout.write(f"rank {os.environ['RANK']} gloo threads after main: {gloo_threads()}\n")
    sys.stdout.flush()
