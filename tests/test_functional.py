"""clip_grad_norm_, clip_grads_with_norm_, clip_grad_value_: torch parity and properties."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import gradclip
from gradclip import functional
from helpers import (
    FLOAT_DTYPES,
    FOREACH,
    HALF_DTYPES,
    NORM_TYPES,
    SHAPE_SETS,
    assert_grads_close,
    assert_grads_identical,
    clone_params,
    flat64,
    grads_of,
    make_params,
    reference_total_norm,
    tolerance,
)

# Shape sets without empty tensors, whose inf-norm is an error in torch and here.
NONEMPTY_SETS = {k: v for k, v in SHAPE_SETS.items() if k != "with-empty"}


def nonempty_if_inf(shapes, p):
    return [s for s in shapes if math.prod(s) > 0] if math.isinf(p) else shapes


# --- clip_grad_norm_: differential against torch -------------------------------------------


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6], ids=["zero", "clips", "no-clip"])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS.values()), ids=list(SHAPE_SETS))
def test_clip_grad_norm_bit_identical_to_torch(shapes, dtype, p, foreach, max_norm):
    shapes = nonempty_if_inf(shapes, p)
    params = make_params(shapes, dtype, grad_scale=2.0)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, max_norm, p, foreach=foreach)
    actual = gradclip.clip_grad_norm_(params, max_norm, p, foreach=foreach)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("branch", [True, False], ids=["cpu-branch", "branch-free"])
@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_grad_norm_both_paths_match_torch(monkeypatch, branch, p):
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", branch)
    for max_norm in (0.3, 1e4):
        params = make_params(SHAPE_SETS["mlp"], seed=3)
        expected_params = clone_params(params)
        expected = torch.nn.utils.clip_grad_norm_(expected_params, max_norm, p)
        actual = gradclip.clip_grad_norm_(params, max_norm, p)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_norm_single_tensor(dtype):
    (param,) = make_params([(6, 5)], dtype, grad_scale=3.0)
    (expected_param,) = clone_params([param])
    expected = torch.nn.utils.clip_grad_norm_(expected_param, 1.0)
    actual = gradclip.clip_grad_norm_(param, 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical([param], [expected_param.grad])


@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_grad_norm_named_parameters_and_no_grad(p):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m[0].bias.requires_grad_(False)  # a parameter without a gradient
    x = torch.randn(4, 5)
    model(x).pow(2).sum().mul(10).backward()
    reference(x).pow(2).sum().mul(10).backward()
    assert model[0].bias.grad is None
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, p)
    actual = gradclip.clip_grad_norm_(model.named_parameters(), 0.5, p)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(list(model.parameters()), grads_of(list(reference.parameters())))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_grad_norm_mixed_fp32_fp64_bit_identical(p, foreach):
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    params = make_params([(8, 4), (8,), (3, 3), ()], dtypes, grad_scale=2.0)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 0.7, p, foreach=foreach)
    actual = gradclip.clip_grad_norm_(params, 0.7, p, foreach=foreach)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_clip_grad_norm_interleaved_dtypes_bit_identical(p, seed):
    # Ten interleaved float32/float64 gradients: the total is summed in torch's order.
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float64] * 2
    params = make_params([(5,)] * len(dtypes), dtypes, seed=seed, grad_scale=3.0)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 0.7, p)
    actual = gradclip.clip_grad_norm_(params, 0.7, p)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_clip_grad_norm_half_close_to_torch_and_reference(dtype, p, foreach):
    params = make_params(SHAPE_SETS["linear"] + SHAPE_SETS["scalars"], dtype, grad_scale=0.5)
    originals = grads_of(params)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 0.25, p, foreach=foreach)
    actual = gradclip.clip_grad_norm_(params, 0.25, p, foreach=foreach)
    assert actual.dtype == torch.float32  # documented: fp32 norm for half gradients
    reference = reference_total_norm(originals, p)
    assert math.isclose(float(actual), reference, rel_tol=1e-5)
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual, expected.float(), rtol=rtol, atol=atol)
    assert_grads_close(params, grads_of(expected_params), rtol=rtol, atol=atol)
    # Against the exact float64 computation rounded once to the half dtype.
    coef = min(1.0, 0.25 / (reference + 1e-6))
    exact = [(g.double() * coef).to(dtype) for g in originals]
    assert_grads_close(params, exact, rtol=tolerance(dtype)[0] / 2, atol=atol / 10)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_grad_norm_mixed_with_half(p):
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float32]
    params = make_params([(8, 8), (8,), (4, 4), (4,)], dtypes)
    originals = grads_of(params)
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_norm_(expected_params, 0.1, p)
    actual = gradclip.clip_grad_norm_(params, 0.1, p)
    assert actual.dtype == torch.float32
    assert math.isclose(float(actual), reference_total_norm(originals, p), rel_tol=1e-5)
    assert_grads_close(params, grads_of(expected_params), rtol=1.6e-2, atol=1e-3)


def test_clip_grad_norm_empty_list_and_no_grads():
    torch.testing.assert_close(gradclip.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    params = make_params([(3,), (2, 2)], no_grad=(0, 1))
    result = gradclip.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(result, torch.nn.utils.clip_grad_norm_(params, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(result, torch.tensor(0.0), rtol=0, atol=0)


@pytest.mark.parametrize("branch", [True, False], ids=["cpu-branch", "branch-free"])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_clip_grad_norm_tensor_max_norm_same_as_float(monkeypatch, branch, shape):
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", branch)
    params = make_params(SHAPE_SETS["linear"], grad_scale=4.0)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 0.5)
    actual = gradclip.clip_grad_norm_(params, torch.full(shape, 0.5))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


def test_clip_grad_norm_tensor_max_norm_is_not_read_off_the_host(monkeypatch):
    # Where reading the threshold would be a host sync, it is not read: a negative
    # threshold tensor then acts as torch's does (a negative coefficient), instead of
    # raising; on the CPU it is checked (test_params).
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", False)
    params = make_params(SHAPE_SETS["linear"], grad_scale=4.0)
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_norm_(expected_params, torch.tensor(-0.5))
    gradclip.clip_grad_norm_(params, torch.tensor(-0.5))
    assert_grads_identical(params, grads_of(expected_params))


def test_clip_grad_norm_equals_get_total_norm_then_clip_grads_with_norm():
    params = make_params(SHAPE_SETS["conv"], grad_scale=3.0)
    other = clone_params(params)
    returned = gradclip.clip_grad_norm_(params, 0.5)
    total = gradclip.get_total_norm([p.grad for p in other])
    gradclip.clip_grads_with_norm_(other, 0.5, total)
    torch.testing.assert_close(returned, total, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(other))


def test_foreach_true_on_device_without_fused_kernels_raises_like_torch():
    param = torch.nn.Parameter(torch.zeros(3, device="meta"))
    param.grad = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        torch.nn.utils.clip_grad_norm_([param], 1.0, foreach=True)
    with pytest.raises(RuntimeError, match="foreach=True"):
        gradclip.clip_grad_norm_([param], 1.0, foreach=True)
    with pytest.raises(RuntimeError, match="foreach=True"):
        gradclip.clip_grad_value_([param], 1.0, foreach=True)


# --- clip_grads_with_norm_ -----------------------------------------------------------------


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, *HALF_DTYPES])
@pytest.mark.parametrize("total", [0.0, 0.3, 1.0, 7.5, float("inf"), float("nan")])
def test_clip_grads_with_norm_bit_identical_to_torch(total, dtype, foreach):
    params = make_params(SHAPE_SETS["mlp"] + SHAPE_SETS["scalars"], dtype)
    expected_params = clone_params(params)
    total_norm = torch.tensor(total)
    torch.nn.utils.clip_grads_with_norm_(expected_params, 1.0, total_norm, foreach=foreach)
    result = gradclip.clip_grads_with_norm_(params, 1.0, total_norm, foreach=foreach)
    assert result is None
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grads_with_norm_named_single_and_no_grad(dtype):
    params = make_params([(4, 3), (4,), (2,)], dtype, no_grad=(1,))
    expected_params = clone_params(params)
    total = torch.tensor(5.0, dtype=dtype)
    torch.nn.utils.clip_grads_with_norm_(expected_params, 2.0, total)
    gradclip.clip_grads_with_norm_([(f"p{i}", p) for i, p in enumerate(params)], 2.0, total)
    assert_grads_identical(params, grads_of(expected_params))
    torch.nn.utils.clip_grads_with_norm_(expected_params[0], 2.0, total)
    gradclip.clip_grads_with_norm_(params[0], 2.0, total)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize(
    ("total_norm", "pattern"),
    [
        (5.0, "total_norm must be a one-element Tensor .*; got float"),
        (None, "total_norm must be a one-element Tensor .*; got NoneType"),
        (torch.tensor([1.0, 2.0]), r"total_norm must be a one-element Tensor; got shape \(2,\)"),
        (torch.zeros(0), r"total_norm must be a one-element Tensor; got shape \(0,\)"),
        (torch.tensor(True), "total_norm must be a real Tensor; got dtype torch.bool"),
        (torch.tensor(1 + 1j), "total_norm must be a real Tensor; got dtype torch.complex64"),
    ],
    ids=["float", "none", "two-elements", "empty", "bool", "complex"],
)
def test_clip_grads_with_norm_checks_total_norm_first(total_norm, pattern):
    params = make_params([(3,), (2, 2)], grad_scale=10.0)
    before = grads_of(params)
    with pytest.raises(TypeError, match=pattern):
        gradclip.clip_grads_with_norm_(params, 1.0, total_norm)
    assert_grads_identical(params, before)


def test_torch_clip_grads_with_norm_fails_late_on_a_bad_total():
    # Why the check comes first: torch fails only in its multiply (after any earlier
    # device group was scaled), with a message that does not name the argument.
    params = make_params([(3,)], grad_scale=10.0)
    with pytest.raises(RuntimeError, match="scalar tensor expected"):
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_clip_grads_with_norm_one_element_total_same_as_0d(shape):
    params = make_params(SHAPE_SETS["mlp"], grad_scale=2.0)
    expected_params = clone_params(params)
    torch.nn.utils.clip_grads_with_norm_(expected_params, 1.0, torch.tensor(7.5))
    gradclip.clip_grads_with_norm_(params, 1.0, torch.full(shape, 7.5))
    assert_grads_identical(params, grads_of(expected_params))


# --- complex gradients: clipped by the norm of their moduli, as torch does ------------------

COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def complex_params(shapes, dtype, *, seed=0, grad_scale=1.0):
    """Parameters with random complex weights and gradients (both parts random)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(shape):
        real = torch.randn(shape, generator=gen, dtype=torch.float64)
        return torch.complex(real, torch.randn(shape, generator=gen, dtype=torch.float64))

    params = []
    for shape in shapes:
        param = torch.nn.Parameter(draw(shape).to(dtype))
        param.grad = draw(shape).mul(grad_scale).to(dtype)
        params.append(param)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_clip_grad_norm_complex_bit_identical_to_torch(dtype, p, foreach, max_norm):
    shapes = [*SHAPE_SETS["mlp"], *SHAPE_SETS["many-same"], *SHAPE_SETS["large"], ()]
    params = complex_params(shapes, dtype, grad_scale=2.0)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, max_norm, p, foreach=foreach)
    actual = gradclip.clip_grad_norm_(params, max_norm, p, foreach=foreach)
    assert actual.dtype == expected.dtype and not actual.is_complex()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("branch", [True, False], ids=["cpu-branch", "branch-free"])
