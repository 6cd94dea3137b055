"""Non-finite gradient policies: "ignore" (torch), "raise", "zero"; error_if_nonfinite."""

from __future__ import annotations

import math

import pytest
import torch

import gradclip
from gradclip import NonFiniteGradientError
from gradclip.nonfinite import check_policy
from helpers import (
    FOREACH,
    NORM_TYPES,
    agc_params,
    agc_reference,
    assert_grads_identical,
    clone_params,
    grads_of,
    make_params,
)

BAD_VALUES = [float("nan"), float("inf"), -float("inf")]
SHAPES = [(6, 4), (6,), (3, 3), (), (5,)]


def poisoned(bad, *where, seed=0, dtype=torch.float32):
    """Parameters of SHAPES (index 1 has no gradient) with ``bad`` in the listed gradients."""
    params = make_params(SHAPES, dtype, seed=seed, no_grad=(1,), grad_scale=3.0)
    for i in where:
        params[i].grad.view(-1)[-1] = bad
    return params


# --- "ignore": torch's behaviour -----------------------------------------------------------


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_ignore_matches_torch(bad, p, foreach):
    params = poisoned(bad, 2)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 1.0, p, foreach=foreach)
    actual = gradclip.clip_grad_norm_(params, 1.0, p, foreach=foreach, nonfinite="ignore")
    assert not torch.isfinite(expected)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert_grads_identical(params, grads_of(expected_params))


def test_ignore_nan_spreads_to_all_grads_like_torch(branch_on_cpu):
    params = poisoned(float("nan"), 0)
    gradclip.clip_grad_norm_(params, 1.0)
    for p in params:
        if p.grad is not None:
            assert bool(p.grad.isnan().all())


def test_ignore_agc_matches_reference():
    # A NaN unit fails the "> λ" test and is left alone; other units are clipped.
    params = agc_params([(6, 4), (6,), (3, 3)], seed=1)
    params[0].grad[2, 1] = float("nan")
    expected = agc_reference(params)
    total = gradclip.clip_grad_agc_(params, nonfinite="ignore")
    assert math.isnan(float(total))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-9, equal_nan=True)


# --- "raise" --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_raise_names_first_bad_parameter_and_modifies_nothing(bad, p):
    params = poisoned(bad, 3, 4)
    before = grads_of(params)
    # Positions count every item passed, including parameters without gradients.
    with pytest.raises(NonFiniteGradientError, match=r"parameters\[3\]") as info:
        gradclip.clip_grad_norm_(params, 1.0, p, nonfinite="raise")
    assert info.value.name == "parameters[3]"
    assert isinstance(info.value, RuntimeError)  # torch raises RuntimeError
    assert_grads_identical(params, before)


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_raise_uses_given_names(bad):
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    model(torch.randn(3, 4)).sum().backward()
    model[2].weight.grad[1, 1] = bad
    model[2].bias.grad[0] = bad
    before = grads_of(list(model.parameters()))
    with pytest.raises(NonFiniteGradientError, match=r"2\.weight") as info:
        gradclip.clip_grad_norm_(model.named_parameters(), 1.0, nonfinite="raise")
    assert info.value.name == "2.weight"
    assert_grads_identical(list(model.parameters()), before)


def test_error_if_nonfinite_behaves_as_raise():
    params = poisoned(float("nan"), 4)
    before = grads_of(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, error_if_nonfinite=True)
    with pytest.raises(NonFiniteGradientError) as info:
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert info.value.name == "parameters[4]"
    assert_grads_identical(params, before)


def test_raise_and_error_flag_pass_on_finite_grads():
    params = make_params(SHAPES, grad_scale=3.0)
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 1.0, error_if_nonfinite=True)
    actual = gradclip.clip_grad_norm_(params, 1.0, nonfinite="raise")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))
    again = clone_params(expected_params)
    gradclip.clip_grad_norm_(again, 1.0, error_if_nonfinite=True)
    torch.testing.assert_close(flat(again), flat(params), rtol=1e-5, atol=0)


def flat(params):
    return torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_raise_agc_names_parameter_in_caller_order(bad):
    # Shapes interleave so AGC's same-shape groups are processed out of order; the
    # name must still be the first bad parameter in the caller's order.
    params = agc_params([(4, 4), (7,), (4, 4), (7,), ()], seed=2)
    params[1].grad[3] = bad
    params[2].grad[0, 0] = bad
    before = grads_of(params)
    with pytest.raises(NonFiniteGradientError) as info:
        gradclip.clip_grad_agc_(params, nonfinite="raise")
    assert info.value.name == "parameters[1]"
    assert_grads_identical(params, before)
    named = [(f"layer{i}", p) for i, p in enumerate(params)]
    with pytest.raises(NonFiniteGradientError, match="layer1"):
        gradclip.clip_grad_agc_(named, nonfinite="raise")
    assert_grads_identical(params, before)


def huge_params(values, *, dtype=torch.float32):
    """One parameter per row of ``values``, each gradient finite (the values given)."""
    params = []
    for row in values:
        param = torch.nn.Parameter(torch.zeros(len(row), dtype=dtype))
        param.grad = torch.tensor(row, dtype=dtype)
        params.append(param)
    return params


def float64_norm(row, p):
    """‖row‖_p in float64 from plain Python numbers (the reference for the message)."""
    return max(abs(x) for x in row) if math.isinf(p) else sum(abs(x) ** p for x in row) ** (1 / p)


