"""clip_grad_agc_ against a slow per-unit reference written from the formula.

ALGORITHMS.md, AGC (Brock et al. 2021): for each unit i (dim-0 slice of a tensor with
ndim >= 2; the whole tensor otherwise)::

    ‖W_i‖* = max(‖W_i‖, eps)
    if ‖G_i‖ / ‖W_i‖* > λ:  G_i ← λ · ‖W_i‖* / max(‖G_i‖, 1e-6) · G_i
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import gradclip
from gradclip import _agc
from helpers import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    agc_params,
    agc_reference,
    assert_grads_close,
    assert_grads_identical,
    clone_params,
    grads_of,
    reference_total_norm,
    tolerance,
    unit_ratios,
    units_of,
)


def check_against_reference(params, clip_factor=0.01, eps=1e-3, *, expect_mixed=True, **kw):
    """Run clip_grad_agc_ and compare with the reference; return the returned norm."""
    before = grads_of(params)
    expected = agc_reference(params, clip_factor, eps)
    if expect_mixed:  # the data must exercise both branches, or the test proves little
        changed = [
            not torch.equal(e[i], b[i])
            for e, b in zip(expected, before)
            if e is not None
            for i in units_of(e)
        ]
        assert any(changed) and not all(changed), "test data should clip some units, not all"
    total = gradclip.clip_grad_agc_(params, clip_factor, eps, **kw)
    for param, exp in zip(params, expected):
        if exp is None:
            assert param.grad is None
            continue
        rtol, atol = tolerance(exp.dtype)
        if exp.dtype == torch.float32:
            rtol, atol = 1e-5, 1e-9
        torch.testing.assert_close(param.grad, exp, rtol=rtol, atol=atol)
    # The return value is the pre-clip global L2 norm of the gradients.
    present = [b for b in before if b is not None]
    half = any(b.dtype in HALF_DTYPES for b in present)
    exact = all(b.dtype == torch.float64 for b in present)
    rel = 1e-12 if exact else 1e-5
    assert math.isclose(float(total), reference_total_norm(present, 2.0), rel_tol=rel)
    if present and not half:
        expected_total = torch.nn.utils.get_total_norm(present)
        torch.testing.assert_close(total, expected_total, rtol=rel, atol=0)
    return total


# --- module weights ------------------------------------------------------------------------

MODULES = {
    "linear": lambda: torch.nn.Linear(20, 12),
    "conv1d": lambda: torch.nn.Conv1d(3, 8, 5),
    "conv2d": lambda: torch.nn.Conv2d(4, 6, 3),
    "conv2d-1x1": lambda: torch.nn.Conv2d(5, 16, 1, bias=False),
}


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, *HALF_DTYPES])
@pytest.mark.parametrize("name", list(MODULES))
def test_agc_module_weights_and_biases(name, dtype):
    module = MODULES[name]().to(dtype)
    shapes = [tuple(p.shape) for p in module.parameters()]
    synthetic = agc_params(shapes, dtype, seed=len(name))
    with torch.no_grad():
        for p, s in zip(module.parameters(), synthetic):
            p.copy_(s)
            p.grad = s.grad.clone()
    if dtype in (torch.float32, torch.float64):
        # Per-unit scales: the weight of a module's parameters has several units.
        check_against_reference(list(module.parameters()))
    else:
        check_against_reference(list(module.parameters()), expect_mixed=False)


def test_agc_after_real_backward():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 5)
    )
    model(torch.randn(2, 3, 4, 4)).pow(2).sum().mul(100).backward()
    check_against_reference(list(model.parameters()), clip_factor=0.05, expect_mixed=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shapes",
    [
        [(12, 7)],  # one matrix: rows
        [(6, 3, 5)],  # Conv1d weight
        [(6, 3, 2, 2)],  # Conv2d weight
        [(30,)],  # a bias: one unit
        [(30,), (40,)],
        [(), (5, 5)],  # a 0-d scalar: one unit
    ],
    ids=["matrix", "conv1d", "conv2d", "bias", "biases", "scalar"],
)
def test_agc_single_tensors(shapes, dtype):
    # With one unit per tensor, whether it clips depends on the seed; use λ between
    # the units' ratios so the data is mixed.
    params = agc_params(shapes, dtype, seed=1)
    ratios = sorted(unit_ratios(params))
    clip_factor = math.sqrt(ratios[0] * ratios[-1]) if len(ratios) > 1 else ratios[0] / 2
    check_against_reference(params, clip_factor, expect_mixed=len(ratios) > 1)


# --- the stacked path and mixes ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.bfloat16])
@pytest.mark.parametrize(
    "shapes",
    [
        [(4, 4)] * 12,
        [(16,)] * 12,
        [(3, 2, 2)] * 8,
        [()] * 10,
        [(5, 3)] * 6 + [(3,)] * 6,
    ],
    ids=["matrices", "vectors", "conv", "scalars", "matrices-and-vectors"],
)
def test_agc_many_same_shaped_small_tensors(shapes, dtype):
    assert math.prod(shapes[0]) <= _agc.STACK_MAX_NUMEL  # the stacked path
    params = agc_params(shapes, dtype, seed=2)
    ratios = sorted(unit_ratios(params))
    clip_factor = ratios[len(ratios) // 2]  # the median: about half the units clip
    check_against_reference(params, clip_factor, expect_mixed=dtype != torch.bfloat16)


def test_agc_stack_threshold_boundary():
    n = math.isqrt(_agc.STACK_MAX_NUMEL)
    assert n * n == _agc.STACK_MAX_NUMEL
    # Exactly at the limit (stacked) and just above it (one tensor at a time).
    params = agc_params([(n, n), (n, n), (n + 1, n), (n + 1, n)], seed=3)
    check_against_reference(params)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_agc_interleaved_mix_with_no_grad_and_names(dtype):
    shapes = [(6, 4), (4,), (6, 4), (), (3, 2, 2, 2), (4,), (), (6, 4), (9,)]
    params = agc_params(shapes, dtype, seed=4, no_grad=(5,))
    named = clone_params(params)  # the same starting gradients, passed as named pairs
    expected = agc_reference(params)
    plain_total = check_against_reference(params)  # plain tensors against the reference
    named_total = gradclip.clip_grad_agc_([(f"p{i}", p) for i, p in enumerate(named)])
    rtol, atol = (1e-5, 1e-9) if dtype == torch.float32 else tolerance(dtype)
    assert_grads_close(named, expected, rtol=rtol, atol=atol)
    # Names only label the parameters: the same computation, bit for bit.
    assert_grads_identical(named, grads_of(params))
    torch.testing.assert_close(named_total, plain_total, rtol=0, atol=0)


# --- complex parameters ---------------------------------------------------------------------


def complex_agc_params(shapes, dtype, *, seed):
    """Complex parameters and gradients; each unit's gradient scaled by 10^U(-4, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(shape):
        parts = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
        return torch.complex(*parts)

    params = []
    for shape in shapes:
        param = torch.nn.Parameter(draw(shape).to(dtype))
        unit_shape = (shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 else ()
        scale = 10.0 ** (torch.rand(unit_shape, generator=gen, dtype=torch.float64) * 4 - 4)
        param.grad = (draw(shape) * scale).to(dtype)
        params.append(param)
    return params


def complex_agc_reference(params, clip_factor=0.01, eps=1e-3):
    """AGC with norms of the moduli, one unit at a time in complex128."""
    out = []
    for p in params:
        w, g = p.detach().to(torch.complex128), p.grad.to(torch.complex128).clone()
        for i in units_of(g):
            w_norm = max(math.sqrt(float((w[i].abs() ** 2).sum())), eps)
            g_norm = math.sqrt(float((g[i].abs() ** 2).sum()))
            if g_norm / w_norm > clip_factor:
                g[i] = clip_factor * w_norm / max(g_norm, 1e-6) * g[i]
        out.append(g.to(p.grad.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_agc_complex_uses_the_norms_of_the_moduli(dtype):
    shapes = [(6, 4), (4,), (6, 4), (), (3, 2, 2), (4,), (), (300, 300)]
    params = complex_agc_params(shapes, dtype, seed=11)
    moduli = [p.grad.abs().double() for p in params]
    expected = complex_agc_reference(params)
    changed = [not torch.equal(e, p.grad) for e, p in zip(expected, params)]
    assert any(changed) and not all(changed), "test data should clip some tensors, not all"
    total = gradclip.clip_grad_agc_(params)
    rtol, atol = (1e-5, 1e-9) if dtype == torch.complex64 else (1e-12, 1e-14)
    assert_grads_close(params, expected, rtol=rtol, atol=atol)
    assert not total.is_complex()
    assert math.isclose(float(total), reference_total_norm(moduli, 2.0), rel_tol=rtol)


def test_agc_mixed_dtypes():
    shapes = [(6, 4), (6, 4), (4,), (4,), (), (5, 3)]
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float32,
        torch.bfloat16,
        torch.float64,
        torch.float16,
    ]
    params = agc_params(shapes, dtypes, seed=5)
    check_against_reference(params)


def test_agc_defaults_are_paper_values():
    params = agc_params([(8, 8), (8,)], seed=6)
    expected = agc_reference(params, 0.01, 1e-3)
    gradclip.clip_grad_agc_(params)
    assert_grads_close(params, expected, rtol=1e-5, atol=1e-9)


def test_agc_zero_weights_use_eps_floor():
    params = agc_params([(5, 3), (5,)], seed=7, zero_weight=(0, 1))
    check_against_reference(params, clip_factor=0.01, eps=1e-3, expect_mixed=False)
    # Every unit is capped at λ·eps.
    for r in unit_ratios(params, eps=1e-3):
        assert r <= 0.01 * (1 + 1e-5)
    eps_zero = agc_params([(5, 3)], seed=8, zero_weight=(0,))
    check_against_reference(eps_zero, clip_factor=0.01, eps=0.0, expect_mixed=False)
    assert_grads_identical(eps_zero, [torch.zeros(5, 3)])


def test_agc_empty_tensors():
    # Stacked groups of empty tensors: zero-row matrices give a stack of no factors.
    shapes = [(0,), (0,), (2, 0), (2, 0), (0, 3), (0, 5), (0, 5), (0, 5), (8, 3)]
    params = agc_params(shapes, seed=10)
    twins = clone_params(params)
    check_against_reference(params)
    gradclip.AGC(twins, 0.01).clip_()  # the clipper's path (its factor buffers) too
    assert_grads_identical(twins, grads_of(params))


def test_agc_zero_gradients_stay_zero():
    params = agc_params([(4, 3), (3,), ()], seed=9)
    for p in params:
        p.grad.zero_()
    total = gradclip.clip_grad_agc_(params)
    torch.testing.assert_close(total, torch.tensor(0.0), rtol=0, atol=0)
    assert_grads_identical(params, [torch.zeros_like(p) for p in params])


def test_agc_empty_and_no_grads():
    torch.testing.assert_close(gradclip.clip_grad_agc_([]), torch.tensor(0.0), rtol=0, atol=0)
    params = agc_params([(3,), (2, 2)], no_grad=(0, 1))
    torch.testing.assert_close(gradclip.clip_grad_agc_(params), torch.tensor(0.0), rtol=0, atol=0)


# --- properties ----------------------------------------------------------------------------

shape_st = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)
agc_st = st.fixed_dictionaries(
    {
        # Repeating shapes exercises the stacked path.
        "shapes": st.lists(st.sampled_from([(), (3,), (4, 2)]) | shape_st, min_size=1, max_size=6),
        "seed": st.integers(0, 2**31 - 1),
        "dtype": st.sampled_from(FLOAT_DTYPES),
    }
)


@given(spec=agc_st, clip_factor=st.floats(1e-3, 1.0))
def test_property_agc_matches_reference_and_bounds_units(spec, clip_factor):
    params = agc_params(spec["shapes"], spec["dtype"], seed=spec["seed"])
    before = grads_of(params)
    check_against_reference(params, clip_factor, expect_mixed=False)
    for r in unit_ratios(params):
        assert r <= clip_factor * (1 + 1e-5)
    # Each unit is a multiple in (0, 1] of what it was: its direction is preserved.
    for p, b in zip(params, before):
        for i in units_of(b):
            a, o = p.grad[i].double().reshape(-1), b[i].double().reshape(-1)
            if o.abs().sum() == 0:
                continue
            c = float(a.dot(o) / o.dot(o))
            assert 0 < c <= 1 + 1e-6
            torch.testing.assert_close(a, c * o, rtol=1e-5, atol=1e-12)


@given(spec=agc_st, clip_factor=st.floats(1e-3, 1.0))
def test_property_agc_idempotent(spec, clip_factor):
    params = agc_params(spec["shapes"], spec["dtype"], seed=spec["seed"])
    gradclip.clip_grad_agc_(params, clip_factor)
    once = grads_of(params)
    gradclip.clip_grad_agc_(params, clip_factor)
    assert_grads_close(params, once, rtol=1e-5, atol=1e-12)