def test_clip_grad_norm_complex_mixed_with_real(monkeypatch, branch):
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", branch)
    params = [
        *complex_params([(4, 3), (3,)], torch.complex64, seed=1, grad_scale=3.0),
        *make_params([(5,), (2, 2)], seed=2, grad_scale=3.0),
        *complex_params([(6,)], torch.complex128, seed=3),
    ]
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 1.0)
    actual = gradclip.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))
    # The clipped gradients, moduli and all, have total norm 1 (up to torch's 1e-6).
    moduli = [p.grad.abs() for p in params]
    assert math.isclose(reference_total_norm(moduli, 2.0), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_clip_grads_with_norm_complex_bit_identical_to_torch(dtype):
    params = complex_params(SHAPE_SETS["conv"], dtype, grad_scale=2.0)
    expected_params = clone_params(params)
    total = torch.nn.utils.get_total_norm([p.grad for p in expected_params])
    torch.nn.utils.clip_grads_with_norm_(expected_params, 0.5, total)
    gradclip.clip_grads_with_norm_(params, 0.5, gradclip.get_total_norm([p.grad for p in params]))
    assert_grads_identical(params, grads_of(expected_params))


def test_clip_grad_value_refuses_complex_like_torch():
    # Clamping a complex number is undefined; torch's kernels raise, and so do gradclip's.
    (param,) = complex_params([(3,)], torch.complex64)
    with pytest.raises(NotImplementedError, match="complex"):
        torch.nn.utils.clip_grad_value_([param], 1.0)
    with pytest.raises(NotImplementedError, match="complex"):
        gradclip.clip_grad_value_([param], 1.0)


# --- clip_grad_value_ ----------------------------------------------------------------------

VALUE_SHAPES = {
    **SHAPE_SETS,
    # Above and below functional.VALUE_ONE_PASS_MIN_NUMEL: both clamping paths at once.
    "one-pass-and-fused": [(1 << 16,), (300, 300), (5, 5), ()],
}


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, *HALF_DTYPES])
@pytest.mark.parametrize("shapes", list(VALUE_SHAPES.values()), ids=list(VALUE_SHAPES))
def test_clip_grad_value_bit_identical_to_torch(shapes, dtype, foreach):
    params = make_params(shapes, dtype, grad_scale=2.0)
    for p in params:  # NaN and ±inf elements are clamped (inf) or kept (NaN) like torch
        if p.grad.numel() >= 3:
            flat = p.grad.view(-1)
            flat[0], flat[1], flat[2] = float("nan"), float("inf"), -float("inf")
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_value_(expected_params, 0.75, foreach=foreach)
    result = gradclip.clip_grad_value_(params, 0.75, foreach=foreach)
    assert result is None
    assert_grads_identical(params, grads_of(expected_params))


