"""A pytest session that leaves gloo threads behind ends with its own exit status.

``conftest.py`` ends such a session with ``os._exit`` instead of interpreter
finalization, during which a gloo worker thread that takes the GIL crashes the process
(SIGABRT, "terminate called without an active exception", or SIGSEGV;
pytorch/pytorch#179291). These tests run a session in a subprocess that builds a
DTensor on a world-size-1 gloo group, as the in-process DTensor tests do, and then
makes the race certain instead of rare: it leaves collectives queued on gloo's workers
(each, when done, releases a tensor, which takes the GIL) and, behind them, one whose
completion callback keeps taking the GIL until the process ends. Without the conftest
hooks that session crashes after reporting its result; with them it exits with
pytest's status and its full report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TESTS = Path(__file__).resolve().parent

SESSION = """
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("dist") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()  # does not release the group after distribute_tensor


def take_the_gil_until_the_end(_):
    if threading.current_thread() is threading.main_thread():
        return  # the work was done before the callback was attached: nothing to show
    end = time.monotonic() + 60
    while time.monotonic() < end:
        time.sleep(0.001)  # gives the GIL back and takes it again


def test_dtensor(mesh):
    full = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(distribute_tensor(full, mesh, [Shard(0)]).full_tensor(), full)
    src = torch.ones(100_000)
    for _ in range(1000):
        dist.all_gather([torch.empty_like(src)], src, async_op=True)
    big = torch.ones(2**25)  # 128 MB to copy: each of gloo's 2 workers takes one
    for _ in range(2):
        dist.all_gather([torch.empty_like(big)], big, async_op=True)
    work = dist.all_gather([torch.empty_like(src)], src, async_op=True)  # queued last
    work.get_future().then(take_the_gil_until_the_end)  # runs on the worker that ends it
    assert os.environ["SESSION_OUTCOME"] == "passed"
"""


def session(tmp_path: Path, outcome: str, *, hooks: bool) -> subprocess.CompletedProcess[str]:
    """Run SESSION in a fresh pytest process, with or without this suite's conftest hooks."""
    (tmp_path / "test_session.py").write_text(SESSION)
    plugins = ["-p", "conftest"] if hooks else []
    env = {
        **os.environ,
        "SESSION_OUTCOME": outcome,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugins,
         "test_session.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(("outcome", "status"), [("passed", 0), ("failed", 1)])
def test_session_exits_with_its_status(tmp_path: Path, outcome: str, status: int) -> None:
    proc = session(tmp_path, outcome, hooks=True)
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"1 {outcome}" in proc.stdout  # the report was flushed before the exit
    assert "terminate called" not in proc.stderr


def test_without_the_hooks_the_session_crashes_at_exit(tmp_path: Path) -> None:
    """The control: the race above is real (when torch fixes it, drop the hard exit)."""
    proc = session(tmp_path, "passed", hooks=False)
    assert "1 passed" in proc.stdout
    assert proc.returncode < 0, f"exit status {proc.returncode}: torch no longer crashes here"
