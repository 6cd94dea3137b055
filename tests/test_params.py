"""Accepted ``parameters`` forms and argument validation: bad input fails before any change."""

from __future__ import annotations

import math
import re

import pytest
import torch

import gradclip
from gradclip._params import (
    check_norm_type,
    check_tensor_threshold,
    check_tensors,
    check_threshold,
    collect_grads,
)
from helpers import assert_grads_identical, clone_params, grads_of, make_params
from sync_guard import no_host_sync

# Every public clipping function, called with a threshold ``t`` and optional norm_type.
CLIPPERS = {
    "clip_grad_norm_": lambda params, t=1.0, p=2.0: gradclip.clip_grad_norm_(params, t, p),
    "clip_grads_with_norm_": lambda params, t=1.0, p=2.0: gradclip.clip_grads_with_norm_(
        params, t, torch.tensor(100.0)
    ),
    "clip_grad_value_": lambda params, t=1.0, p=2.0: gradclip.clip_grad_value_(params, t),
    "clip_grad_agc_": lambda params, t=0.01, p=2.0: gradclip.clip_grad_agc_(params, t),
}
THRESHOLD_NAMES = {
    "clip_grad_norm_": "max_norm",
    "clip_grads_with_norm_": "max_norm",
    "clip_grad_value_": "clip_value",
    "clip_grad_agc_": "clip_factor",
}


def params_that_would_change():
    """Gradients large enough that every clipper modifies them if it runs."""
    return make_params([(5, 4), (5,), ()], grad_scale=100.0)


# --- collect_grads --------------------------------------------------------------------------


def test_collect_grads_plain_list_positions_and_names():
    params = make_params([(2,), (3,), (4,), (5,)], no_grad=(0, 2))
    grads = collect_grads(params)
    assert len(grads) == 2
    assert grads.params[0] is params[1] and grads.params[1] is params[3]
    assert grads.grads[0] is params[1].grad and grads.grads[1] is params[3].grad
    assert grads.positions == [1, 3]
    assert [grads.name(k) for k in range(2)] == ["parameters[1]", "parameters[3]"]


def test_collect_grads_named_pairs_and_mixed_items():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    grads = collect_grads(model.named_parameters())
    assert [grads.name(k) for k in range(len(grads))] == ["weight", "bias"]
    extra = make_params([(2,)])[0]
    mixed = collect_grads([("w", model.weight), extra, ("b", model.bias)])
    assert [mixed.name(k) for k in range(3)] == ["w", "parameters[1]", "b"]
    assert mixed.grads[1] is extra.grad


def test_collect_grads_records_the_gradient_types():
    class Marked(torch.Tensor):
        pass

    params = make_params([(2,), (3,), (4,)], no_grad=(1,))
    params[2].grad = params[2].grad.as_subclass(Marked)
    grads = collect_grads(params)
    assert grads.grad_types == {torch.Tensor, Marked}  # NoneType (params[1]) left out
    named = collect_grads([("a", params[0]), ("b", params[1])])
    assert named.grad_types == {torch.Tensor}
    assert collect_grads([]).grad_types == frozenset()


def test_check_tensors_returns_the_list_and_names_bad_items():
    tensors = [torch.ones(2), torch.zeros(3)]
    checked = check_tensors(iter(tensors))
    assert len(checked) == 2 and all(a is b for a, b in zip(checked, tensors))
    with pytest.raises(TypeError, match=r"^grads\[2\] is a int; expected a Tensor$"):
        check_tensors([*tensors, 3], "grads")
    with pytest.raises(TypeError, match=r"^tensors\[0\] has layout torch\.sparse_coo"):
        check_tensors([sparse_embedding().weight.grad])


def test_collect_grads_single_tensor_and_generator():
    (param,) = make_params([(3, 3)])
    assert collect_grads(param).grads[0] is param.grad
    gen = (p for p in make_params([(2,), (3,)]))
    assert len(collect_grads(gen)) == 2


def test_collect_grads_empty_inputs():
    assert len(collect_grads([])) == 0
    assert len(collect_grads(iter([]))) == 0  # an iterator, not a generator: fine
    with pytest.raises(ValueError, match="empty generator"):
        collect_grads(p for p in [])
    assert len(collect_grads((p for p in []), empty_generator_ok=True)) == 0


@pytest.mark.parametrize(
    ("parameters", "pattern"),
    [
        (3.0, "got float"),
        (None, "got NoneType"),
        ([torch.zeros(1), "weight"], r"parameters\[1\] is a str"),
        ([torch.zeros(1), 3], r"parameters\[1\] is a int"),
        ([(3, torch.zeros(1))], r"parameters\[0\] is a tuple"),
        ([("w", torch.zeros(1), 1)], r"parameters\[0\] is a tuple"),
        ([[torch.zeros(1)]], r"parameters\[0\] is a list"),
    ],
)
def test_collect_grads_rejects_non_tensors(parameters, pattern):
    with pytest.raises(TypeError, match=pattern):
        collect_grads(parameters)