def test_value_shapes_cover_the_one_pass_path():  # guards the test data above
    assert math.prod(VALUE_SHAPES["one-pass-and-fused"][0]) >= functional.VALUE_ONE_PASS_MIN_NUMEL


@pytest.mark.parametrize("clip_value", [0.0, 1e-3, 1, 1e9])
def test_clip_grad_value_thresholds_named_and_single(clip_value):
    params = make_params([(7, 3), (3,), (70000,)], no_grad=(1,), grad_scale=5.0)
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_value_(expected_params, clip_value)
    gradclip.clip_grad_value_([(f"w{i}", p) for i, p in enumerate(params)], clip_value)
    assert_grads_identical(params, grads_of(expected_params))
    torch.nn.utils.clip_grad_value_(expected_params[0], clip_value / 2)
    gradclip.clip_grad_value_(params[0], clip_value / 2)
    assert_grads_identical(params, grads_of(expected_params))


def test_clip_grad_value_mixed_dtypes():
    dtypes = [torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.float32]
    params = make_params([(9,), (70000,), (4, 4), (3,), ()], dtypes, grad_scale=3.0)
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_value_(expected_params, 1.5)
    gradclip.clip_grad_value_(params, 1.5)
    assert_grads_identical(params, grads_of(expected_params))


