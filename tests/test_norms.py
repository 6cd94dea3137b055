"""gradclip.norms: per-tensor and total norms against torch and a float64 reference."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given

import gradclip
from gradclip.norms import accumulation_dtype, tensor_norms, total_norm_of
from helpers import (
    FLOAT_DTYPES,
    FOREACH,
    HALF_DTYPES,
    NORM_TYPES,
    SHAPE_SETS,
    make_params,
    reference_total_norm,
    tolerance,
)

shape_st = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=6)


def random_tensors(shapes, dtype=torch.float32, *, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in shapes]


# --- differential: get_total_norm against torch.nn.utils.get_total_norm -------------------


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS.values()), ids=list(SHAPE_SETS))
def test_get_total_norm_bit_identical_to_torch(shapes, dtype, p, foreach):
    tensors = random_tensors(shapes, dtype, scale=3.0)
    if math.isinf(p) and any(t.numel() == 0 for t in tensors):
        # The inf-norm of an empty tensor has no identity: torch raises, and so do we.
        with pytest.raises(RuntimeError, match="empty"):
            torch.nn.utils.get_total_norm(tensors, p, foreach=foreach)
        with pytest.raises(RuntimeError, match="empty"):
            gradclip.get_total_norm(tensors, p, foreach=foreach)
        return
    expected = torch.nn.utils.get_total_norm(tensors, p, foreach=foreach)
    actual = gradclip.get_total_norm(tensors, p, foreach=foreach)
    assert actual.dtype == expected.dtype == dtype
    assert actual.shape == torch.Size([])
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_get_total_norm_single_tensor_same_as_list(dtype, p):
    (t,) = random_tensors([(5, 7)], dtype)
    expected = torch.nn.utils.get_total_norm(t, p)
    torch.testing.assert_close(gradclip.get_total_norm(t, p), expected, rtol=0, atol=0)
    torch.testing.assert_close(gradclip.get_total_norm([t], p), expected, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_get_total_norm_half_is_fp32_and_more_accurate_than_torch(dtype, p, foreach):
    tensors = random_tensors(SHAPE_SETS["mlp"], dtype, scale=0.5)
    reference = reference_total_norm(tensors, p)  # of the half values, in float64
    actual = gradclip.get_total_norm(tensors, p, foreach=foreach)
    expected = torch.nn.utils.get_total_norm(tensors, p, foreach=foreach)
    # Documented difference: torch returns a half norm, gradclip an fp32 one.
    assert expected.dtype == dtype
    assert actual.dtype == torch.float32
    assert math.isclose(float(actual), reference, rel_tol=1e-5)
    if dtype == torch.float16 and reference > torch.finfo(torch.float16).max:
        # The 0.5-norm of these values exceeds fp16's range: torch overflows, we do not.
        assert p == 0.5
        assert torch.isinf(expected)
        return
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual, expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_get_total_norm_mixed_fp32_fp64_bit_identical_to_torch(p, foreach):
    tensors = random_tensors([(4, 5), (3,)], torch.float32) + random_tensors(
        [(6,), (2, 2)], torch.float64, seed=1
    )
    tensors = [tensors[0], tensors[2], tensors[1], tensors[3]]  # interleave dtypes
    expected = torch.nn.utils.get_total_norm(tensors, p, foreach=foreach)
    actual = gradclip.get_total_norm(tensors, p, foreach=foreach)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_get_total_norm_interleaved_dtypes_sums_in_torch_order(p, seed):
    # torch reduces the norms group by group (dtype); in the caller's order the sum of
    # ten float64 values can differ from torch's in the last bit (three cases here do).
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float64] * 2
    tensors = [
        random_tensors([(5,)], d, seed=seed * 10 + i, scale=3.0)[0] for i, d in enumerate(dtypes)
    ]
    expected = torch.nn.utils.get_total_norm(tensors, p)
    torch.testing.assert_close(gradclip.get_total_norm(tensors, p), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_get_total_norm_mixed_with_half(p):
    tensors = [
        *random_tensors([(8, 8)], torch.float16),
        *random_tensors([(5,)], torch.float32, seed=1),
        *random_tensors([(3, 3)], torch.bfloat16, seed=2),
    ]
    actual = gradclip.get_total_norm(tensors, p)
    assert actual.dtype == torch.float32
    assert math.isclose(float(actual), reference_total_norm(tensors, p), rel_tol=1e-5)
    expected = torch.nn.utils.get_total_norm(tensors, p)
    torch.testing.assert_close(actual, expected.float(), rtol=1.6e-2, atol=1e-3)


def test_get_total_norm_empty():
    for empty in ([], (), iter([])):
        result = gradclip.get_total_norm(empty)
        torch.testing.assert_close(result, torch.nn.utils.get_total_norm([]), rtol=0, atol=0)
        torch.testing.assert_close(result, torch.tensor(0.0), rtol=0, atol=0)


def test_get_total_norm_inf_string():
    tensors = random_tensors([(3, 4), (5,)], scale=2.0)
    torch.testing.assert_close(
        gradclip.get_total_norm(tensors, "inf"),
        torch.nn.utils.get_total_norm(tensors, math.inf),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_get_total_norm_error_if_nonfinite(bad):
    tensors = random_tensors([(3,), (4,)])
    tensors[1][2] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.get_total_norm(tensors, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.get_total_norm(tensors, error_if_nonfinite=True)
    # Without the flag both return the same non-finite value.
    torch.testing.assert_close(
        gradclip.get_total_norm(tensors),
        torch.nn.utils.get_total_norm(tensors),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


def test_get_total_norm_error_if_nonfinite_finite_passes():
    tensors = random_tensors([(3,), (4,)])
    result = gradclip.get_total_norm(tensors, error_if_nonfinite=True)
    torch.testing.assert_close(result, torch.nn.utils.get_total_norm(tensors), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "l2", None, True])
def test_get_total_norm_bad_norm_type(bad):
    with pytest.raises((ValueError, TypeError), match="norm_type"):
        gradclip.get_total_norm([torch.ones(3)], bad)


def sparse_tensor():
    return torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()


@pytest.mark.parametrize(
    ("tensors", "pattern"),
    [
        (["x"], r"^tensors\[0\] is a str; expected a Tensor$"),
        ([torch.ones(2), 1.0], r"^tensors\[1\] is a float; expected a Tensor$"),
        ([torch.ones(2), None], r"^tensors\[1\] is a NoneType"),
        ([("w", torch.ones(2))], r"^tensors\[0\] is a tuple"),
        ((t for t in [torch.ones(2), [torch.ones(2)]]), r"^tensors\[1\] is a list"),
        ([torch.ones(2), sparse_tensor()], r"^tensors\[1\] has layout torch\.sparse_coo; .*dense"),
    ],
    ids=["str", "float", "none", "named-pair", "generator-list", "sparse"],
)
def test_get_total_norm_rejects_non_tensors_and_sparse_naming_the_item(tensors, pattern):
    with pytest.raises(TypeError, match=pattern):
        gradclip.get_total_norm(tensors)


def test_get_total_norm_input_errors_where_torch_gives_others():
    # torch: a pybind error for a non-tensor, NotImplementedError for a sparse tensor.
    with pytest.raises(TypeError, match="incompatible function arguments"):
        torch.nn.utils.get_total_norm([torch.ones(2), 1.0])
    with pytest.raises(NotImplementedError):
        torch.nn.utils.get_total_norm([sparse_tensor()])


COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def complex_tensors(shapes, dtype, *, seed=0, scale=1.0):
    """Tensors with random real and imaginary parts."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.complex(
            torch.randn(s, generator=gen, dtype=torch.float64),
            torch.randn(s, generator=gen, dtype=torch.float64),
        )
        .mul(scale)
        .to(dtype)
        for s in shapes
    ]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", COMPLEX_DTYPES)
