"""Comparisons of nested results (dicts, lists, tensors, numbers) across ranks and runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

RTOL, ATOL = 2e-5, 1e-6
"""fp32 tolerance: the distributed run sums the same numbers in another order (the batch
split over ranks, gradients averaged by an all-reduce, norms as sums of shard norms)."""


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}/{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def assert_identical(actual: Any, expected: Any, what: str) -> None:
    """Bit-identical leaves (NaN equal to NaN), same structure."""
    a, e = dict(leaves(actual)), dict(leaves(expected))
    assert a.keys() == e.keys(), f"{what}: different structure"
    for path, want in e.items():
        got = a[path]
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(
                got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m, p=path: f"{what}{p}: {m}"
            )
        else:
            assert got == want, f"{what}{path}: {got!r} != {want!r}"


def assert_close(
    actual: Any, expected: Any, what: str, *, rtol: float = RTOL, atol: float = ATOL
) -> None:
    """Leaves equal within fp32 tolerance (dtypes and shapes must match), same structure."""
    a, e = dict(leaves(actual)), dict(leaves(expected))
    assert a.keys() == e.keys(), f"{what}: different structure"
    for path, want in e.items():
        got = a[path]
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(
                got,
                want,
                rtol=rtol,
                atol=atol,
                equal_nan=True,
                msg=lambda m, p=path: f"{what}{p}: {m}",
            )
        else:
            assert got == want, f"{what}{path}: {got!r} != {want!r}"


def same_on_every_rank(per_rank: list[Any], what: str) -> Any:
    """Rank 0's value, after checking every rank's is bit-identical to it."""
    for r, value in enumerate(per_rank[1:], start=1):
        assert_identical(value, per_rank[0], f"{what}: rank {r} vs rank 0")
    return per_rank[0]