def sparse_embedding():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 4, 4])).sum().backward()
    assert emb.weight.grad.layout is torch.sparse_coo
    return emb


def test_collect_grads_rejects_sparse():
    emb = sparse_embedding()
    with pytest.raises(TypeError, match=r"parameters\[0\].*sparse"):
        collect_grads([emb.weight])
    with pytest.raises(TypeError, match=r"weight.*sparse"):
        collect_grads(emb.named_parameters())


# --- check_threshold / check_norm_type ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 0.0), (1, 1.0), (2.5, 2.5), (torch.tensor(0.5), 0.5)]
)
def test_check_threshold_accepts(value, expected):
    result = check_threshold(value, "max_norm")
    assert type(result) is float and result == expected


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (-1.0, ValueError, r"max_norm must be >= 0; got -1\.0"),
        (-1e-30, ValueError, "max_norm must be >= 0"),
        (float("nan"), ValueError, "max_norm must be a finite number; got nan"),
        (float("inf"), ValueError, "max_norm must be a finite number; got inf"),
        (-float("inf"), ValueError, "got -inf"),
        (torch.tensor(float("nan")), ValueError, "got nan"),
        ("1.0", TypeError, "max_norm must be a real number; got '1.0'"),
        (None, TypeError, "got None"),
        (True, TypeError, "got True"),
        (torch.ones(2), TypeError, r"one-element tensor; got shape \(2,\)"),
    ],
)
def test_check_threshold_rejects(value, error, pattern):
    with pytest.raises(error, match=pattern):
        check_threshold(value, "max_norm")


@pytest.mark.parametrize(
    "value", [torch.tensor(True), torch.tensor(1 + 0j)], ids=["bool", "complex"]
)
def test_check_threshold_rejects_bool_and_complex_tensors(value):
    with pytest.raises(TypeError, match="max_norm must be a real number; got a torch"):
        check_threshold(value, "max_norm")


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_check_tensor_threshold_keeps_a_tensor_as_a_0d_view(shape):
    value = torch.full(shape, 0.5, dtype=torch.float64)
    result = check_tensor_threshold(value, "max_norm")
    assert isinstance(result, torch.Tensor) and result.shape == ()
    assert result.dtype == torch.float64 and result.data_ptr() == value.data_ptr()
    assert check_tensor_threshold(2, "max_norm") == 2.0  # numbers as check_threshold


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (torch.tensor(-1.0), ValueError, r"max_norm must be >= 0; got -1\.0"),
        (torch.tensor(float("nan")), ValueError, "max_norm must be a finite number; got nan"),
        (torch.ones(2), TypeError, r"one-element tensor; got shape \(2,\)"),
        (torch.tensor(True), TypeError, "got a torch.bool tensor"),
        ("1", TypeError, "max_norm must be a real number"),
        (-1.0, ValueError, "max_norm must be >= 0"),
    ],
)
def test_check_tensor_threshold_rejects_on_cpu(value, error, pattern):
    with pytest.raises(error, match=pattern):
        check_tensor_threshold(value, "max_norm")


def test_check_tensor_threshold_reads_no_value_off_the_host(monkeypatch):
    # Off the CPU reading the value would be a host sync: only shape and dtype are checked.
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", False)
    value = torch.tensor([-1.0])
    with no_host_sync():
        result = check_tensor_threshold(value, "max_norm")
    assert result.shape == () and result.data_ptr() == value.data_ptr()
    meta = torch.ones(1, device="meta")
    with no_host_sync():
        assert check_tensor_threshold(meta, "max_norm").shape == ()
    with pytest.raises(TypeError, match="one-element"):
        check_tensor_threshold(torch.ones(2, device="meta"), "max_norm")


def test_check_threshold_zero_not_allowed():
    with pytest.raises(ValueError, match=r"clip_factor must be > 0; got 0\.0"):
        check_threshold(0.0, "clip_factor", allow_zero=False)
    assert check_threshold(1e-9, "clip_factor", allow_zero=False) == 1e-9


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2, 2.0),
        (0.5, 0.5),
        (1e-3, 1e-3),
        (math.inf, math.inf),
        ("inf", math.inf),
        ("INF", math.inf),
    ],
)
def test_check_norm_type_accepts(value, expected):
    assert check_norm_type(value) == expected


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (0, ValueError, "got 0.0"),
        (-2.0, ValueError, r"got -2\.0"),
        (-math.inf, ValueError, "got -inf"),
        (float("nan"), ValueError, "got nan"),
        ("fro", TypeError, "got 'fro'"),
        ("-inf", TypeError, "got '-inf'"),
        (None, TypeError, "got None"),
        (True, TypeError, "got True"),
    ],
)
def test_check_norm_type_rejects(value, error, pattern):
    with pytest.raises(error, match=f"norm_type.*{pattern}"):
        check_norm_type(value)


