"""No host syncs on the accelerator path, checked with the reusable guard in sync_guard.py."""

from __future__ import annotations

import math

import pytest
import torch

import gradclip
from gradclip import _agc, _sync, functional
from helpers import (
    NORM_TYPES,
    SHAPE_SETS,
    agc_params,
    agc_reference,
    assert_grads_close,
    assert_grads_identical,
    clone_params,
    grads_of,
    make_params,
    reference_total_norm,
)
from sync_guard import HostSyncError, no_host_sync

# A model-like mix: matrices, vectors, 0-d scalars, many same-shaped small tensors
# (AGC's stacked path), two large tensors (AGC's per-tensor path and clip_grad_value_'s
# one-pass path), in an order that interleaves shapes.
SHAPES = [(300, 300), *SHAPE_SETS["mlp"], (), (4, 4), (), (300, 300), (4, 4), (16,), (16,)]


def mixed_params(**kw):
    return make_params(SHAPES, grad_scale=10.0, **kw)


# --- the guard itself -----------------------------------------------------------------------

SYNCING = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "if": lambda x: 1 if x.sum() > 0 else 0,
    "float": lambda x: float(x.sum()),
    "int": lambda x: int(x[0]),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "nonzero": lambda x: x.nonzero(),
    "argwhere": lambda x: torch.argwhere(x),
    "mask-index": lambda x: x[x > 0],
    "mask-assign": lambda x: x.__setitem__(x > 0, 0.0),
    "masked_select": lambda x: x.masked_select(x > 0),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
}

SYNC_FREE = {
    "arithmetic": lambda x: (x * 2 + 1).clamp(max=1.0),
    "where": lambda x: torch.where(x > 0, x, 0.0),
    "foreach": lambda x: torch._foreach_mul_(torch._foreach_norm([x, x]), 2.0),
    "isfinite-all": lambda x: torch.isfinite(x).all(),
    "index-by-tensor": lambda x: x[torch.tensor([0, 2])],
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "shape": lambda x: x.reshape(-1, 1).shape[0] + len(x),
}


@pytest.mark.parametrize("name", list(SYNCING))
def test_guard_catches_syncs(name):
    x = torch.randn(8)
    with pytest.raises(HostSyncError), no_host_sync():
        SYNCING[name](x)


@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_guard_allows_sync_free_ops(name):
    x = torch.randn(8)
    expected = SYNC_FREE[name](x.clone())
    with no_host_sync():
        actual = SYNC_FREE[name](x.clone())
    if isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected)


def test_guard_catches_swallowed_syncs_on_exit():
    def swallowing(x):
        try:
            return x.sum().item()
        except Exception:
            return None

    with pytest.raises(HostSyncError, match="_local_scalar_dense"), no_host_sync():
        assert swallowing(torch.ones(3)) is None


def test_guard_is_removed_after_the_block():
    x = torch.ones(3)
    with no_host_sync():
        pass
    assert x.sum().item() == 3.0
    assert x.tolist() == [1.0, 1.0, 1.0]


