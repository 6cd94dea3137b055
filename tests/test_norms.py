"""gradclip.norms: per-tensor and total norms against torch and a float64 reference."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given

import gradclip
from gradclip.norms import (
    BLOCKED_MIN_NUMEL,
    BLOCKED_ROW_NUMEL,
    accumulation_dtype,
    tensor_norms,
    total_norm_of,
)
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
from sync_guard import no_host_sync

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


# --- the blocked L2 kernel ------------------------------------------------------------------

MIN, ROW = BLOCKED_MIN_NUMEL, BLOCKED_ROW_NUMEL
BLOCKED_SIZES = [
    MIN,  # whole rows only
    MIN + 1,  # one leftover element
    MIN + ROW - 1,  # the longest leftover row
    3 * MIN + 5 * ROW + 777,
    (1 << 20) + 12345,
]


def relative_errors(norms: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """|norm / reference - 1| for each tensor, the reference computed in float64."""
    reference = torch.stack([t.detach().to(torch.float64).norm() for t in tensors])
    return ((norms.to(torch.float64) - reference) / reference).abs()


def scaled_randn(shape, dtype=torch.float32, *, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("numel", BLOCKED_SIZES)
def test_blocked_kernel_is_within_1e_6_of_the_float64_reference(numel, dtype):
    tensors = [scaled_randn(numel, dtype, seed=numel)]
    norms = tensor_norms(tensors, kernel="blocked")
    assert norms.dtype == dtype and norms.shape == (1,)
    bound = 1e-6 if dtype == torch.float32 else 1e-12
    assert float(relative_errors(norms, tensors)[0]) <= bound


def test_blocked_kernel_around_the_threshold_and_on_matrices():
    """Just below the threshold torch's kernel computes the norm (same bits); from it on,
    the blocked one; both within 1e-6 of the reference. Matrices are flattened."""
    below = [scaled_randn(n, seed=n) for n in (MIN - ROW, MIN - 1)]
    above = [scaled_randn(n, seed=n) for n in (MIN, MIN + 1)]
    matrices = [scaled_randn((300, 700), seed=1), scaled_randn((3, 5, 7, 1000), seed=2)]
    tensors = [*below, *above, *matrices]
    norms = tensor_norms(tensors, kernel="blocked")
    assert torch.equal(norms[:2], tensor_norms(below))
    assert bool((relative_errors(norms, tensors) <= 1e-6).all())


def test_torch_kernel_loses_precision_on_a_large_tensor_and_blocked_does_not():
    """Why the blocked kernel exists: torch's CPU kernel accumulates 8M float32 squares in
    float32 (measured: relative error 2.4e-4); the blocked kernel stays at the rounding
    of the float32 result."""
    tensors = [scaled_randn(1 << 23, seed=3)]
    torch_error = float(relative_errors(tensor_norms(tensors), tensors)[0])
    blocked_error = float(relative_errors(tensor_norms(tensors, kernel="blocked"), tensors)[0])
    assert torch_error > 1e-5
    assert blocked_error < 1e-7


def test_blocked_kernel_with_one_thread():
    tensors = [scaled_randn(n, seed=n) for n in BLOCKED_SIZES]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        norms = tensor_norms(tensors, kernel="blocked")
    finally:
        torch.set_num_threads(threads)
    assert bool((relative_errors(norms, tensors) <= 1e-6).all())


LARGE_FALLBACKS = {
    # Tensors of at least BLOCKED_MIN_NUMEL elements that the blocked kernel leaves alone.
    "float16": lambda: scaled_randn(MIN + 3, torch.float16, scale=1.0),
    "bfloat16": lambda: scaled_randn(MIN + 3, torch.bfloat16, scale=1.0),
    "complex64": lambda: torch.complex(scaled_randn(MIN + 3), scaled_randn(MIN + 3, seed=1)),
    "complex128": lambda: torch.complex(
        scaled_randn(MIN, torch.float64), scaled_randn(MIN, torch.float64, seed=1)
    ),
    "transposed": lambda: scaled_randn((300, 400)).t(),
    "strided": lambda: scaled_randn(2 * MIN + 2)[::2],
}


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("name", list(LARGE_FALLBACKS))
def test_blocked_kernel_leaves_other_dtypes_and_layouts_to_torch(name, foreach):
    tensor = LARGE_FALLBACKS[name]()
    many = [tensor] * 5  # the stacked-shapes path as well as the short-list path
    for tensors in ([tensor], many):
        expected = tensor_norms(tensors, foreach=foreach)
        actual = tensor_norms(tensors, foreach=foreach, kernel="blocked")
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", [p for p in NORM_TYPES if p != 2.0])
def test_blocked_kernel_leaves_other_norm_types_to_torch(p, foreach):
    tensors = [scaled_randn(MIN + 5, seed=1), scaled_randn((300, 400), seed=2), torch.ones(3)]
    expected = tensor_norms(tensors, p, foreach=foreach)
    actual = tensor_norms(tensors, p, foreach=foreach, kernel="blocked")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


SMALL_SHAPE_SETS = {
    name: shapes
    for name, shapes in SHAPE_SETS.items()
    if all(math.prod(shape) < MIN for shape in shapes)
}


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("shapes", list(SMALL_SHAPE_SETS.values()), ids=list(SMALL_SHAPE_SETS))
def test_blocked_kernel_on_small_tensors_is_bit_identical_to_torch(shapes, foreach):
    for dtype in (*FLOAT_DTYPES, *HALF_DTYPES):
        tensors = random_tensors(shapes, dtype, scale=3.0)
        expected = tensor_norms(tensors, foreach=foreach)
        actual = tensor_norms(tensors, foreach=foreach, kernel="blocked")
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        if dtype in FLOAT_DTYPES:  # torch's own function, for the same tensors
            torch.testing.assert_close(
                total_norm_of(actual),
                torch.nn.utils.get_total_norm(tensors, foreach=foreach),
                rtol=0,
                atol=0,
            )


@pytest.mark.parametrize("foreach", FOREACH)
def test_blocked_kernel_in_a_mixed_list_keeps_order_and_dtype(foreach):
    """Large float32/float64 tensors (blocked) among small ones, half-precision, complex
    and non-contiguous ones (torch's kernel), interleaved: each norm stays in its place."""
    tensors = [
        scaled_randn(MIN + 7, seed=1),
        torch.tensor([3.0, 4.0]),
        scaled_randn((300, 400), torch.float64, seed=2),
        *[scaled_randn((8, 8), seed=s) for s in range(3, 8)],  # stacked small shapes
        scaled_randn(MIN + 3, torch.bfloat16, seed=8),
        scaled_randn((300, 400), seed=9).t(),
        scaled_randn(3 * MIN, seed=10),
        torch.tensor([1.0, 1.0], dtype=torch.float64),
    ]
    fallback = [i for i, t in enumerate(tensors) if t.numel() < MIN or not t.is_contiguous()]
    fallback.append(8)  # bfloat16
    norms = tensor_norms(tensors, foreach=foreach, kernel="blocked")
    assert norms.dtype == torch.float64 and norms.shape == (len(tensors),)
    expected = tensor_norms(tensors, foreach=foreach)
    index = torch.tensor(fallback)
    torch.testing.assert_close(norms[index], expected[index], rtol=0, atol=0)
    blocked = [i for i in range(len(tensors)) if i not in fallback]
    assert blocked == [0, 2, 10]
    errors = relative_errors(norms[torch.tensor(blocked)], [tensors[i] for i in blocked])
    assert bool((errors <= 1e-6).all())
    floats = [t for t in tensors if t.dtype != torch.float64]
    assert tensor_norms(floats, foreach=foreach, kernel="blocked").dtype == torch.float32


@pytest.mark.parametrize("foreach", FOREACH)
def test_blocked_kernel_on_many_tensors_of_one_shape(foreach):
    """Same-shaped large tensors (one of them a non-contiguous view): one shape to check."""
    tensors = [scaled_randn(MIN + 1, seed=s) for s in range(5)]
    tensors[3] = scaled_randn(2 * MIN + 2, seed=3)[::2]
    norms = tensor_norms(tensors, foreach=foreach, kernel="blocked")
    blocked = [0, 1, 2, 4]
    errors = relative_errors(norms[blocked], [tensors[i] for i in blocked])
    assert bool((errors <= 1e-6).all())
    assert torch.equal(norms[3], tensor_norms(tensors[3:4], foreach=foreach)[0])
    assert torch.equal(norms[:3], tensor_norms(tensors[:3], kernel="blocked"))


def test_blocked_kernel_nonfinite_values_propagate():
    for bad in (math.nan, math.inf):
        t = scaled_randn(MIN + 1)
        t[MIN] = bad  # in the leftover row
        u = scaled_randn(MIN)
        u[5] = bad
        norms = tensor_norms([t, u, scaled_randn(MIN)], kernel="blocked")
        assert norms[:2].isnan().all() if math.isnan(bad) else norms[:2].isinf().all()
        assert norms[2].isfinite()


def test_blocked_kernel_reads_a_view_at_its_offset():
    base = scaled_randn(3 * MIN)
    view = base[MIN + 11 : 2 * MIN + 500]
    norms = tensor_norms([view], kernel="blocked")
    assert float(relative_errors(norms, [view])[0]) <= 1e-6


@pytest.mark.parametrize("bad", ["fast", "Torch", None, 2])
def test_unknown_kernel_is_a_value_error_naming_it(bad):
    match = rf"kernel must be one of 'torch', 'blocked'; got {bad!r}"
    with pytest.raises(ValueError, match=match):
        tensor_norms([torch.ones(3)], kernel=bad)
    with pytest.raises(ValueError, match=match):
        tensor_norms([], kernel=bad)


def test_blocked_kernel_calls_no_host_sync(no_cpu_branch):
    tensors = [scaled_randn(MIN + 9), scaled_randn((8, 8)), scaled_randn(MIN, torch.float64)]
    with no_host_sync():
        tensor_norms(tensors, kernel="blocked")


@given(
    sizes=st.lists(st.integers(MIN, MIN + 3 * ROW), min_size=1, max_size=3),
    small=st.lists(st.integers(0, 50), max_size=3),
    split=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6, 3),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_blocked_kernel_matches_the_float64_reference(sizes, small, split, seed, log_scale, dtype):
    """Any sizes from the threshold up (any leftover row), any shapes of them, among small
    tensors: every norm within 1e-6 of the float64 reference, in order."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    tensors = []
    for numel in [*sizes, *small]:
        shape = (numel,) if split == 1 or numel % 4 else (4, numel // 4)
        if split == 3 and numel % 8 == 0:
            shape = (2, 4, numel // 8)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        tensors.append(x.to(dtype))
    assume(all(t.numel() for t in tensors))
    norms = tensor_norms(tensors, kernel="blocked")
    assert norms.dtype == dtype
    errors = relative_errors(norms, tensors)
    bound = 1e-6 if dtype == torch.float32 else 1e-12
    assert bool((errors <= bound).all()), errors


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
