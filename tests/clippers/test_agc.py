"""The AGC clipper against clip_grad_agc_ and a slow per-unit reference from the paper's rule.

Brock et al. 2021 (arXiv 2102.06171), ALGORITHMS.md: for each unit i (a dim-0 slice of
a tensor with ndim >= 2, the whole tensor otherwise)::

    ‖W_i‖* = max(‖W_i‖, eps)
    if ‖G_i‖ / ‖W_i‖* > λ:  G_i ← λ · ‖W_i‖* / max(‖G_i‖, 1e-6) · G_i
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradclip
from gradclip import NonFiniteGradientError, from_spec
from gradclip.clippers.agc import AGC, final_classifier_names
from sync_guard import no_host_sync

SHAPES = {
    "mlp": [(16, 8), (16,), (4, 16), (4,)],
    "conv": [(8, 3, 3, 3), (8,), (4, 8, 1, 1), (4,)],
    "scalars-and-same": [(), (), (5, 7), (5, 7), (5, 7), (3,)],
    "large": [(300, 300), (17,)],
}


def make(shapes, *, seed: int = 0, grad_scale: float = 0.02, dtype=torch.float32, no_grad=()):
    """Weights ~ N(0, 1); each unit's gradient ~ N(0, s²) with s = grad_scale · 10^U(-1.5, 1.5).

    With clip_factor near grad_scale, some units are over their bound and some under.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        w = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        if i not in no_grad:
            rows = shape[0] if len(shape) >= 2 else 1
            exponent = torch.rand(rows, generator=g, dtype=torch.float64) * 3 - 1.5
            scale = (grad_scale * 10**exponent).reshape((rows,) + (1,) * max(len(shape) - 1, 0))
            grad = torch.randn(shape, generator=g, dtype=torch.float64)
            grad = grad * (scale if len(shape) >= 2 else scale.reshape(()))
            w.grad = grad.to(dtype)
        out.append(w)
    return out


def clone(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def units(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t) if t.ndim >= 2 else [t]


def reference(params, clip_factor=0.01, eps=1e-3):
    """Slow: loop over units in float64; returns (grads, pre norm, post norm, bound norm, any)."""
    out, pre, post, bound_sq, any_clipped = [], 0.0, 0.0, 0.0, False
    for p in params:
        if p.grad is None:
            out.append(None)
            continue
        w64, g64 = p.detach().double(), p.grad.double().clone()
        for w_i, g_i in zip(units(w64), units(g64)):
            w_norm = max(float(w_i.norm()), eps)
            g_norm = float(g_i.norm())
            bound = clip_factor * w_norm
            bound_sq += bound**2
            pre += g_norm**2
            if g_norm / w_norm > clip_factor:
                g_i.mul_(bound / max(g_norm, 1e-6))
                any_clipped = True
            post += float(g_i.norm()) ** 2
        out.append(g64)
    return out, math.sqrt(pre), math.sqrt(post), math.sqrt(bound_sq), any_clipped


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_factor", [0.01, 0.05])
def test_agc_equals_functional_bit_for_bit(name: str, dtype: torch.dtype, clip_factor) -> None:
    ours = make(SHAPES[name], dtype=dtype, no_grad=(1,))
    theirs = clone(ours)
    stats = AGC(ours, clip_factor).clip_()
    total = gradclip.clip_grad_agc_(theirs, clip_factor)
    for a, b in zip(ours, theirs):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    # Two summation orders (torch's fused per-tensor norm vs the unit norms): a 90000-element
    # fp32 tensor differs by ~6e-6 relative between them.
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(stats.total_norm, total, rtol=rtol, atol=0)


def test_steps_reuse_buffers_without_leaking_between_steps() -> None:
    """The clipper keeps its factor buffers from step to step; every step stands alone.

    Steps alternate data that clips some units, none, and all, and which parameters
    have a gradient (a stacked group of another size); each must equal the stateless
    function on a copy, and stats already returned must not change with later steps.
    """
    shapes = [(6, 5)] * 8 + [()] * 3 + [(4,), (9, 2, 2)]
    params = make(shapes, seed=1)
    clipper = AGC(params, 0.05)
    kept: list[tuple[object, torch.Tensor]] = []
    for step, (seed, grad_scale, missing) in enumerate(
        [(2, 0.05, ()), (3, 1e-5, ()), (4, 10.0, (0, 9)), (5, 0.05, ()), (6, 0.05, (3,))]
    ):
        fresh = make(shapes, seed=seed, grad_scale=grad_scale, no_grad=missing)
        for p, f in zip(params, fresh):
            p.grad = f.grad
        theirs = clone(params)
        stats = clipper.clip_()
        gradclip.clip_grad_agc_(theirs, 0.05)
        for a, b in zip(params, theirs):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                assert torch.equal(a.grad, b.grad), f"step {step}"
        assert bool(stats.clipped) == (grad_scale > 1e-3), f"step {step}"
        kept.append((stats, stats.clipped_norm.clone()))
    for stats, clipped_norm in kept:
        assert torch.equal(stats.clipped_norm, clipped_norm)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agc_matches_slow_reference_and_reports(name: str, dtype: torch.dtype) -> None:
    params = make(SHAPES[name], dtype=dtype, seed=3)
    expected, pre, post, bound, any_clipped = reference(params, 0.02, 1e-3)
    stats = AGC(params, clip_factor=0.02).clip_()
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=rtol, atol=1e-12)
    assert stats.total_norm.item() == pytest.approx(pre, rel=rtol * 10)
    assert stats.clipped_norm.item() == pytest.approx(post, rel=rtol * 10)
    assert stats.threshold.item() == pytest.approx(bound, rel=rtol * 10)
    assert bool(stats.clipped) == any_clipped
    assert stats.scale.item() == pytest.approx(post / pre, rel=rtol * 10)


