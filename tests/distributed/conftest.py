"""Pools of gloo ranks shared by the distributed tests (started on first use, once)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .harness import Outcome, Pool

Runner = Callable[..., list[Outcome]]


@pytest.fixture(scope="session")
def pools() -> Iterator[dict[int, Pool]]:
    """World size -> its pool; every pool is shut down at the end of the session."""
    started: dict[int, Pool] = {}
    try:
        yield started
    finally:
        for pool in started.values():
            pool.close()


@pytest.fixture
def run(pools: dict[int, Pool]) -> Runner:
    """``run(world, function, timeout=..., **kwargs)``: call ``scenarios.<function>`` on every rank."""

    def call(world: int, function: str, *, module: str = "", **kwargs: Any) -> list[Outcome]:
        if world not in pools:
            pools[world] = Pool(world)
        target = module or f"{__package__}.scenarios"
        return pools[world].run(target, function, **kwargs)

    return call
