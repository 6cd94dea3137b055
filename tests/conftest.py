"""Shared fixtures for the gradclip test suite.

Test modules import their helpers from ``helpers`` and ``sync_guard`` (this directory
is on ``sys.path`` under pytest's default ``prepend`` import mode).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import gradclip._sync

# Property tests run a modest, reproducible set of examples so the suite stays fast and
# deterministic on 2 cores; explore further (random, many examples) locally with
# HYPOTHESIS_PROFILE=thorough.
settings.register_profile(
    "default",
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def no_cpu_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn off the CPU host-branch shortcut: exercise the accelerator (sync-free) path."""
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", False)


@pytest.fixture(params=[True, False], ids=["cpu-branch", "branch-free"])
def branch_on_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test both with the CPU shortcut and on the branch-free accelerator path."""
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", request.param)
    return bool(request.param)