# --- public functions: bad input raises and modifies nothing --------------------------------


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn", list(CLIPPERS))
def test_bad_threshold(fn, bad):
    params = params_that_would_change()
    before = grads_of(params)
    with pytest.raises(
        ValueError, match=f"{THRESHOLD_NAMES[fn]} must be .*got {re.escape(str(bad))}"
    ):
        CLIPPERS[fn](params, bad)
    assert_grads_identical(params, before)


def test_agc_rejects_zero_clip_factor_and_bad_eps():
    params = params_that_would_change()
    before = grads_of(params)
    with pytest.raises(ValueError, match=r"clip_factor must be > 0; got 0\.0"):
        gradclip.clip_grad_agc_(params, 0.0)
    for eps in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match=f"eps must be .*got {re.escape(str(eps))}"):
            gradclip.clip_grad_agc_(params, 0.01, eps)
    assert_grads_identical(params, before)


def test_zero_threshold_is_valid_where_torch_accepts_it():
    params = params_that_would_change()
    expected_params = clone_params(params)
    torch.nn.utils.clip_grad_norm_(expected_params, 0.0)
    gradclip.clip_grad_norm_(params, 0.0)
    assert_grads_identical(params, grads_of(expected_params))
    torch.nn.utils.clip_grad_value_(expected_params, 0)
    gradclip.clip_grad_value_(params, 0)
    assert_grads_identical(params, grads_of(expected_params))


@pytest.mark.parametrize(
    ("bad", "error", "pattern"),
    [
        (0, ValueError, "got 0.0"),
        (-1, ValueError, r"got -1\.0"),
        (float("nan"), ValueError, "got nan"),
        ("l2", TypeError, "got 'l2'"),
        ("fro", TypeError, "got 'fro'"),
    ],
)
def test_bad_norm_type(bad, error, pattern):
    params = params_that_would_change()
    before = grads_of(params)
    with pytest.raises(error, match=f"norm_type.*{pattern}"):
        gradclip.clip_grad_norm_(params, 1.0, bad)
    with pytest.raises(error, match=f"norm_type.*{pattern}"):
        gradclip.get_total_norm([p.grad for p in params], bad)
    assert_grads_identical(params, before)


@pytest.mark.parametrize("fn", list(CLIPPERS))
def test_non_tensor_item_after_valid_params(fn):
    params = params_that_would_change()
    before = grads_of(params)
    with pytest.raises(TypeError, match=r"parameters\[3\] is a str"):
        CLIPPERS[fn]([*params, "oops"])
    with pytest.raises(TypeError, match=r"parameters\[1\] is a float"):
        CLIPPERS[fn]([params[0], 1.5, params[1]])
    assert_grads_identical(params, before)


@pytest.mark.parametrize("fn", list(CLIPPERS))
def test_sparse_gradient_rejected_before_dense_grads_change(fn):
    dense = params_that_would_change()
    emb = sparse_embedding()
    before = grads_of(dense)
    sparse_before = emb.weight.grad.clone()
    with pytest.raises(TypeError, match=r"parameters\[3\].*sparse"):
        CLIPPERS[fn]([*dense, emb.weight])
    with pytest.raises(TypeError, match=r"emb\.weight.*sparse"):
        named = [(f"dense{i}", p) for i, p in enumerate(dense)]
        CLIPPERS[fn]([*named, ("emb.weight", emb.weight)])
    assert_grads_identical(dense, before)
    assert torch.equal(emb.weight.grad.to_dense(), sparse_before.to_dense())


@pytest.mark.parametrize("fn", list(CLIPPERS))
def test_empty_generator_is_an_error(fn):
    model = torch.nn.Linear(3, 2)
    model(torch.randn(2, 3)).sum().backward()
    before = grads_of(list(model.parameters()))
    params = model.parameters()
    list(params)  # consumed, as after a first clip call
    with pytest.raises(ValueError, match="empty generator"):
        CLIPPERS[fn](params)
    assert_grads_identical(list(model.parameters()), before)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_agc_"])
def test_empty_list_returns_zero(fn):
    result = CLIPPERS[fn]([])
    torch.testing.assert_close(result, torch.tensor(0.0), rtol=0, atol=0)
    torch.testing.assert_close(result, torch.nn.utils.clip_grad_norm_([], 1.0), rtol=0, atol=0)


@pytest.mark.parametrize("fn", ["clip_grads_with_norm_", "clip_grad_value_"])
def test_empty_list_is_a_no_op(fn):
    assert CLIPPERS[fn]([]) is None


def test_non_iterable_parameters():
    for fn in CLIPPERS.values():
        with pytest.raises(TypeError, match="parameters must be a Tensor"):
            fn(42)