@pytest.mark.parametrize(
    ("values", "p"),
    [
        # Every per-tensor norm is finite; their total overflows float32.
        ([[1.5e19, 0.0], [1.5e19, 1.0], [1.0, 2.0]], 2.0),
        ([[2e38, 0.0], [3e38, 0.0]], 1.0),
        # The per-tensor norm itself overflows (3e38 squared), though every value is finite.
        ([[1.0, 2.0], [3e38, 0.0], [2e38, 0.0]], 2.0),
        ([[1e30, 1e30, 1e30]], 3.0),
    ],
    ids=["total-l2", "total-l1", "per-tensor-l2", "per-tensor-l3"],
)
def test_raise_says_the_norm_overflowed_when_every_value_is_finite(values, p):
    params = huge_params(values)
    before = grads_of(params)
    exact = [float64_norm(row, p) for row in values]
    largest = max(range(len(exact)), key=exact.__getitem__)
    with pytest.raises(NonFiniteGradientError) as info:
        gradclip.clip_grad_norm_(params, 1.0, p, nonfinite="raise")
    message = str(info.value)
    assert f"norm of order {p} overflowed to inf" in message
    assert "every gradient value is finite" in message
    assert f"parameters[{largest}]" in message and info.value.name == f"parameters[{largest}]"
    shown = float(message.split("largest per-tensor norm is ")[1].split(",")[0])
    assert math.isclose(shown, exact[largest], rel_tol=1e-6)
    assert "is not finite" not in message
    assert_grads_identical(params, before)


def test_raise_names_a_truly_nonfinite_gradient_after_an_overflowing_one():
    # parameters[0]'s norm overflows but its values are finite; parameters[1] has an inf.
    params = huge_params([[3e38, 3e38], [1.0, float("inf")], [1.0, 1.0]])
    with pytest.raises(NonFiniteGradientError, match=r"gradient of parameters\[1\] is not finite"):
        gradclip.clip_grad_norm_(params, 1.0, nonfinite="raise")


def test_raise_agc_overflow_names_the_norm():
    # AGC's total is an L2 norm; float32 unit norms of 3e38 overflow.
    params = huge_params([[1.0, 2.0], [3e38, 3e38]])
    with pytest.raises(NonFiniteGradientError, match=r"norm of order 2\.0 overflowed") as info:
        gradclip.clip_grad_agc_(params, nonfinite="raise")
    assert info.value.name == "parameters[1]"


def test_overflow_error_without_a_norm_type():
    error = NonFiniteGradientError.overflow("w", 3e38, math.inf, None)
    assert str(error).startswith("the gradient norm overflowed to inf, although every")
    assert error.name == "w" and isinstance(error, RuntimeError)


# --- "zero" ---------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_zero_zeroes_every_gradient(branch_on_cpu, bad, p, foreach):
    params = poisoned(bad, 4)
    total = gradclip.clip_grad_norm_(params, 1.0, p, foreach=foreach, nonfinite="zero")
    assert not torch.isfinite(total)  # the pre-clip norm is still reported
    expected = [None if p.grad is None else torch.zeros_like(p.grad) for p in params]
    assert_grads_identical(params, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_zero_other_dtypes(branch_on_cpu, dtype):
    params = poisoned(float("inf"), 0, dtype=dtype)
    gradclip.clip_grad_norm_(params, 1.0, nonfinite="zero")
    expected = [None if p.grad is None else torch.zeros_like(p.grad) for p in params]
    assert_grads_identical(params, expected)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_zero_is_ignore_on_finite_grads(branch_on_cpu, p):
    params = make_params(SHAPES, grad_scale=3.0, no_grad=(1,))
    expected_params = clone_params(params)
    expected = torch.nn.utils.clip_grad_norm_(expected_params, 1.0, p)
    actual = gradclip.clip_grad_norm_(params, 1.0, p, nonfinite="zero")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_zero_agc(branch_on_cpu, bad):
    params = agc_params([(4, 4), (7,), (4, 4), ()], seed=3)
    params[3].grad.fill_(bad)
    total = gradclip.clip_grad_agc_(params, nonfinite="zero")
    assert not math.isfinite(float(total))
    assert_grads_identical(params, [torch.zeros_like(p) for p in params])


def test_zero_agc_on_finite_grads_is_plain_agc(branch_on_cpu):
    params = agc_params([(4, 4), (7,), (4, 4), ()], seed=4)
    expected = agc_reference(params)
    gradclip.clip_grad_agc_(params, nonfinite="zero")
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-9)


# --- policy validation ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["skip", "Raise", "", None, 0])
def test_unknown_policy_is_rejected_before_anything_changes(bad):
    params = poisoned(float("nan"), 0)
    before = grads_of(params)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gradclip.clip_grad_norm_(params, 1.0, nonfinite=bad)
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(")):
        gradclip.clip_grad_agc_(params, nonfinite=bad)
    assert_grads_identical(params, before)


def test_error_if_nonfinite_conflicts_with_zero():
    params = poisoned(float("nan"), 0)
    before = grads_of(params)
    with pytest.raises(ValueError, match="conflicts"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, nonfinite="zero")
    assert_grads_identical(params, before)


@pytest.mark.parametrize(
    ("policy", "flag", "expected"),
    [
        ("ignore", False, "ignore"),
        ("raise", False, "raise"),
        ("zero", False, "zero"),
        ("ignore", True, "raise"),
        ("raise", True, "raise"),
    ],
)
def test_check_policy(policy, flag, expected):
    assert check_policy(policy, error_if_nonfinite=flag) == expected


def test_error_message_is_actionable():
    err = NonFiniteGradientError("encoder.weight", float("nan"))
    assert err.name == "encoder.weight"
    assert "encoder.weight" in str(err)
    assert "nan" in str(err)
    assert "nonfinite='zero'" in str(err)
