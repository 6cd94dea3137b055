"""Shared fixtures for the gradclip test suite.

Test modules import their helpers from ``helpers`` and ``sync_guard`` (this directory
is on ``sys.path`` under pytest's default ``prepend`` import mode).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

import pytest
import torch
import torch.distributed as dist
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


# -- the end of the session: a gloo group alive at interpreter exit --------------------------
#
# Some tests build DTensors on a gloo group of world size 1 inside this process
# (tests/test_dtensor_single.py, the DTensor test in tests/clippers/test_agc.py). After
# ``distribute_tensor`` (and FSDP2's ``fully_shard``), torch keeps references to the group
# in C++, so ``destroy_process_group()`` does not release it: gloo's worker threads live
# until the interpreter finalizes. If one of them then drops the last reference to a
# tensor (finishing a collective's work object), it must take the GIL, Python ends that
# thread with ``pthread_exit`` and C++ aborts the process: "terminate called without an
# active exception", exit status 134 after a green run (pytorch/pytorch#179291, a
# proposed atexit destroy that was abandoned; gloo's shutdown()/abort() do not stop the
# threads). Such a session therefore ends without interpreter finalization: destroy what
# can be destroyed, let pytest's capture and the atexit handlers (coverage, logging,
# multiprocessing) finish, flush, and ``os._exit`` with the session's exit status.

_GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
_session: list[pytest.Session] = []
_group_seen = False


def _group_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gloo_threads_alive() -> bool | None:
    """Whether a gloo thread runs in this process; None where thread names cannot be read."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() in _GLOO_THREADS:
                    return True
        except OSError:  # the thread ended while we looked
            continue
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Note whether a test ran with a process group (before its fixtures close it)."""
    global _group_seen
    _group_seen = _group_seen or _group_initialized()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Keep the session: its ``exitstatus`` is final once every hook has run."""
    _session.append(session)


def _gloo_may_be_alive() -> bool:
    """Whether a gloo group was created in this process and may still be alive."""
    if _group_initialized():
        return True
    alive = _gloo_threads_alive()
    return _group_seen if alive is None else alive


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End a session that left gloo threads behind with ``os._exit`` (see above)."""
    if not _session or not _gloo_may_be_alive():
        return
    status = int(_session[-1].exitstatus)
    if _group_initialized():
        with contextlib.suppress(Exception):  # best effort: the process exits next
            dist.destroy_process_group()
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # writes out what it held, as its cleanup would
    atexit._run_exitfuncs()  # still safe: the interpreter is not finalizing yet
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(status)
