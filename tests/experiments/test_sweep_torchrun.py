"""``torchrun --nproc-per-node 2 -m gradclip sweep`` splits the grid and gathers on rank 0."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rank_launch

pytestmark = pytest.mark.distributed


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_two_ranks_give_the_single_process_grid(tmp_path: Path) -> None:
    args = ["sweep", "--lr", "0.01,0.3,3", "--threshold", "0.1,1", "--epochs", "1"]
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "gradclip", *args, "--out", str(single)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    ranks = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = rank_launch.run(
        # --standalone: torchrun picks a free port itself and keeps it (no race for one)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "gradclip", *args, "--out", str(ranks)],
        env=env, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, rank_launch.failure(proc)
    assert proc.stdout.count("grid points") == 1  # only rank 0 reports
    expected, got = rows(single / "sweep.csv"), rows(ranks / "sweep.csv")
    assert len(got) == 3 * 3  # 3 lrs x (2 thresholds + unclipped)
    assert got == expected