# --- properties ----------------------------------------------------------------------------

shape_st = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)
grads_st = st.fixed_dictionaries(
    {
        "shapes": st.lists(shape_st, min_size=1, max_size=5),
        "seed": st.integers(0, 2**31 - 1),
        "log_scale": st.floats(-3, 4),
        "dtype": st.sampled_from(FLOAT_DTYPES),
    }
)


def build(spec):
    return make_params(
        spec["shapes"], spec["dtype"], seed=spec["seed"], grad_scale=10.0 ** spec["log_scale"]
    )


@given(spec=grads_st, p=st.sampled_from(NORM_TYPES), max_norm=st.floats(1e-3, 1e3))
def test_property_clipped_norm_bounded_and_direction_preserved(spec, p, max_norm):
    params = build(spec)
    before = grads_of(params)
    total = gradclip.clip_grad_norm_(params, max_norm, p)
    pre = reference_total_norm(before, p)
    rtol = 1e-12 if spec["dtype"] == torch.float64 else 1e-5
    assert math.isclose(float(total), pre, rel_tol=rtol)  # returns the pre-clip norm
    after = [q.grad for q in params]
    assert reference_total_norm(after, p) <= max_norm * (1 + 1e-5)
    # Direction: the result is one non-negative multiple c <= 1 of the original.
    a, b = flat64(after), flat64(before)
    c = float(a.dot(b) / b.dot(b)) if b.abs().sum() > 0 else 1.0
    assert 0.0 <= c <= 1.0 + 1e-6
    torch.testing.assert_close(a, c * b, rtol=rtol, atol=1e-300)
    expected_c = min(1.0, max_norm / (pre + 1e-6))
    assert math.isclose(c, expected_c, rel_tol=rtol)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # a constant setting
