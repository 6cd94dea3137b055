"""Every strategy, trained under DDP and FSDP2 on 2 and 3 ranks, equals the single-process run.

Each rank trains the same small model on its share of every batch, clipping with
``clipper.clip_()`` before each SGD step; the test process trains the model alone on
the full batch. After every step, the parameters and every ``ClipStats`` field
(per-tensor norms included) must be bit-identical on all ranks and equal the
single-process ones to fp32 tolerance; clipping must have triggered. The model
shards unevenly (on 3 ranks the heads leave a rank with empty shards), and its
LayerNorm weight and biases are vectors that FSDP2 splits across ranks.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch

from gradclip.clippers.base import registry

from .checks import assert_close, same_on_every_rank
from .harness import values
from .scenarios import STAT_FIELDS, STRATEGIES, reference

pytestmark = pytest.mark.distributed

STEPS = 6


@cache
def single_process(strategy: str) -> list[dict[str, Any]]:
    return reference(strategy, STEPS)


def test_every_registered_strategy_is_trained() -> None:
    covered = {name.split("-")[0] for name in STRATEGIES}
    assert set(registry()) <= covered, set(registry()) - covered


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(run: Any, world: int, mode: str, strategy: str) -> None:
    per_rank = values(run(world, "train", mode=mode, strategy=strategy, steps=STEPS))
    records = same_on_every_rank(per_rank, f"{mode} x{world} {strategy}")
    expected = single_process(strategy)
    assert len(records) == len(expected) == STEPS
    if strategy != "none":
        assert any(bool(r["clipped"]) for r in expected), "the thresholds must make it clip"
    for step, (got, want) in enumerate(zip(records, expected)):
        for name in (*STAT_FIELDS, "norms"):
            assert got[name].dtype == want[name].dtype, (step, name)
            assert type(got[name]) is torch.Tensor, "stats must be plain tensors"
        assert_close(got, want, f"{mode} x{world} {strategy} step {step}")
