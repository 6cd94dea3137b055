"""A NaN on one rank: every rank takes the same action (skip, zero or raise), nobody hangs.

Under FSDP2 the NaN is written into one rank's shard after the backward pass, the
case a purely local check gets wrong; under DDP it enters one rank's input, and the
gradient all-reduce spreads it. The NaN goes to the last rank: gloo's MAX all-reduce
drops a NaN held by a later rank, which for the inf-norm would hide it. Each run has
the harness's timeout, so a rank left waiting in a collective fails the test.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from .checks import assert_identical, same_on_every_rank
from .harness import values
from .scenarios import nonfinite

pytestmark = pytest.mark.distributed

NAN_STEP = 1


def check(records: list[dict[str, Any]], policy: str) -> None:
    before, during, after = records[NAN_STEP - 1], records[NAN_STEP], records[NAN_STEP + 1]
    for r in (before, after):
        assert r["finite"] and r["error"] is None
    if policy == "raise":
        assert during["error"] == "inp.weight"
        assert_identical(during["params"], before["params"], "a raising step changes nothing")
        return
    assert during["error"] is None and not during["finite"]
    assert math.isnan(float(during["total_norm"]))
    if policy == "skip":
        assert [r["skipped"] for r in records] == [0, 1, 1]
        assert_identical(during["params"], before["params"], "a skipped step changes nothing")
    else:  # zero: the momentum step still moves the parameters, with finite values
        assert all(torch.isfinite(p).all() for p in during["params"].values())
    for p in after["params"].values():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("policy", ["skip", "raise", "zero"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_rank_nan_two_ranks(run: Any, mode: str, policy: str, p: float) -> None:
    per_rank = values(
        run(2, "nonfinite", mode=mode, policy=policy, norm_type=p, nan_rank=1, nan_step=NAN_STEP)
    )
    records = same_on_every_rank(per_rank, f"{mode} {policy} p={p}")
    check(records, policy)
    # The same as a single process that met the NaN (the parameters after every step).
    expected = nonfinite("single", policy, p, nan_step=NAN_STEP)
    for step, (got, want) in enumerate(zip(records, expected)):
        assert got["error"] == want["error"] and got["skipped"] == want["skipped"], step
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_one_rank_nan_three_ranks_fsdp(run: Any, policy: str) -> None:
    for nan_rank in (1, 2):
        per_rank = values(
            run(3, "nonfinite", mode="fsdp", policy=policy, norm_type=math.inf, nan_rank=nan_rank)
        )
        check(same_on_every_rank(per_rank, f"nan on rank {nan_rank}"), policy)


def test_fused_optimizer_skips_without_host_sync_ddp(run: Any) -> None:
    # A fused SGD skips through found_inf inside its kernel once it has state.
    per_rank = values(run(2, "nonfinite", mode="ddp", policy="skip", nan_rank=1, fused=True))
    check(same_on_every_rank(per_rank, "fused"), "skip")


def test_inf_norm_of_a_nan_on_a_later_rank(run: Any) -> None:
    per_rank = values(run(2, "inf_norm_with_nan", nan_rank=1))
    norms = same_on_every_rank(per_rank, "inf norms")
    assert torch.isnan(norms["gradclip"][0]) and norms["gradclip"][1] == 4.0
