"""The clippers' ``norm_kernel``: which kernel each strategy uses, and what that gives.

The adaptive strategies (thresholds from norm statistics) default to the blocked kernel,
faster and more accurate on large CPU tensors; the strategies that stand in for torch's
functions keep torch's kernel, bit for bit. Gradients here have tensors of at least
``BLOCKED_MIN_NUMEL`` elements, where the two kernels differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import gradclip
from gradclip import AGC, AdaGC, AutoClip, EMARatio, NoClip, NormClip, ValueClip, ZClip
from gradclip.clippers.base import Clipper
from gradclip.norms import BLOCKED_MIN_NUMEL, tensor_norms
from gradclip.spec import from_spec
from helpers import make_params
from sync_guard import no_host_sync

MakeClipper = Callable[..., Clipper]

ADAPTIVE: dict[str, MakeClipper] = {
    "zclip": lambda p, **kw: ZClip(p, warmup_steps=2, **kw),
    "autoclip": lambda p, **kw: AutoClip(p, 10, **kw),
    "emaratio": lambda p, **kw: EMARatio(p, warmup_steps=1, **kw),
    "emaratio-per-tensor": lambda p, **kw: EMARatio(p, per_tensor=True, warmup_steps=1, **kw),
    "adagc": lambda p, **kw: AdaGC(p, warmup_steps=1, **kw),
}

TORCH_KERNEL: dict[str, MakeClipper] = {
    "norm": lambda p: NormClip(p, 1.0),
    "noclip": lambda p: NoClip(p),
    "value": lambda p: ValueClip(p, 0.1),
    "agc": lambda p: AGC(p),
}

# Two tensors above the blocked kernel's threshold (one with a leftover row), small ones.
SHAPES = [(300, 400), (16,), (BLOCKED_MIN_NUMEL + 5,), (8, 8), (8, 8), (8, 8), (8, 8)]


def large_params(seed: int = 0, scale: float = 1e-3) -> list[torch.nn.Parameter]:
    return make_params(SHAPES, seed=seed, grad_scale=scale)


def float64_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.double().norm() for g in grads])


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_adaptive_strategies_default_to_the_blocked_kernel(name: str) -> None:
    clipper = ADAPTIVE[name](large_params())
    assert clipper.norm_kernel == type(clipper).default_norm_kernel == "blocked"
    for kernel in ("torch", "blocked"):
        assert ADAPTIVE[name](large_params(), norm_kernel=kernel).norm_kernel == kernel


@pytest.mark.parametrize("name", list(TORCH_KERNEL))
def test_strategies_that_stand_in_for_torch_keep_its_kernel(name: str) -> None:
    assert TORCH_KERNEL[name](large_params()).norm_kernel == "torch"


@pytest.mark.parametrize("bad", ["fast", "Blocked", 1])
@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_an_unknown_norm_kernel_fails_at_construction(name: str, bad: Any) -> None:
    match = rf"norm_kernel must be one of 'torch', 'blocked'; got {bad!r}"
    with pytest.raises(ValueError, match=match):
        ADAPTIVE[name](large_params(), norm_kernel=bad)


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_torch_kernel_is_bit_identical_to_torch_nn_utils(name: str) -> None:
    params = large_params()
    grads = [p.grad.clone() for p in params]
    stats = ADAPTIVE[name](params, norm_kernel="torch").clip_()
    assert torch.equal(stats.total_norm, torch.nn.utils.get_total_norm(grads))
    assert torch.equal(stats.norms, torch.stack(torch._foreach_norm(grads)))


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_blocked_kernel_norms_are_within_1e_6_and_small_ones_are_torchs(name: str) -> None:
    # With 1M elements torch's CPU kernel is off by about 1e-5: only the blocked one passes.
    params = [*large_params(), *make_params([(1 << 20,)], seed=1, grad_scale=1e-3)]
    grads = [p.grad.clone() for p in params]
    stats = ADAPTIVE[name](params).clip_()
    errors = (stats.norms.double() / float64_norms(grads) - 1.0).abs()
    assert bool((errors <= 1e-6).all()), errors
    small = [i for i, g in enumerate(grads) if g.numel() < BLOCKED_MIN_NUMEL]
    expected = torch.stack(torch._foreach_norm([grads[i] for i in small]))
    assert torch.equal(stats.norms[small], expected)
    assert torch.equal(stats.norms, tensor_norms(grads, kernel="blocked"))
    reference = torch.cat([g.double().flatten() for g in grads]).norm()
    assert abs(float(stats.total_norm) / float(reference) - 1.0) <= 1e-6


@pytest.mark.parametrize("name", ["zclip", "autoclip", "emaratio", "adagc"])
def test_the_kernel_is_not_state_and_specs_get_the_class_default(name: str) -> None:
    blocked = ADAPTIVE[name](large_params())
    blocked.clip_()
    state = blocked.state_dict()
    assert "norm_kernel" not in repr(state)
    torch_kernel = ADAPTIVE[name](large_params(), norm_kernel="torch")
    torch_kernel.load_state_dict(state)
    assert torch_kernel.norm_kernel == "torch" and torch_kernel.step == 1
    torch_kernel.clip_()
    assert from_spec(name, large_params()).norm_kernel == "blocked"
    assert from_spec(name, large_params(), norm_kernel="torch").norm_kernel == "torch"


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_blocked_kernel_makes_no_host_sync(no_cpu_branch: None, name: str) -> None:
    params = large_params()
    clipper = ADAPTIVE[name](params)
    for seed in range(4):
        for p, fresh in zip(params, large_params(seed, scale=10.0**seed)):
            p.grad = fresh.grad
        with no_host_sync():
            clipper.clip_()


def test_a_large_sparse_gradient_is_still_named() -> None:
    params = large_params()
    clipper = ZClip([(f"layer{i}", p) for i, p in enumerate(params)], warmup_steps=1)
    clipper.clip_()
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(TypeError, match=r"gradient of layer0 has layout torch\.sparse_coo"):
        clipper.clip_()
    assert clipper.step == 1


def test_clip_grad_norm_and_get_total_norm_keep_torchs_kernel() -> None:
    """The functional drop-ins have no kernel option: they stay bit-identical to torch."""
    ours, theirs = large_params(), large_params()
    total = gradclip.clip_grad_norm_(ours, 1e-3)
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(theirs, 1e-3))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    grads = [p.grad for p in large_params()]
    assert torch.equal(gradclip.get_total_norm(grads), torch.nn.utils.get_total_norm(grads))
