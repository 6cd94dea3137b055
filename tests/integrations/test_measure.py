"""Clipper.measure_(): the clip's scale and state update without touching the gradients.

The reference is the same clipper's clip_() on a copy of the gradients: measure_()
must leave the gradients alone, advance the state exactly as clip_() does, and
return the exact factor clip_() multiplied the gradients by.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.base import Clipper, GroupResult
from gradclip.clippers.fixed import NoClip, NormClip
from gradclip.clippers.value import ValueClip
from gradclip.nonfinite import NonFiniteGradientError


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN included."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    )


class OwnScaling(NormClip):
    """A global-norm strategy that applies its own scaling: measure_ cannot know it."""

    def _clip_group(self, group, state, grads, norms) -> GroupResult:  # type: ignore[no-untyped-def]
        return super()._clip_group(group, state, grads, norms)


def params_with_grads(seed: int, scale: float = 1.0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(5, 3), (3,), (4, 4)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=gen) * scale
        out.append(p)
    return out


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    spread = 10.0 ** (step % 5 - 2)  # norms from about 0.03 to 300
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * spread
    if step == 6:
        params[1].grad[0] = math.nan


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: NormClip(ps, max_norm=1.0),
        lambda ps: AutoClip(ps, percentile=30, history="full"),
        lambda ps: NoClip(ps),
    ],
    ids=["norm", "autoclip", "none"],
)
def test_measure_matches_clip(make) -> None:  # type: ignore[no-untyped-def]
    measured, clipped = params_with_grads(0), params_with_grads(0)
    a, b = make(measured), make(clipped)
    assert a.foldable
    for step in range(10):
        set_grads(measured, step)
        set_grads(clipped, step)
        raw = [p.grad.clone() for p in measured]
        sa, sb = a.measure_(), b.clip_()
        assert all(same(p.grad, r) for p, r in zip(measured, raw))  # untouched
        for f in ("total_norm", "threshold", "clipped_norm", "clipped", "finite", "step", "norms"):
            assert same(getattr(sa, f), getattr(sb, f)), f
        if bool(sa.finite):
            # The exact factor clip_() applied (the stats of clip_ give clipped/total).
            for p, q in zip(measured, clipped):
                assert torch.equal(p.grad * sa.scale, q.grad)
            torch.testing.assert_close(sa.scale, sb.scale)
    assert a.step == b.step == 10
    for x, y in zip(a.state_dict()["state"], b.state_dict()["state"]):
        for key in x:
            assert same(torch.as_tensor(x[key]), torch.as_tensor(y[key]))


def test_grad_scale_divides_the_norms() -> None:
    plain, scaled = params_with_grads(1), params_with_grads(1)
    for p in scaled:
        p.grad *= 2.0**12
    a, b = AutoClip(plain, percentile=50), AutoClip(scaled, percentile=50)
    for _ in range(3):
        sa = a.measure_()
        sb = b.measure_(grad_scale=torch.tensor(2.0**12))
    for f in ("total_norm", "threshold", "scale", "clipped_norm", "norms"):
        assert torch.equal(getattr(sa, f), getattr(sb, f)), f


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: ValueClip(ps, 0.1), "ValueClip with 1 parameter group"),
        (lambda ps: OwnScaling(ps, 1.0), "OwnScaling with 1 parameter group"),
        (
            lambda ps: NormClip([{"params": ps[:1]}, {"params": ps[1:]}], 1.0),
            "NormClip with 2 parameter group",
        ),
        (lambda ps: NormClip(ps, 1.0, nonfinite="zero"), "nonfinite='zero'"),
    ],
    ids=["value", "own-scaling", "two-groups", "zero-policy"],
)
def test_unfoldable_clippers_refuse_to_measure(make, match: str) -> None:  # type: ignore[no-untyped-def]
    params = params_with_grads(2)
    clipper: Clipper = make(params)
    raw = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=match):
        clipper.measure_()
    assert clipper.step == 0
    assert all(torch.equal(p.grad, r) for p, r in zip(params, raw))


def test_measure_raise_policy_changes_nothing() -> None:
    params = params_with_grads(3)
    clipper = AutoClip(params, percentile=50, nonfinite="raise")
    clipper.measure_()
    state = clipper.state_dict()
    params[0].grad[0, 0] = math.inf
    with pytest.raises(NonFiniteGradientError, match=r"params\[0\]"):
        clipper.measure_()
    assert clipper.step == 1
    for x, y in zip(state["state"], clipper.state_dict()["state"]):
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key]))