def naive_clip_grad_norm_(parameters, max_norm):
    """A clip that branches on the norm on the host, as many hand-written loops do."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    if total_norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (total_norm + 1e-6))
    return total_norm


def test_guard_fails_a_syncing_clip(no_cpu_branch):
    params = mixed_params()
    # Outside the guard the naive version is a correct clip ...
    naive, reference = clone_params(params), clone_params(params)
    naive_clip_grad_norm_(naive, 1.0)
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    assert_grads_close(naive, grads_of(reference), rtol=1e-6, atol=1e-9)
    # ... but under it, it is caught: the guard fails on syncs, not on wrong results.
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), no_host_sync():
        naive_clip_grad_norm_(params, 1.0)


def test_cpu_shortcut_syncs_and_is_what_the_monkeypatch_turns_off():
    # With the CPU shortcut on (the default), skipping the scaling pass reads the
    # coefficient on the host: the guard must see it, or it could not see anything.
    assert _sync.branch_on_cpu
    params = mixed_params()
    with pytest.raises(HostSyncError), no_host_sync():
        gradclip.clip_grad_norm_(params, 1.0)


def test_raise_policy_needs_one_sync(no_cpu_branch):
    # Documented: "raise" reads the norm on the host, like torch's error_if_nonfinite.
    params = mixed_params()
    with pytest.raises(HostSyncError), no_host_sync():
        gradclip.clip_grad_norm_(params, 1.0, nonfinite="raise")


# --- the functional API under the guard (accelerator path) ----------------------------------


def test_branch_on_host_switch(monkeypatch):
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert _sync.branch_on_host([cpu, cpu])
    assert not _sync.branch_on_host([cpu, meta])
    monkeypatch.setattr(_sync, "branch_on_cpu", False)
    assert not _sync.branch_on_host([cpu])


@pytest.mark.parametrize("nonfinite", ["ignore", "zero"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [1.0, 1e9], ids=["clips", "no-clip"])
def test_clip_grad_norm_sync_free(no_cpu_branch, max_norm, p, foreach, nonfinite):
    params = mixed_params()
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, max_norm, p, foreach=foreach)
    with no_host_sync():
        total = gradclip.clip_grad_norm_(params, max_norm, p, foreach=foreach, nonfinite=nonfinite)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_zero_policy_sync_free_on_nonfinite(no_cpu_branch, bad):
    params = mixed_params()
    params[3].grad[0, 0] = bad
    agc = clone_params(params)
    with no_host_sync():
        total = gradclip.clip_grad_norm_(params, 1.0, nonfinite="zero")
        agc_total = gradclip.clip_grad_agc_(agc, nonfinite="zero")
    assert not torch.isfinite(total) and not torch.isfinite(agc_total)
    assert_grads_identical(params, [torch.zeros_like(p) for p in params])
    assert_grads_identical(agc, [torch.zeros_like(p) for p in agc])


@pytest.mark.parametrize("p", NORM_TYPES)
def test_get_total_norm_sync_free(no_cpu_branch, p):
    grads = [q.grad for q in mixed_params()]
    with no_host_sync():
        total = gradclip.get_total_norm(grads, p)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(grads, p), rtol=0, atol=0)


@pytest.mark.parametrize("total", [0.5, 1e9])
def test_clip_grads_with_norm_sync_free(no_cpu_branch, total):
    params = mixed_params()
    expected_params = clone_params(params)
    total_norm = torch.tensor(total)
    torch.nn.utils.clip_grads_with_norm_(expected_params, 1.0, total_norm)
    with no_host_sync():
        gradclip.clip_grads_with_norm_(params, 1.0, total_norm)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_sync_free(no_cpu_branch, foreach):
    params = mixed_params()
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_value_(expected_params, 0.5, foreach=foreach)
    with no_host_sync():
        gradclip.clip_grad_value_(params, 0.5, foreach=foreach)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("nonfinite", ["ignore", "zero"])
@pytest.mark.parametrize("clip_factor", [1e-3, 1e3], ids=["clips", "no-clip"])
def test_clip_grad_agc_sync_free(no_cpu_branch, clip_factor, nonfinite):
    params = agc_params(SHAPES, seed=1)
    expected = agc_reference(params, clip_factor)
    expected_total = reference_total_norm(grads_of(params), 2.0)
    with no_host_sync():
        total = gradclip.clip_grad_agc_(params, clip_factor, nonfinite=nonfinite)
    assert_grads_close(params, expected, rtol=1e-5, atol=1e-9)
    assert math.isclose(float(total), expected_total, rel_tol=1e-6)


def test_clip_grad_agc_sync_free_named_and_no_grad(no_cpu_branch):
    params = agc_params(SHAPES, seed=2, no_grad=(2, 5))
    expected = agc_reference(params)
    with no_host_sync():
        gradclip.clip_grad_agc_([(f"p{i}", p) for i, p in enumerate(params)])
    assert_grads_close(params, expected, rtol=1e-5, atol=1e-9)


# --- host-to-device copies -------------------------------------------------------------------
# A blocking copy from the CPU to a device waits for the device's stream. ``meta`` stands in
# for an accelerator: it is not the CPU, and ops on it run without data.

COPYING = {
    "to-device": lambda: torch.arange(3).to("meta"),
    "copy_-to-device": lambda: torch.empty(3, device="meta").copy_(torch.ones(3)),
    "computed-0d-to-device": lambda: torch.ones(3).sum().to("meta"),
    "tensor-of-list-on-device": lambda: torch.tensor([0, 1], device="meta"),
    "as_tensor-of-list-on-device": lambda: torch.as_tensor([0, 1], device="meta"),
    "argsort-index-to-device": lambda: torch.tensor([2, 0, 1]).argsort().to("meta"),
    "device-to-host": lambda: torch.ones(3, device="meta").to("cpu"),
}

COPY_FREE = {
    "python-number-to-device": lambda: torch.tensor(0.5).to("meta"),
    "python-number-on-device": lambda: torch.tensor(2, device="meta"),
    "scalar_tensor-to-device": lambda: torch.scalar_tensor(2.0).to("meta"),
    "cpu-scalar-operand": lambda: torch.ones(3, device="meta") * torch.tensor(2.0),
    "python-scalars": lambda: torch.where(torch.ones(3, device="meta") > 0, 1.0, 0.0) * 2,
    "built-on-device": lambda: torch.stack(torch.arange(4, device="meta").unbind(0)[::-1]),
    "full-on-device": lambda: torch.full((), 0.5, device="meta"),
    "cpu-to-cpu": lambda: torch.ones(3).to(torch.float64).copy_(torch.zeros(3)),
    "list-on-cpu": lambda: torch.tensor([0, 1]).argsort(),
}


@pytest.mark.parametrize("name", list(COPYING))
def test_guard_catches_host_device_copies(name):
    with pytest.raises(HostSyncError, match="copy"), no_host_sync():
        COPYING[name]()


@pytest.mark.parametrize("name", list(COPY_FREE))
def test_guard_allows_python_numbers_and_device_side_construction(name):
    with no_host_sync():
        COPY_FREE[name]()


def test_guard_restores_tensor_factories():
    with no_host_sync():
        pass
    assert torch.tensor([1, 2], device="meta").shape == (2,)
    assert torch.as_tensor([1, 2], device="meta").shape == (2,)


def meta_params(shapes, dtype=torch.float32):
    """Parameters on the meta device: no data, so every op takes the accelerator path."""
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype))
        param.grad = torch.empty(shape, device="meta", dtype=dtype)
        params.append(param)
    return params


# Repeated blocks (weight, bias, weight, bias, ...) interleave shapes, so per-shape work
# comes back in another order than the caller's; plus a large tensor and 0-d scalars.
INTERLEAVED = [*(SHAPE_SETS["linear"] * 3), (), (300, 300), (), (16, 8), (4, 4, 3, 3)]


def assert_meta_scalar(total, dtype=torch.float32):
    assert total.shape == () and total.device.type == "meta" and total.dtype == dtype


@pytest.mark.parametrize("nonfinite", ["ignore", "zero"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_grad_norm_on_meta_copy_free(p, foreach, nonfinite):
    params = meta_params(INTERLEAVED)
    with no_host_sync():
        total = gradclip.clip_grad_norm_(params, 1.0, p, foreach=foreach, nonfinite=nonfinite)
    assert_meta_scalar(total)


def test_clip_grad_norm_on_meta_with_tensor_threshold_copy_free():
    # A threshold tensor on the device is kept a tensor (as torch keeps it), not read.
    params = meta_params(INTERLEAVED)
    with no_host_sync():
        total = gradclip.clip_grad_norm_(params, torch.ones((), device="meta"))
    assert_meta_scalar(total)


def test_clip_grad_norm_float64_on_meta_copy_free():
    params = meta_params(INTERLEAVED, torch.float64) + meta_params([(5,)], torch.bfloat16)
    with no_host_sync():
        total = gradclip.clip_grad_norm_(params, 1.0)
    assert_meta_scalar(total, torch.float64)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_get_total_norm_on_meta_copy_free(p):
    grads = [q.grad for q in meta_params(INTERLEAVED)]
    with no_host_sync():
        assert_meta_scalar(gradclip.get_total_norm(grads, p))


def test_clip_grads_with_norm_on_meta_copy_free():
    params = meta_params(INTERLEAVED)
    with no_host_sync():
        gradclip.clip_grads_with_norm_(params, 1.0, torch.ones((), device="meta"))


@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_on_meta_copy_free(foreach):
    params = meta_params([*INTERLEAVED, (1 << 16,)])  # the one-pass path too
    with no_host_sync():
        gradclip.clip_grad_value_(params, 0.5, foreach=foreach)


@pytest.mark.parametrize("nonfinite", ["ignore", "zero"])
def test_clip_grad_agc_on_meta_copy_free(nonfinite):
    params = meta_params(INTERLEAVED)
    with no_host_sync():  # the first call: nothing is cached yet
        total = gradclip.clip_grad_agc_(params, nonfinite=nonfinite)
    assert_meta_scalar(total)
    with no_host_sync():
        gradclip.clip_grad_agc_(meta_params(INTERLEAVED[::-1]), nonfinite=nonfinite)


def copying_caller_order(units):
    """The permutation as AGC built it before: on the host, then copied to the device."""
    order = [k for u in units for k in u.index]
    return None if order == sorted(order) else torch.tensor(order).argsort()


def test_guard_fails_agc_that_copies_its_permutation(monkeypatch):
    # Outside the guard the copying variant is a correct AGC ...
    params = agc_params(INTERLEAVED, seed=3)
    expected = agc_reference(params)
    monkeypatch.setattr(functional, "caller_order", copying_caller_order)
    gradclip.clip_grad_agc_(params)
    assert_grads_close(params, expected, rtol=1e-5, atol=1e-9)
    # ... but on a device its per-step host-to-device copy is caught.
    with pytest.raises(HostSyncError, match="host-to-device copy"), no_host_sync():
        gradclip.clip_grad_agc_(meta_params(INTERLEAVED))


def test_agc_permutation_is_built_once_per_device_and_order():
    params = agc_params(INTERLEAVED, seed=4)
    units = _agc.unit_clip_factors(params, grads_of(params), 0.01, 1e-3)
    order = [k for u in units for k in u.index]
    inverse = _agc.caller_order(units)
    assert inverse is not None
    assert torch.equal(inverse, torch.tensor(order).argsort())  # the host-built reference
    assert _agc.caller_order(units) is inverse  # cached: no rebuild on the next step


# --- device-side constants -------------------------------------------------------------------


@pytest.mark.parametrize("index", [(3, 0, 2, 1), (5,), (0, 0, 4), ()])
def test_index_on_matches_torch_tensor_and_is_cached(index):
    on_cpu = _sync.index_on(torch.device("cpu"), index)
    torch.testing.assert_close(on_cpu, torch.tensor(index, dtype=torch.int64), rtol=0, atol=0)
    with no_host_sync():
        on_meta = _sync.index_on(torch.device("meta"), index)
    assert on_meta.shape == (len(index),) and on_meta.dtype == torch.int64
    assert _sync.index_on(torch.device("meta"), index) is on_meta


@pytest.mark.parametrize("index", [(3, 0, 2, 2, 1), (0,), ()])
def test_device_side_index_construction_gives_the_values(index):
    # The construction used off the CPU, run on the CPU so its values can be read.
    built = _sync._gather_index(torch.device("cpu"), index)
    torch.testing.assert_close(built, torch.tensor(index, dtype=torch.int64), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_side_values_construction_gives_the_values(dtype):
    values = (0.5, 1 / 3, 2.0, 1e-30)
    built = _sync._fill_values(torch.device("cpu"), dtype, values)
    torch.testing.assert_close(built, torch.tensor(values, dtype=dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_on_matches_torch_tensor_and_is_cached(dtype):
    values = (0.5, 1 / 3, 2.0)
    on_cpu = _sync.values_on(torch.device("cpu"), dtype, values)
    torch.testing.assert_close(on_cpu, torch.tensor(values, dtype=dtype), rtol=0, atol=0)
    with no_host_sync():
        on_meta = _sync.values_on(torch.device("meta"), dtype, values)
    assert on_meta.shape == (3,) and on_meta.dtype == dtype
    assert _sync.values_on(torch.device("meta"), dtype, values) is on_meta