def test_reference_data_clips_some_units_but_not_all() -> None:
    """The shape sets exercise both branches of the rule (else the tests prove little)."""
    for shapes in SHAPES.values():
        params = make(shapes, seed=3)
        expected = reference(params, 0.02)[0]
        flags = [
            not torch.equal(e_i, g_i)
            for p, e in zip(params, expected)
            for e_i, g_i in zip(units(e), units(p.grad.double()))
        ]
        assert any(flags) and not all(flags)


def test_zero_weights_use_the_eps_floor() -> None:
    w = nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.ones(3, 2)
    AGC([w], clip_factor=0.1, eps=1e-3).clip_()
    torch.testing.assert_close(w.grad.norm(dim=1), torch.full((3,), 1e-4))


def named_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16)))
    model.add_module("head", nn.Linear(16, 3))
    model(torch.randn(32, 6)).pow(2).sum().mul(100).backward()
    return model


@pytest.mark.parametrize(
    "exclude",
    [
        "head.*",
        ["head.weight", "head.bias"],
        lambda name, param: name.startswith("head."),
    ],
    ids=["pattern", "names", "predicate"],
)
def test_exclude_leaves_grads_bit_identical(exclude) -> None:
    model = named_mlp()
    head_before = [p.grad.clone() for p in model.head.parameters()]
    body = clone(list(model.body.parameters()))
    all_before = [p.grad.clone() for p in model.parameters()]
    clipper = AGC(model.named_parameters(), clip_factor=0.01, exclude=exclude)
    assert clipper.excluded_names == ["head.weight", "head.bias"]
    stats = clipper.clip_()
    for p, before in zip(model.head.parameters(), head_before):
        assert torch.equal(p.grad, before)
    # The body is clipped exactly as AGC alone on the body.
    gradclip.clip_grad_agc_(body, 0.01)
    for p, q in zip(model.body.parameters(), body):
        assert torch.equal(p.grad, q.grad)
    assert bool(stats.clipped)
    # Excluded norms count in total_norm and clipped_norm; the threshold covers the body only.
    pre = math.sqrt(sum(float(g.double().norm()) ** 2 for g in all_before))
    post = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(post, rel=1e-5)
    bound = reference(list(model.body.parameters()), 0.01)[3]
    assert stats.threshold.item() == pytest.approx(bound, rel=1e-5)


def test_exclude_by_predicate_on_the_parameter() -> None:
    params = make(SHAPES["mlp"], grad_scale=1.0)
    biases = [p.grad.clone() for p in params if p.ndim == 1]
    AGC(params, clip_factor=0.01, exclude=lambda name, p: p.ndim == 1).clip_()
    assert all(torch.equal(p.grad, b) for p, b in zip([p for p in params if p.ndim == 1], biases))


