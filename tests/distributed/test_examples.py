"""The distributed examples run under ``torchrun --nproc-per-node 2`` (CPU, gloo) as documented.

Each script prints, from rank 0, every rank's last total norm and whether they are the
same, and how many steps were skipped: one rank's gradient is poisoned with a NaN at
step 15, so exactly one. The FSDP2 script is run twice on one checkpoint folder: the
second run resumes where the first stopped. Each launch has a timeout; on expiry its
whole process group (torchrun and its workers) is killed. Nothing is retried: a rank
that aborts at exit fails the test.

The DDP script runs through ``after_main.py``, which reports the gloo threads each rank
has left once the script's main code returned: none, since it releases its group. The
FSDP2 script cannot release its group (FSDP2 keeps it) and ends its ranks with
``os._exit`` instead; its launches must simply exit 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import rank_launch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 150


def torchrun(*args: str) -> str:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on localhost
        "--nproc-per-node",
        "2",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = rank_launch.run(command, env=env, timeout=TIMEOUT, cwd=str(ROOT))
    assert proc.returncode == 0, rank_launch.failure(proc)
    return proc.stdout


def example(script: str) -> str:
    return str(ROOT / "examples" / script)


def test_ddp_example_fused() -> None:
    after_main = str(Path(__file__).with_name("after_main.py"))
    out = torchrun(after_main, example("ddp_train.py"), "--steps", "20", "--fused")
    assert "same=True" in out, out
    assert "skipped steps (non-finite): 1" in out, out
    assert "folded True" in out, out
    for rank in range(2):  # the group was released before the interpreter finalizes
        assert f"rank {rank} gloo threads after main: []" in out, out


def test_fsdp_example_and_resume(tmp_path: Path) -> None:
    folder = str(tmp_path / "ckpt")
    args = ["--checkpoint", folder, "--clip", "zclip"]
    out = torchrun(example("fsdp_train.py"), "--steps", "20", *args)
    assert "same=True" in out and "skipped steps (non-finite): 1" in out, out
    assert f"saved to {folder}" in out, out
    out = torchrun(example("fsdp_train.py"), "--steps", "5", *args)
    assert f"resumed at step 20 from {folder}" in out, out
    assert "same=True" in out and "skipped steps (non-finite): 0" in out, out