@given(spec=grads_st, p=st.sampled_from(NORM_TYPES), margin=st.floats(1e-3, 10.0))
def test_property_untouched_under_threshold(branch_on_cpu, spec, p, margin):
    params = build(spec)
    before = grads_of(params)
    max_norm = reference_total_norm(before, p) * (1 + margin) + 1e-5
    gradclip.clip_grad_norm_(params, max_norm, p)
    assert_grads_identical(params, before)


@given(spec=grads_st, p=st.sampled_from(NORM_TYPES), max_norm=st.floats(0.1, 1e3))
def test_property_idempotent(spec, p, max_norm):
    # torch's 1e-6 in the denominator shrinks an already clipped norm by a relative
    # ~1e-6 / max_norm; for max_norm >= 0.1 that is within 2e-5.
    params = build(spec)
    gradclip.clip_grad_norm_(params, max_norm, p)
    once = grads_of(params)
    gradclip.clip_grad_norm_(params, max_norm, p)
    assert_grads_close(params, once, rtol=2e-5, atol=0)


@given(spec=grads_st, clip_value=st.floats(0.0, 100.0))
def test_property_value_clip_bounds(spec, clip_value):
    params = build(spec)
    before = grads_of(params)
    gradclip.clip_grad_value_(params, clip_value)
    for param, g in zip(params, before):
        after = param.grad
        bound = torch.tensor(clip_value, dtype=g.dtype)
        assert bool((after.abs() <= bound).all())
        inside = g.abs() <= bound
        assert torch.equal(after[inside], g[inside])  # untouched inside the bounds
        outside = ~inside
        assert torch.equal(after[outside], torch.sign(g[outside]) * bound)


@given(spec=grads_st, clip_value=st.floats(1e-3, 100.0))
def test_property_value_clip_idempotent(spec, clip_value):
    params = build(spec)
    gradclip.clip_grad_value_(params, clip_value)
    once = grads_of(params)
    gradclip.clip_grad_value_(params, clip_value)
    assert_grads_identical(params, once)
