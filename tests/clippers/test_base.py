"""The Clipper base through its simplest strategies: NoClip, NormClip, ValueClip."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradclip
from gradclip import NoClip, NonFiniteGradientError, NormClip, ValueClip
from gradclip.clippers.base import Clipper
from helpers import make_params
from sync_guard import no_host_sync


def params_with_grads(seed: int = 0, scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6,), (3, 6), (3,), ()]
    out = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * scale
        out.append(p)
    return out


def clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def reference_norm(grads: list[torch.Tensor], p: float = 2.0) -> float:
    flat = torch.cat([g.double().flatten() for g in grads])
    return float(flat.abs().max()) if math.isinf(p) else float(flat.abs().pow(p).sum() ** (1 / p))


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e6])
def test_normclip_matches_torch_bit_for_bit(norm_type: float, max_norm: float) -> None:
    ours, theirs = params_with_grads(), params_with_grads()
    stats = NormClip(ours, max_norm=max_norm, norm_type=norm_type).clip_()
    total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert torch.equal(stats.total_norm, total)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
    assert bool(stats.clipped) == (float(total) > max_norm)
    assert stats.clipped_norm.item() == pytest.approx(
        reference_norm([p.grad for p in ours], norm_type), rel=1e-5
    )
    assert stats.threshold.item() == pytest.approx(max_norm)


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_normclip_matches_torch_bit_for_bit_on_large_gradients(max_norm: float) -> None:
    """Tensors where gradclip's blocked kernel would differ: NormClip keeps torch's."""
    shapes = [(300, 400), (1 << 16,), (7,), (256, 256), (3,)]
    ours, theirs = make_params(shapes, grad_scale=1e-3), make_params(shapes, grad_scale=1e-3)
    clipper = NormClip(ours, max_norm=max_norm)
    assert clipper.norm_kernel == "torch"
    stats = clipper.clip_()
    total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(stats.total_norm, total)
    assert bool(stats.clipped) == (max_norm < 1.0)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


def test_the_norm_kernel_is_the_class_default() -> None:
    class Blocked(NormClip):
        default_norm_kernel = "blocked"

    assert Clipper.default_norm_kernel == "torch"
    for clipper in (NoClip(params_with_grads()), ValueClip(params_with_grads(), 0.1)):
        assert clipper.norm_kernel == "torch"
    # 1M elements: torch's CPU kernel and the blocked one differ well beyond the last bit.
    (param,) = make_params([(1 << 20,)], grad_scale=1e-3)
    grads = [param.grad.clone()]
    stats = Blocked([param], max_norm=1e6).clip_()
    assert torch.equal(stats.norms, gradclip.tensor_norms(grads, kernel="blocked"))
    assert not torch.equal(stats.norms, gradclip.tensor_norms(grads))


@pytest.mark.parametrize("bad", ["fastest", "cuda", None])
def test_an_unknown_norm_kernel_fails_at_construction(bad: object) -> None:
    class Misnamed(NormClip):
        default_norm_kernel = bad  # type: ignore[assignment]

    match = rf"norm_kernel must be one of 'torch', 'blocked'; got {bad!r}"
    with pytest.raises(ValueError, match=match):
        Misnamed(params_with_grads(), max_norm=1.0)
    if bad is not None:  # None asks for the class default
        with pytest.raises(ValueError, match=match):
            Clipper(params_with_grads(), {}, norm_kernel=bad)  # type: ignore[arg-type]


def test_stats_norms_are_pre_clip_per_tensor_norms() -> None:
    params = params_with_grads(scale=10.0)
    expected = [float(p.grad.double().norm()) for p in params]
    stats = NormClip(params, max_norm=0.5).clip_()
    assert stats.norms.tolist() == pytest.approx(expected, rel=1e-6)
    assert stats.scale.item() == pytest.approx(
        0.5 / reference_norm([torch.tensor(expected)]), rel=1e-5
    )


def test_noclip_measures_and_leaves_grads_alone() -> None:
    params = params_with_grads(scale=100.0)
    before = [p.grad.clone() for p in params]
    stats = NoClip(params).clip_()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert stats.total_norm.item() == pytest.approx(reference_norm(before), rel=1e-6)
    assert math.isinf(stats.threshold.item()) and not bool(stats.clipped)
    assert stats.scale.item() == 1.0


def test_valueclip_matches_torch_and_reports() -> None:
    ours, theirs = params_with_grads(scale=3.0), params_with_grads(scale=3.0)
    pre = reference_norm([p.grad for p in ours])
    stats = ValueClip(ours, clip_value=0.5).clip_()
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(
        reference_norm([p.grad for p in theirs]), rel=1e-6
    )
    numel = sum(p.numel() for p in ours)
    assert stats.threshold.item() == pytest.approx(0.5 * math.sqrt(numel), rel=1e-6)
    assert bool(stats.clipped)
    calm = params_with_grads(scale=1e-3)
    assert not bool(ValueClip(calm, clip_value=0.5).clip_().clipped)


def test_param_groups_clip_each_group_to_its_own_threshold() -> None:
    a, b = params_with_grads(seed=1, scale=5.0), params_with_grads(seed=2, scale=5.0)
    ref_a, ref_b = clone(a), clone(b)
    pre = reference_norm([p.grad for p in a + b])
    clipper = NormClip([{"params": a, "max_norm": 0.5}, {"params": b}], max_norm=2.0)
    stats = clipper.clip_()
    torch.nn.utils.clip_grad_norm_(ref_a, 0.5)
    torch.nn.utils.clip_grad_norm_(ref_b, 2.0)
    for x, y in zip(a + b, ref_a + ref_b):
        assert torch.equal(x.grad, y.grad)
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-6)
    assert stats.threshold.item() == pytest.approx(math.hypot(0.5, 2.0), rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(
        reference_norm([p.grad for p in a + b]), rel=1e-5
    )


def test_named_parameters_name_the_culprit_and_nothing_changes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    model[1].bias.grad[0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    clipper = NormClip(model.named_parameters(), max_norm=0.1, nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match=r"1\.bias"):
        clipper.clip_()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
    assert clipper.step == 0


def test_zero_policy_zeroes_all_grads_on_nonfinite(branch_on_cpu: bool) -> None:
    params = params_with_grads()
    params[2].grad[0, 0] = float("inf")
    stats = NormClip(params, max_norm=1.0, nonfinite="zero").clip_()
    assert all(bool((p.grad == 0).all()) for p in params)
    assert not bool(stats.finite)
    assert stats.clipped_norm.item() == 0.0


def test_parameters_without_grads_are_skipped_and_empty_is_fine() -> None:
    params = params_with_grads()
    params[1].grad = None
    ref = clone(params)
    stats = NormClip(params, max_norm=0.3).clip_()
    torch.nn.utils.clip_grad_norm_(ref, 0.3)
    for a, b in zip(params, ref):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert stats.norms.shape == (4,)
    for p in params:
        p.grad = None
    empty = NormClip(params, max_norm=0.3).clip_()
    assert empty.total_norm.item() == 0.0 and not bool(empty.clipped)


def test_step_counts_calls_and_state_dict_round_trips() -> None:
    params = params_with_grads()
    clipper = NormClip(params, max_norm=0.5)
    for _ in range(3):
        stats = clipper.clip_()
    assert stats.step.item() == 3 and clipper.step == 3
    buffer = io.BytesIO()
    torch.save(clipper.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = NormClip(params, max_norm=0.5)
    fresh.load_state_dict(loaded)
    assert fresh.step == 3
    fresh.reset()
    assert fresh.step == 0


def test_load_state_dict_rejects_mismatched_groups() -> None:
    a, b = params_with_grads(1), params_with_grads(2)
    two = NormClip([{"params": a}, {"params": b}], max_norm=1.0)
    one = NormClip(a, max_norm=1.0)
    with pytest.raises(ValueError, match="2 parameter groups"):
        one.load_state_dict(two.state_dict())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: NormClip(p, max_norm=-1.0), "max_norm must be > 0; got -1.0"),
        (lambda p: NormClip(p, max_norm=float("nan")), "max_norm must be a finite number; got nan"),
        (lambda p: NormClip(p, max_norm=0.0), "max_norm must be > 0; got 0.0"),
        (lambda p: NormClip(p, max_norm="1"), "max_norm must be a real number; got '1'"),
        (lambda p: ValueClip(p, clip_value=-2), "clip_value must be > 0; got -2.0"),
        (lambda p: NormClip(p, norm_type=0), "norm_type must be > 0 or inf; got 0.0"),
        (
            lambda p: NormClip(p, nonfinite="skip!"),
            "nonfinite must be one of ignore, raise, zero; got 'skip!'",
        ),
        (
            lambda p: NormClip([{"params": p, "max_nrom": 1.0}]),
            "no option 'max_nrom'; valid options: max_norm",
        ),
        (lambda p: NormClip([{"params": p}, {"params": p[:1]}]), "more than one parameter group"),
        (lambda p: NormClip([]), "got no parameters"),
    ],
)
def test_bad_options_are_clear_errors(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        (ValueError, TypeError), match=match.replace("(", r"\(").replace(")", r"\)")
    ):
        make(params_with_grads())


def test_non_tensor_items_are_type_errors() -> None:
    with pytest.raises(TypeError, match=r"params\[1\] is a str"):
        NormClip([torch.nn.Parameter(torch.zeros(1)), "weight"], max_norm=1.0)


@pytest.mark.parametrize("policy", ["ignore", "zero"])
@pytest.mark.parametrize(
    "make",
    [
        lambda p, n: NormClip(p, 0.5, nonfinite=n),
        lambda p, n: NoClip(p, nonfinite=n),
        lambda p, n: ValueClip(p, 0.1, nonfinite=n),
    ],
)
def test_clip_is_sync_free(no_cpu_branch: None, make, policy: str) -> None:  # type: ignore[no-untyped-def]
    clipper = make(params_with_grads(scale=4.0), policy)
    with no_host_sync():
        for _ in range(3):
            clipper.clip_()


@given(
    scale=st.floats(1e-3, 1e3),
    max_norm=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_normclip_properties(scale: float, max_norm: float, seed: int) -> None:
    params = []
    for p in params_with_grads(seed, scale):
        q = torch.nn.Parameter(p.detach().double())
        q.grad = p.grad.double()
        params.append(q)
    before = [p.grad.clone() for p in params]
    stats = NormClip(params, max_norm=max_norm).clip_()
    after = reference_norm([p.grad for p in params])
    assert after <= max_norm * (1 + 1e-5)
    pre = reference_norm(before)
    if pre <= max_norm * (1 - 1e-5):
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    ratio = stats.scale.item()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b * ratio, rtol=1e-6, atol=1e-12)


@given(
    max_norm=st.floats(1e-3, 10.0),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_normclip_and_functional_bit_identical_to_torch_at_any_threshold(
    max_norm: float, scale: float, seed: int
) -> None:
    # Thresholds such as 0.1 are inexact in float32: a true division by a tensor
    # threshold differs from torch's reciprocal-multiply by one ulp.
    ours, functional, theirs = (params_with_grads(seed, scale) for _ in range(3))
    NormClip(ours, max_norm=max_norm).clip_()
    gradclip.clip_grad_norm_(functional, max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    for a, b, c in zip(ours, functional, theirs):
        assert torch.equal(a.grad, c.grad)
        assert torch.equal(b.grad, c.grad)


# -- load_state_dict checks every state tensor's shape first ---------------------------


def snapshot(clipper: gradclip.Clipper) -> dict[str, object]:
    """A deep copy of everything ``state_dict`` exposes, schedules included."""
    return copy.deepcopy(clipper.state_dict())


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def three(n: int = 3) -> list[torch.nn.Parameter]:
    out = []
    for i in range(n):
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.full((2,), float(i + 1))
        out.append(p)
    return out


def stepped(clipper: gradclip.Clipper, steps: int = 3) -> gradclip.Clipper:
    for _ in range(steps):
        for p in clipper.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 1.5)
        clipper.clip_()
    return clipper


@pytest.mark.parametrize(
    ("saved", "target", "match"),
    [
        (
            lambda: gradclip.ZClip(three(), warmup_steps=10),
            lambda: gradclip.ZClip(three(), warmup_steps=5),
            r"'buffer' of shape \(10,\); this ZClip expects \(5,\); it was saved with "
            r"warmup_steps=10 \(this ZClip: 5\)",
        ),
        (
            lambda: gradclip.AdaGC(three(3)),
            lambda: gradclip.AdaGC(three(4)),
            r"'gamma' of shape \(3,\); this AdaGC expects \(4,\); one entry per parameter: "
            r"the checkpoint's group had 3 parameters, this one has 4",
        ),
        (
            lambda: gradclip.EMARatio(three(), per_tensor=True),
            lambda: gradclip.EMARatio(three(), per_tensor=False),
            r"'ema' of shape \(3,\); this EMARatio expects \(\); it was saved with "
            r"per_tensor=True \(this EMARatio: False\)",
        ),
        (
            lambda: gradclip.EMARatio(three(), per_tensor=False),
            lambda: gradclip.EMARatio(three(), per_tensor=True),
            r"'ema' of shape \(\); this EMARatio expects \(3,\); it was saved with "
            r"per_tensor=False",
        ),
    ],
    ids=["zclip-warmup", "adagc-params", "emaratio-per-tensor", "emaratio-global"],
)
def test_load_state_dict_rejects_other_shapes_and_changes_nothing(saved, target, match) -> None:  # type: ignore[no-untyped-def]
    checkpoint = stepped(saved()).state_dict()
    clipper, twin = stepped(target(), 2), stepped(target(), 2)
    before = snapshot(clipper)
    with pytest.raises(ValueError, match=match):
        clipper.load_state_dict(checkpoint)
    assert_same(snapshot(clipper), before)
    # and it keeps working exactly like a twin that never saw the checkpoint
    for c in (clipper, twin):
        for p in c.param_groups[0]["params"]:
            p.grad = torch.full_like(p, 40.0)
    a, b = clipper.clip_(), twin.clip_()
    assert torch.equal(a.threshold, b.threshold) and torch.equal(a.scale, b.scale)


def test_load_state_dict_without_options_still_names_the_shapes() -> None:
    checkpoint = stepped(gradclip.ZClip(three(), warmup_steps=10)).state_dict()
    del checkpoint["options"]
    with pytest.raises(ValueError, match=r"'buffer' of shape \(10,\); this ZClip expects \(5,\)$"):
        gradclip.ZClip(three(), warmup_steps=5).load_state_dict(checkpoint)


def test_a_schedule_state_that_does_not_fit_changes_nothing() -> None:
    from gradclip.clippers.schedule import RelaxOnCalm

    checkpoint = stepped(NormClip(three(), 1.0, schedule=RelaxOnCalm(window=5)), 4).state_dict()
    clipper = stepped(NormClip(three(), 1.0, schedule=RelaxOnCalm(window=6)), 1)
    before = snapshot(clipper)
    with pytest.raises(ValueError, match=r"window is 6"):
        clipper.load_state_dict(checkpoint)
    assert_same(snapshot(clipper), before)
    assert clipper.step == 1


def test_growing_full_history_loads_at_any_length() -> None:
    long = stepped(gradclip.AutoClip(three(), 50, history="full"), 70)
    fresh = gradclip.AutoClip(three(), 50, history="full")
    assert fresh.state[0]["sorted_history"].shape != long.state[0]["sorted_history"].shape
    fresh.load_state_dict(long.state_dict())
    assert_same(fresh.state_dict(), long.state_dict())


# -- ClipStats.scale is the factor applied, bit for bit --------------------------------


SINGLE_FACTOR = {
    "norm": lambda p: NormClip(p, max_norm=0.37),
    "noclip": lambda p: NoClip(p),
    "zclip": lambda p: gradclip.ZClip(p, warmup_steps=3, z_thresh=0.5),
    "autoclip": lambda p: gradclip.AutoClip(p, 30, window=8),
    "emaratio": lambda p: gradclip.EMARatio(p, ratio=1.2, warmup_steps=2),
    "adagc-warmup": lambda p: gradclip.AdaGC(p, lambda_abs=0.37, warmup_steps=10**6),
}


def random_steps(steps: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        level = float(torch.exp(torch.randn((), generator=g) * 2.0))
        out.append([torch.randn(7, generator=g) * level, torch.randn(3, 2, generator=g) * level])
    return out


@pytest.mark.parametrize("name", list(SINGLE_FACTOR))
def test_stats_scale_is_the_factor_applied_to_the_gradients(name: str) -> None:
    """Over random norms, ``grad_after == grad_before * stats.scale`` exactly, every step.

    Recomputing the scale as clipped_norm / total_norm differs from the applied factor
    by an ulp in a few percent of steps; this would catch it.
    """
    params = [torch.nn.Parameter(torch.zeros(7)), torch.nn.Parameter(torch.zeros(3, 2))]
    clipper = SINGLE_FACTOR[name](params)
    clipped = 0
    for grads in random_steps(400, seed=11):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        stats = clipper.clip_()
        assert stats.scale.dtype == stats.total_norm.dtype
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g * stats.scale), clipper.step
        clipped += bool(stats.clipped)
    assert name == "noclip" or clipped > 50


@pytest.mark.parametrize("name", ["norm", "zclip", "autoclip"])
def test_clip_and_measure_report_the_same_scale(name: str) -> None:
    a = [torch.nn.Parameter(torch.zeros(7)), torch.nn.Parameter(torch.zeros(3, 2))]
    b = [torch.nn.Parameter(torch.zeros(7)), torch.nn.Parameter(torch.zeros(3, 2))]
    clipping, measuring = SINGLE_FACTOR[name](a), SINGLE_FACTOR[name](b)
    for grads in random_steps(400, seed=12):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        clipped, measured = clipping.clip_(), measuring.measure_()
        assert torch.equal(clipped.scale, measured.scale), clipping.step
        assert torch.equal(clipped.threshold, measured.threshold)


def test_zero_policy_reports_scale_zero_on_a_nonfinite_step() -> None:
    for bad in (math.nan, math.inf):
        params = params_with_grads()
        params[1].grad[0] = bad
        stats = NormClip(params, max_norm=1.0, nonfinite="zero").clip_()
        assert stats.scale.item() == 0.0 and stats.clipped_norm.item() == 0.0
        two = params_with_grads(3) + params_with_grads(4)
        two[6].grad[0] = bad
        clipper = NormClip([{"params": two[:5]}, {"params": two[5:]}], 1.0, nonfinite="zero")
        assert clipper.clip_().scale.item() == 0.0


# -- sparse gradients: named, and nothing changes ----------------------------------------


SPARSE_CASES = {
    "norm": lambda p: NormClip(p, max_norm=1e-3),
    "value": lambda p: ValueClip(p, clip_value=1e-3),
    "noclip": lambda p: NoClip(p),
    "agc": lambda p: gradclip.AGC(p),
    "zclip": lambda p: gradclip.ZClip(p, warmup_steps=1),
    "autoclip": lambda p: gradclip.AutoClip(p, 10),
    "adagc": lambda p: gradclip.AdaGC(p, warmup_steps=1),
    "emaratio": lambda p: gradclip.EMARatio(p, per_tensor=True, warmup_steps=0),
}


@pytest.mark.parametrize("where", [0, 3, 7])
@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_a_sparse_gradient_is_named_and_nothing_changes(name: str, where: int) -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(8)]
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    groups = [{"params": named[:5]}, {"params": named[5:]}]
    for p in params:
        p.grad = torch.randn(4, 3) * 10
    clipper = SPARSE_CASES[name](groups)
    clipper.clip_()  # a dense step first: there is state to keep
    for p in params:
        p.grad = torch.randn(4, 3) * 10
    params[where].grad = params[where].grad.to_sparse()
    before = [p.grad.clone() for p in params]
    state = snapshot(clipper)
    message = rf"gradient of layer{where}\.weight has layout torch\.sparse_coo; gradclip supports"
    with pytest.raises(TypeError, match=message) as raised:
        clipper.clip_()
    error = raised.value  # the named error alone, not chained to torch's kernel error
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert clipper.step == 1
    assert_same(snapshot(clipper), state)
    for p, b in zip(params, before):
        assert torch.equal(p.grad.to_dense(), b.to_dense())


def test_other_errors_of_the_norm_pass_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    clipper = NormClip(params_with_grads(), max_norm=1.0)

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("norm kernel broke")

    monkeypatch.setattr(clipper, "_tensor_norms", broken)
    with pytest.raises(RuntimeError, match="norm kernel broke"):
        clipper.clip_()
    assert clipper.step == 0


def test_raise_names_the_norm_order_when_the_norm_overflows() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.full((2,), 3e38), torch.full((2,), 3e38)
    clipper = NormClip([("a", a), ("b", b)], 1.0, norm_type=1.0, nonfinite="raise")
    # Each tensor's 1-norm (6e38) already overflows float32; every value is finite.
    with pytest.raises(NonFiniteGradientError, match=r"norm of order 1\.0 overflowed.*of a"):
        clipper.clip_()
    assert torch.equal(a.grad, torch.full((2,), 3e38))