def test_get_total_norm_complex_bit_identical_to_torch(dtype, p, foreach):
    shapes = [*SHAPE_SETS["mlp"], *SHAPE_SETS["many-same"], *SHAPE_SETS["scalars"]]
    tensors = complex_tensors(shapes, dtype, scale=3.0)
    expected = torch.nn.utils.get_total_norm(tensors, p, foreach=foreach)
    actual = gradclip.get_total_norm(tensors, p, foreach=foreach)
    assert actual.dtype == expected.dtype == accumulation_dtype(dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # A complex tensor's norm is the norm of its moduli.
    moduli = [t.abs().double() for t in tensors]
    assert math.isclose(float(actual), reference_total_norm(moduli, p), rel_tol=1e-5)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_get_total_norm_complex_mixed_with_real(p):
    tensors = [
        *complex_tensors([(4, 3), (3,)], torch.complex64, seed=1),
        *random_tensors([(5,)], torch.float32, seed=2),
        *complex_tensors([(2, 2)], torch.complex128, seed=3),
    ]
    expected = torch.nn.utils.get_total_norm(tensors, p)
    actual = gradclip.get_total_norm(tensors, p)
    assert actual.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --- tensor_norms / total_norm_of / accumulation dtype -------------------------------------


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, *HALF_DTYPES])
def test_tensor_norms_per_tensor(dtype, p, foreach):
    shapes = SHAPE_SETS["conv"] + SHAPE_SETS["with-empty"]
    if math.isinf(p):  # torch._foreach_norm and vector_norm raise on empty tensors
        shapes = [s for s in shapes if math.prod(s) > 0]
    tensors = random_tensors(shapes, dtype)
    norms = tensor_norms(tensors, p, foreach=foreach)
    assert norms.shape == (len(tensors),)
    assert norms.dtype == accumulation_dtype(dtype)
    expected = torch.tensor([reference_total_norm([t], p) for t in tensors], dtype=torch.float64)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=0)


