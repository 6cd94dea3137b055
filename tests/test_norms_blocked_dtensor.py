"""The blocked L2 kernel on DTensors, in one process (gloo, world size 1, a CPU mesh).

The kernel reduces the local shards; the reduction across ranks is that of the torch
kernel. With one rank a shard is the whole tensor, so the norms must be those of the
plain tensors.
"""

from __future__ import annotations

import pytest
import torch

from gradclip import norms
from gradclip.norms import BLOCKED_MIN_NUMEL, tensor_norms

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    store = dist.FileStore(str(tmp_path_factory.mktemp("dist") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


def test_blocked_kernel_reduces_the_local_shards(mesh, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    plain = [
        torch.randn(300, 400, generator=gen) * 1e-3,
        torch.randn(BLOCKED_MIN_NUMEL + 5, generator=gen) * 1e-3,
        torch.randn(8, generator=gen),
    ]
    mixed = [
        distribute_tensor(plain[0].clone(), mesh, [Shard(0)]),
        distribute_tensor(plain[1].clone(), mesh, [Replicate()]),
        plain[2].clone(),
    ]
    seen: list[list[tuple[int, ...]]] = []
    blocked_norms = norms._blocked_norms

    def spy(tensors):
        assert not any(norms.is_dtensor(t) for t in tensors)
        seen.append([tuple(t.shape) for t in tensors])
        return blocked_norms(tensors)

    monkeypatch.setattr(norms, "_blocked_norms", spy)
    result = tensor_norms(mixed, kernel="blocked")
    assert seen == [[(300, 400), (BLOCKED_MIN_NUMEL + 5,)]]
    expected = tensor_norms(plain, kernel="blocked")
    # Sharded: the all-reduce of the squared norm (one rank) and its square root.
    torch.testing.assert_close(result[0], expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(result[1:], expected[1:], rtol=0, atol=0)
    reference = torch.stack([t.double().norm() for t in plain])
    assert bool(((result.double() - reference).abs() <= 1e-6 * reference).all())
    # The torch kernel is left as it was.
    seen.clear()
    torch.testing.assert_close(tensor_norms(mixed), tensor_norms(plain), rtol=1e-6, atol=0)
    assert seen == []
