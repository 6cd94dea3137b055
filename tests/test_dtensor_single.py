"""DTensor gradients in one process: a gloo group of world size 1 and a 1-device CPU mesh.

With one rank a sharded tensor's local shard is the whole tensor, so every result must
equal the plain-tensor reference, while the DTensor code paths (local shards, the
all-reduce of norms, placements) still run. torch raises on a mix of DTensor and
plain gradients; gradclip accepts it.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradclip
from gradclip import norms
from gradclip.norms import BLOCKED_MIN_NUMEL, tensor_norms
from helpers import NORM_TYPES, agc_params, agc_reference, make_params

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed.device_mesh import DeviceMesh  # noqa: E402
from torch.distributed.tensor import (  # noqa: E402
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)


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


def dtensor_params(mesh, *, seed=0, grad_scale=3.0, agc=False):
    """A mix of Shard(0), Replicate and plain parameters, and plain-tensor twins.

    Returns ``(mixed, plain)``: ``mixed[i]`` and ``plain[i]`` hold the same values.
    """
    specs = [
        ((8, 5), [Shard(0)]),
        ((8,), [Shard(0)]),
        ((6, 3), [Replicate()]),
        ((4, 4), None),
        ((7,), [Replicate()]),
        ((), None),
        ((4, 4), [Shard(0)]),
    ]
    shapes = [shape for shape, _ in specs]
    if agc:
        plain = agc_params(shapes, seed=seed)
    else:
        plain = make_params(shapes, seed=seed, grad_scale=grad_scale)
    mixed = []
    for (_, placements), p in zip(specs, plain):
        if placements is None:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
        else:
            q = torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, placements))
            q.grad = distribute_tensor(p.grad.clone(), mesh, placements)
        mixed.append(q)
    return mixed, plain


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_same_grads(mixed, plain, *, rtol, atol):
    for q, p in zip(mixed, plain):
        if isinstance(q.grad, DTensor):
            assert isinstance(q.grad, DTensor)  # still a DTensor, same placements
            assert q.grad.placements == q.placements
        torch.testing.assert_close(full(q.grad), p.grad, rtol=rtol, atol=atol)


def test_torch_rejects_the_mix(mesh):
    mixed, _ = dtensor_params(mesh)
    with pytest.raises(RuntimeError, match=r"mixed torch\.Tensor and DTensor"):
        torch.nn.utils.get_total_norm([q.grad for q in mixed])


@pytest.mark.parametrize("p", NORM_TYPES)
def test_get_total_norm_of_mix_equals_plain_reference(mesh, p):
    mixed, plain = dtensor_params(mesh)
    assert any(isinstance(q.grad, DTensor) for q in mixed)
    expected = torch.nn.utils.get_total_norm([q.grad for q in plain], p)
    actual = gradclip.get_total_norm([q.grad for q in mixed], p)
    assert type(actual) is torch.Tensor  # a plain tensor, not a DTensor
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)


def test_tensor_norms_of_dtensors(mesh):
    mixed, plain = dtensor_params(mesh)
    norms = gradclip.tensor_norms([q.grad for q in mixed], 3.0)
    expected = torch.stack([torch.linalg.vector_norm(q.grad, 3.0) for q in plain])
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_clip_grad_norm_of_mix_equals_plain_reference(mesh, branch_on_cpu, max_norm, p):
    mixed, plain = dtensor_params(mesh)
    expected = torch.nn.utils.clip_grad_norm_(plain, max_norm, p)
    actual = gradclip.clip_grad_norm_(mixed, max_norm, p)
    assert type(actual) is torch.Tensor
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    assert_same_grads(mixed, plain, rtol=1e-6, atol=1e-8)


def test_clip_grad_norm_dtensors_only(mesh):
    mixed, plain = dtensor_params(mesh)
    only = [(i, q) for i, q in enumerate(mixed) if isinstance(q.grad, DTensor)]
    expected = torch.nn.utils.clip_grad_norm_([plain[i] for i, _ in only], 0.5)
    actual = gradclip.clip_grad_norm_([q for _, q in only], 0.5)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    assert_same_grads([q for _, q in only], [plain[i] for i, _ in only], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_clip_grad_norm_partial_gradient(mesh, branch_on_cpu, p):
    # A pending sum (Partial) gradient: the norm reduces it first; scaling each summand
    # scales the sum.
    mixed, plain = dtensor_params(mesh)
    mixed[0].grad = DTensor.from_local(plain[0].grad.clone(), mesh, [Partial()])
    expected = torch.nn.utils.clip_grad_norm_(plain, 0.5, p)
    actual = gradclip.clip_grad_norm_(mixed, 0.5, p)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    assert mixed[0].grad.placements[0].is_partial()
    for q, r in zip(mixed, plain):
        torch.testing.assert_close(full(q.grad), r.grad, rtol=1e-6, atol=1e-8)


def test_clip_grads_with_norm_of_mix(mesh):
    mixed, plain = dtensor_params(mesh)
    total = gradclip.get_total_norm([q.grad for q in mixed])
    torch.nn.utils.clip_grads_with_norm_(plain, 0.5, total)
    gradclip.clip_grads_with_norm_(mixed, 0.5, total)
    assert_same_grads(mixed, plain, rtol=1e-6, atol=1e-8)


def test_nonfinite_policies_with_dtensors(mesh, branch_on_cpu):
    mixed, _ = dtensor_params(mesh)
    mixed[6].grad.to_local()[1, 2] = float("nan")  # a sharded gradient
    names = [(f"p{i}", q) for i, q in enumerate(mixed)]
    before = [full(q.grad).clone() for q in mixed]
    with pytest.raises(gradclip.NonFiniteGradientError, match="p6"):
        gradclip.clip_grad_norm_(names, 1.0, nonfinite="raise")
    for q, b in zip(mixed, before):
        torch.testing.assert_close(full(q.grad), b, rtol=0, atol=0, equal_nan=True)
    total = gradclip.clip_grad_norm_(mixed, 1.0, nonfinite="zero")
    assert math.isnan(float(total))
    for q in mixed:
        assert torch.equal(full(q.grad), torch.zeros(q.shape))


def test_clip_grad_value_of_mix(mesh):
    mixed, plain = dtensor_params(mesh)
    torch.nn.utils.clip_grad_value_(plain, 0.5)
    gradclip.clip_grad_value_(mixed, 0.5)
    assert_same_grads(mixed, plain, rtol=0, atol=0)


def test_clip_grad_agc_of_mix(mesh, branch_on_cpu):
    mixed, plain = dtensor_params(mesh, agc=True)
    expected = agc_reference(plain)
    expected_total = torch.nn.utils.get_total_norm([q.grad for q in plain])
    total = gradclip.clip_grad_agc_(mixed)
    assert type(total) is torch.Tensor
    torch.testing.assert_close(total, expected_total, rtol=1e-6, atol=0)
    for q, e in zip(mixed, expected):
        torch.testing.assert_close(full(q.grad), e, rtol=1e-5, atol=1e-9)


def test_agc_rejects_units_split_across_ranks(mesh):
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    w.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    before = w.grad.full_tensor().clone()
    with pytest.raises(NotImplementedError, match=r"AGC on enc\.weight sharded as"):
        gradclip.clip_grad_agc_([("enc.weight", w)])
    assert torch.equal(w.grad.full_tensor(), before)


def test_blocked_kernel_reduces_the_local_shards(mesh, monkeypatch):
    """The blocked L2 kernel gets the local shards; the reduction across ranks is torch's."""
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
