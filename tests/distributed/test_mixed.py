"""Mixed DTensor and plain gradients, on three meshes, on 2 and 3 ranks.

The tensors (``scenarios.MIXED``): row-sharded matrices (uneven, and one with an
empty shard on 3 ranks), sharded vectors (one with empty shards), a column-sharded
matrix and a replicated one on a second mesh (the ranks in reverse order), plain
tensors, a 2-D mesh with one tensor sharded on both of its dimensions, and a Partial
(pending-sum) gradient. torch's own functions raise on such a list. Every functional
op and the strategies must give, on every rank, what they give for the whole tensors
in one process; the norms and clipped gradients must also equal torch's (or a
float64 AGC reference) on the whole tensors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from helpers import NORM_TYPES, agc_reference

from .checks import assert_close, same_on_every_rank
from .harness import Pool, values
from .scenarios import AGC_UNSUPPORTED, MIXED_STRATEGIES, mixed, mixed_params

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def results(request: pytest.FixtureRequest, pools: dict[int, Pool]) -> dict[str, Any]:
    world = request.param
    if world not in pools:
        pools[world] = Pool(world)
    per_rank = values(pools[world].run(f"{__package__}.scenarios", "mixed"))
    return same_on_every_rank(per_rank, f"mixed x{world}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return mixed(distributed=False)


def plain(**kwargs: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return mixed_params(0, distributed=False, **kwargs)


def test_everything_equals_the_single_process_run(
    results: dict[str, Any], single: dict[str, Any]
) -> None:
    assert_close(results, single, "mixed")


@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_equal_torch_on_whole_tensors(results: dict[str, Any], p: float) -> None:
    grads = [q.grad for _, q in plain()]
    expected = torch.stack([torch.linalg.vector_norm(g, p) for g in grads])  # type: ignore[arg-type]
    for key in (f"tensor_norms/{p}",):
        assert type(results[key]) is torch.Tensor
        torch.testing.assert_close(results[key], expected, rtol=2e-6, atol=0)
    total = torch.nn.utils.get_total_norm(grads, p)  # type: ignore[arg-type]
    torch.testing.assert_close(results[f"get_total_norm/{p}"], total, rtol=2e-6, atol=0)
    named = plain()
    clipped_total = torch.nn.utils.clip_grad_norm_([q for _, q in named], 0.5, p)
    torch.testing.assert_close(results[f"clip_grad_norm_/{p}"], clipped_total, rtol=2e-6, atol=0)
    for name, q in named:
        got = results[f"clip_grad_norm_/{p}/grads"][name]
        torch.testing.assert_close(got, q.grad, rtol=2e-6, atol=1e-7, msg=name)


def test_value_and_agc_equal_references_on_whole_tensors(results: dict[str, Any]) -> None:
    named = plain()
    torch.nn.utils.clip_grad_value_([q for _, q in named], 0.5)
    for name, q in named:
        torch.testing.assert_close(results["clip_grad_value_/grads"][name], q.grad, msg=name)
    named = plain(agc=True, scale=0.5)
    assert not {n for n, _ in named} & AGC_UNSUPPORTED
    expected = agc_reference([q for _, q in named], clip_factor=0.1)
    clipped = [name for (name, q), e in zip(named, expected) if not torch.equal(q.grad, e)]
    assert {"rows", "vector", "pending"} <= set(clipped), "AGC must clip the sharded units"
    for (name, _), e in zip(named, expected):
        got = results["clip_grad_agc_/grads"][name]
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-7, msg=name)


def test_strategies_clip_and_report_finite_global_stats(results: dict[str, Any]) -> None:
    for strategy in MIXED_STRATEGIES:
        stats = [results[f"{strategy}/{step}/stats"] for step in range(3)]
        assert any(bool(s["clipped"]) for s in stats), f"{strategy} never clipped"
        for s in stats:
            assert math.isfinite(float(s["total_norm"]))