def test_tensor_norms_mixed_dtypes_keep_order():
    tensors = [
        torch.tensor([3.0, 4.0]),
        torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64),
        torch.tensor([6.0, 8.0], dtype=torch.bfloat16),
        torch.tensor([0.0, 2.0], dtype=torch.float16),
    ]
    norms = tensor_norms(tensors)
    assert norms.dtype == torch.float64
    expected = torch.tensor([reference_total_norm([t], 2.0) for t in tensors], dtype=torch.float64)
    torch.testing.assert_close(norms, expected, rtol=1e-7, atol=0)


def test_tensor_norms_empty():
    assert tensor_norms([]).shape == (0,)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.complex64, torch.float32),
        (torch.complex128, torch.float64),
    ],
)
def test_accumulation_dtype(dtype, expected):
    assert accumulation_dtype(dtype) == expected


@given(
    shapes=shapes_st,
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-3, 3),
    p=st.sampled_from(NORM_TYPES),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_total_norm_is_norm_of_concatenation(shapes, seed, log_scale, p, dtype):
    if math.isinf(p):  # the inf-norm of an empty tensor is an error (tested above)
        shapes = [s for s in shapes if math.prod(s) > 0]
        assume(shapes)
    tensors = random_tensors(shapes, dtype, seed=seed, scale=10.0**log_scale)
    total = gradclip.get_total_norm(tensors, p)
    combined = total_norm_of(tensor_norms(tensors, p), p)
    torch.testing.assert_close(total, combined, rtol=0, atol=0)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert math.isclose(float(total), reference_total_norm(tensors, p), rel_tol=rtol, abs_tol=0)


# --- grad_norm ------------------------------------------------------------------------------


def test_grad_norm_of_module_and_params():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model[2].bias.requires_grad_(False)  # no gradient: skipped
    model(torch.randn(5, 6)).pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == 3
    expected = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(gradclip.grad_norm(model), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        gradclip.grad_norm(model.named_parameters()), expected, rtol=0, atol=0
    )
    torch.testing.assert_close(
        gradclip.grad_norm(list(model.parameters()), norm_type=1.0),
        torch.nn.utils.get_total_norm(grads, 1.0),
        rtol=0,
        atol=0,
    )


def test_grad_norm_without_grads_is_zero():
    params = make_params([(3,), (4,)], no_grad=(0, 1))
    torch.testing.assert_close(gradclip.grad_norm(params), torch.tensor(0.0), rtol=0, atol=0)
