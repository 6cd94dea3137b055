"""Strategy state saved on each rank and restored gives the same run as no interruption.

The model and optimizer are checkpointed with ``torch.distributed.checkpoint``; the
clipper's state with a plain ``torch.save`` per rank (or once, by rank 0: it is the
same on every rank) and ``torch.load(weights_only=True)``. After the restore, the
remaining steps must give bit-identical parameters and stats to the uninterrupted
run; without restoring the clipper they must not (so the test can fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from .checks import assert_identical, leaves, same_on_every_rank
from .harness import values
from .scenarios import STRATEGIES

pytestmark = pytest.mark.distributed

STATEFUL = ["norm-warmup", "autoclip", "zclip", "adagc", "emaratio-per-tensor"]


def resumed(run: Any, tmp_path: Path, world: int, mode: str, strategy: str, io: str) -> Any:
    per_rank = values(
        run(
            world,
            "resume",
            mode=mode,
            strategy=strategy,
            steps=6,
            split=3,
            directory=str(tmp_path),
            clipper_io=io,
        )
    )
    return same_on_every_rank(per_rank, f"{mode} x{world} {strategy}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_per_rank_state_resumes_exactly(run: Any, tmp_path: Path, mode: str, strategy: str) -> None:
    out = resumed(run, tmp_path, 2, mode, strategy, "per-rank")
    assert_identical(out["resumed"], out["straight"], "resumed vs uninterrupted")
    state = out["state"]  # loadable without pickle
    path = tmp_path / "check.pt"
    torch.save(state, path)
    assert_identical(torch.load(path, weights_only=True), state, "weights_only round trip")


@pytest.mark.parametrize("io", ["rank0", "dcp"])
@pytest.mark.parametrize("strategy", ["zclip", "adagc"])
def test_state_from_rank0_or_dcp_resumes_exactly(
    run: Any, tmp_path: Path, strategy: str, io: str
) -> None:
    out = resumed(run, tmp_path, 3, "fsdp", strategy, io)
    assert_identical(out["resumed"], out["straight"], f"{io}: resumed vs uninterrupted")


@pytest.mark.parametrize("strategy", STATEFUL)
def test_without_the_clipper_state_the_run_differs(run: Any, tmp_path: Path, strategy: str) -> None:
    out = resumed(run, tmp_path, 2, "fsdp", strategy, "none")
    final = [v for _, v in leaves(out["resumed"][-1]["params"])]
    want = [v for _, v in leaves(out["straight"][-1]["params"])]
    assert not all(torch.equal(a, b) for a, b in zip(final, want))