def test_everything_excluded_means_no_clipping() -> None:
    params = make(SHAPES["mlp"], grad_scale=1.0)
    before = [p.grad.clone() for p in params]
    stats = AGC(params, exclude="params*").clip_()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert math.isinf(stats.threshold.item()) and not bool(stats.clipped)
    assert stats.scale.item() == 1.0


def test_plain_parameters_are_named_by_position() -> None:
    params = make(SHAPES["mlp"], grad_scale=1.0)
    before = params[1].grad.clone()
    clipper = AGC(params, exclude="params[1]")
    assert clipper.excluded_names == ["params[1]"]
    clipper.clip_()
    assert torch.equal(params[1].grad, before)


def test_exclude_pattern_matching_nothing_is_an_error_with_a_hint() -> None:
    model = named_mlp()
    with pytest.raises(ValueError, match=r"'head\.\*' matches no parameter.*named_parameters"):
        AGC(model.parameters(), exclude="head.*")
    with pytest.raises(ValueError, match="'nope'"):
        AGC([{"params": list(model.named_parameters()), "exclude": ["head.bias", "nope"]}])


def test_param_groups_have_their_own_options() -> None:
    model = named_mlp()
    body, head = clone(list(model.body.parameters())), clone(list(model.head.parameters()))
    AGC(
        [
            {"params": list(model.body.named_parameters()), "clip_factor": 0.02},
            {"params": list(model.head.named_parameters()), "clip_factor": 0.5, "eps": 0.1},
        ]
    ).clip_()
    gradclip.clip_grad_agc_(body, 0.02)
    gradclip.clip_grad_agc_(head, 0.5, 0.1)
    for p, q in zip(model.parameters(), body + head):
        assert torch.equal(p.grad, q.grad)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4, 8)
        self.classifier = nn.Linear(8, 10)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.block = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.embed.weight


def test_final_classifier_names() -> None:
    assert final_classifier_names(SmallCNN()) == ["classifier.weight", "classifier.bias"]
    mlp = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1, bias=False))
    assert final_classifier_names(mlp) == ["2.weight"]
    # A tied head is reported under the name named_parameters() gives it.
    assert final_classifier_names(TiedLM()) == ["embed.weight"]
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        final_classifier_names(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_final_classifier_names_feed_exclude() -> None:
    model = SmallCNN()
    x = torch.randn(2, 3, 6, 6)
    model.classifier(model.fc1(model.flatten(model.features(x)))).pow(2).sum().backward()
    before = model.classifier.weight.grad.clone()
    AGC(model.named_parameters(), exclude=final_classifier_names(model)).clip_()
    assert torch.equal(model.classifier.weight.grad, before)


def test_nonfinite_policies() -> None:
    params = make(SHAPES["mlp"], grad_scale=1.0)
    params[2].grad[0, 0] = math.nan
    before = [p.grad.clone() for p in params]
    named = [(f"layer{i}", p) for i, p in enumerate(params)]
    with pytest.raises(NonFiniteGradientError, match="layer2"):
        AGC(named, nonfinite="raise").clip_()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
    stats = AGC(params, nonfinite="zero").clip_()
    assert not bool(stats.finite)
    assert all(bool((p.grad == 0).all()) for p in params)
    assert stats.clipped_norm.item() == 0.0


def test_checkpoint_round_trip_is_bit_identical() -> None:
    """AGC is stateless, but its step count and options must survive a weights_only round trip."""
    model = named_mlp()
    a = AGC(model.named_parameters(), clip_factor=0.02, exclude="head.*")
    for _ in range(3):
        a.clip_()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = AGC(model.named_parameters(), clip_factor=0.02, exclude="head.*")
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.step == 3
    grads = [p.grad.clone() for p in model.parameters()]
    sa = a.clip_()
    after_a = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    sb = b.clip_()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), after_a))
    assert torch.equal(sa.clipped_norm, sb.clipped_norm) and int(sb.step) == 4
    b.reset()
    assert b.step == 0


