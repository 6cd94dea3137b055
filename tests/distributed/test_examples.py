"""The distributed examples run under ``torchrun --nproc-per-node 2`` (CPU, gloo) as documented.

Each script prints, from rank 0, every rank's last total norm and whether they are the
same, and how many steps were skipped: one rank's gradient is poisoned with a NaN at
step 15, so exactly one. The FSDP2 script is run twice on one checkpoint folder: the
second run resumes where the first stopped. Each launch has a timeout; on expiry its
whole process group (torchrun and its workers) is killed.
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


def torchrun(script: str, *args: str) -> str:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port on localhost
        "--nproc-per-node",
        "2",
        str(ROOT / "examples" / script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = rank_launch.run(command, env=env, timeout=TIMEOUT, cwd=str(ROOT))
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, f"{script} failed:\n{out}\n{err[-4000:]}"
    return out


def test_ddp_example_fused() -> None:
    out = torchrun("ddp_train.py", "--steps", "20", "--fused")
    assert "same=True" in out, out
    assert "skipped steps (non-finite): 1" in out, out
    assert "folded True" in out, out


def test_fsdp_example_and_resume(tmp_path: Path) -> None:
    folder = str(tmp_path / "ckpt")
    out = torchrun("fsdp_train.py", "--steps", "20", "--checkpoint", folder, "--clip", "zclip")
    assert "same=True" in out and "skipped steps (non-finite): 1" in out, out
    assert f"saved to {folder}" in out, out
    out = torchrun("fsdp_train.py", "--steps", "5", "--checkpoint", folder, "--clip", "zclip")
    assert f"resumed at step 20 from {folder}" in out, out
    assert "same=True" in out and "skipped steps (non-finite): 0" in out, out