def test_from_spec() -> None:
    model = named_mlp()
    clipper = from_spec("agc:0.02,exclude=head.*", model.named_parameters())
    assert isinstance(clipper, AGC)
    assert clipper.param_groups[0]["clip_factor"] == 0.02
    assert clipper.excluded_names == ["head.weight", "head.bias"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_factor": 0.0}, "clip_factor must be > 0; got 0.0"),
        ({"clip_factor": -0.5}, "clip_factor must be > 0; got -0.5"),
        ({"clip_factor": math.nan}, "clip_factor must be a finite number; got nan"),
        ({"clip_factor": "big"}, "clip_factor must be a real number; got 'big'"),
        ({"eps": -1e-3}, "eps must be >= 0; got -0.001"),
        ({"exclude": 3}, "exclude must be None.*got 3"),
        ({"exclude": ["a.*", 7]}, "patterns must be strings; got 7"),
        ({"nonfinite": "skip"}, "nonfinite must be one of.*'skip'"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        AGC(make(SHAPES["mlp"]), **kwargs)


@pytest.mark.parametrize("policy", ["ignore", "zero"])
def test_clip_is_sync_free(no_cpu_branch: None, policy: str) -> None:
    model = named_mlp()
    clipper = AGC(model.named_parameters(), exclude="head.*", nonfinite=policy)
    params = make(SHAPES["scalars-and-same"], grad_scale=1.0)
    plain = AGC(params)
    with no_host_sync():
        stats = clipper.clip_()
        plain.clip_()
    assert bool(stats.clipped)


def test_clip_on_a_device_copies_nothing_from_the_host() -> None:
    # ``meta`` stands in for an accelerator: the guard fails on a host-to-device copy
    # (an index built from a Python list each step), which waits for the device.
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)).to("meta")
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    excluding = AGC(model.named_parameters(), exclude="2.*")
    every = AGC(model.parameters())
    with no_host_sync():
        for _ in range(2):
            excluding.clip_()
            every.clip_()


shape_lists = st.lists(
    st.sampled_from([(), (3,), (4, 3), (2, 3, 2), (5, 1)]), min_size=1, max_size=5
)


@given(
    shapes=shape_lists,
    seed=st.integers(0, 2**16),
    grad_scale=st.sampled_from([1e-4, 0.05, 10.0]),
    clip_factor=st.sampled_from([1e-3, 0.01, 0.3]),
)
def test_property_units_are_bounded_and_directions_kept(shapes, seed, grad_scale, clip_factor):
    params = make(shapes, seed=seed, grad_scale=grad_scale, dtype=torch.float64)
    before = [p.grad.clone() for p in params]
    stats = AGC(params, clip_factor=clip_factor).clip_()
    for p, b in zip(params, before):
        for w_i, g_i, b_i in zip(units(p.detach()), units(p.grad), units(b)):
            bound = clip_factor * max(float(w_i.norm()), 1e-3)
            assert float(g_i.norm()) <= bound * (1 + 1e-9) or torch.equal(g_i, b_i)
            if float(b_i.norm()) <= bound:  # under the bound: untouched
                assert torch.equal(g_i, b_i)
            else:  # over: same direction, scaled down
                c = float(g_i.norm()) / float(b_i.norm())
                assert 0 < c < 1
                torch.testing.assert_close(g_i, b_i * c, rtol=1e-9, atol=1e-300)
    assert stats.clipped_norm.item() <= stats.total_norm.item() * (1 + 1e-12)
    assert 0.0 <= stats.scale.item() <= 1.0
    post = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params))
    assert stats.clipped_norm.item() == pytest.approx(post, rel=1e-9, abs=1e-300)


@pytest.fixture
def mesh(tmp_path):
    """A gloo group of world size 1 and a 1-device CPU mesh (the DTensor code paths run)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "s"), 1), rank=0, world_size=1
    )
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


def test_dtensor_gradients_match_plain(mesh) -> None:
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    plain = make(SHAPES["mlp"], seed=5)
    placements = [[Shard(0)], [Shard(0)], [Replicate()], None]
    mixed = []
    for p, placement in zip(plain, placements):
        if placement is None:
            q = nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
        else:
            q = nn.Parameter(distribute_tensor(p.detach().clone(), mesh, placement))
            q.grad = distribute_tensor(p.grad.clone(), mesh, placement)
        mixed.append(q)
    expected = AGC(plain, 0.02, exclude="params[3]").clip_()
    stats = AGC(mixed, 0.02, exclude="params[3]").clip_()
    for q, p in zip(mixed, plain):
        got = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=0)
    for field in ("total_norm", "clipped_norm", "threshold", "scale"):
        torch.testing.assert_close(
            getattr(stats, field), getattr(expected, field), rtol=1e-6, atol=0
        )
    assert bool(stats.clipped) == bool(expected.clipped)
    with pytest.raises(NotImplementedError, match="only Shard"):
        w = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(1)]))
        AGC([w])
