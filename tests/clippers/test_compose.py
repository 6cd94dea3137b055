"""chain(): members applied in order, and the composed ClipStats against references."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradclip
from gradclip.clippers.agc import AGC
from gradclip.clippers.compose import Chain, chain
from gradclip.clippers.fixed import NoClip, NormClip
from gradclip.clippers.schedule import RelaxOnCalm
from gradclip.clippers.value import ValueClip
from sync_guard import no_host_sync

SHAPES = [(8, 4), (8,), (6, 8), (6,), (3, 6), (3,)]


def make(seed: int = 0, scale: float = 1.0, shapes=SHAPES) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * scale
        out.append(p)
    return out


def clone(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def cap(params, max_norm: float) -> None:
    """A global-norm cap applied by hand: a fresh NormClip (bit-identical to torch's
    clip_grad_norm_ only for thresholds exact in float32; see test_base for that parity)."""
    NormClip(params, max_norm=max_norm).clip_()


def norm64(params) -> float:
    grads = [p.grad.double().flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def test_agc_then_global_cap_equals_applying_by_hand() -> None:
    ours, theirs = make(scale=3.0), None
    theirs = clone(ours)
    pre = norm64(ours)
    clipper = chain(AGC(ours, clip_factor=0.1), NormClip(ours, max_norm=0.5))
    assert not clipper.needs_extra_pass
    stats = clipper.clip_()
    gradclip.clip_grad_agc_(theirs, 0.1)
    mid = norm64(theirs)
    cap(theirs, 0.5)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(norm64(theirs), rel=1e-5)
    assert stats.scale.item() == pytest.approx(norm64(theirs) / pre, rel=1e-5)
    assert bool(stats.clipped) and bool(stats.finite) and int(stats.step) == 1
    # Same parameters: the tighter of the two thresholds.
    agc_threshold = AGC(clone(ours), clip_factor=0.1).clip_().threshold.item()
    assert stats.threshold.item() == pytest.approx(min(agc_threshold, 0.5), rel=1e-6)
    assert mid > 0.5  # the cap really acted after AGC


def test_disjoint_members_equal_each_applied_alone() -> None:
    params = make(scale=3.0)
    body, head = params[:4], params[4:]
    body_alone, head_alone = clone(body), clone(head)
    pre_body, pre_head = norm64(body), norm64(head)
    clipper = chain(AGC(body, clip_factor=0.05), NormClip(head, max_norm=0.3))
    stats = clipper.clip_()
    s_body = AGC(body_alone, clip_factor=0.05).clip_()
    s_head = NormClip(head_alone, max_norm=0.3).clip_()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, body_alone + head_alone))
    assert stats.total_norm.item() == pytest.approx(math.hypot(pre_body, pre_head), rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(norm64(params), rel=1e-5)
    assert stats.threshold.item() == pytest.approx(
        math.hypot(s_body.threshold.item(), s_head.threshold.item()), rel=1e-6
    )
    assert torch.equal(stats.norms, torch.cat([s_body.norms, s_head.norms]))
    assert [id(p) for p in stats.params] == [id(p) for p in params]


def test_blocks_merge_without_an_extra_pass() -> None:
    params = make(scale=3.0)
    body, head = params[:4], params[4:]
    reference = clone(params)
    clipper = chain(AGC(body, 0.05), NormClip(head, max_norm=0.3), NormClip(params, max_norm=0.4))
    assert not clipper.needs_extra_pass
    pre = norm64(params)
    stats = clipper.clip_()
    gradclip.clip_grad_agc_(reference[:4], 0.05)
    cap(reference[4:], 0.3)
    cap(reference, 0.4)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, reference))
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(norm64(params), rel=1e-5)
    assert stats.clipped_norm.item() == pytest.approx(0.4, rel=1e-5)


def test_partial_overlap_takes_one_extra_pass_and_is_exact() -> None:
    params = make(scale=3.0)
    a_b, b_c = params[:4], params[2:]
    reference = clone(params)
    pre_norms = [float(p.grad.double().norm()) for p in params]
    clipper = chain(NormClip(a_b, max_norm=0.5), ValueClip(b_c, clip_value=0.05))
    assert clipper.needs_extra_pass
    stats = clipper.clip_()
    cap(reference[:4], 0.5)
    torch.nn.utils.clip_grad_value_(reference[2:], 0.05)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, reference))
    assert stats.total_norm.item() == pytest.approx(math.sqrt(sum(n * n for n in pre_norms)))
    assert stats.clipped_norm.item() == pytest.approx(norm64(params), rel=1e-5)
    # Per-tensor norms: each parameter's pre-clip norm, first-seen order.
    assert stats.norms.tolist() == pytest.approx(pre_norms, rel=1e-6)
    # A later member covering the whole union makes the extra pass unnecessary again.
    assert not chain(NormClip(a_b), NormClip(b_c), NormClip(params)).needs_extra_pass


def test_nested_chains() -> None:
    params = make(scale=3.0)
    reference = clone(params)
    inner = chain(AGC(params[:4], 0.05), NormClip(params[4:], max_norm=0.3))
    outer = chain(inner, NormClip(params, max_norm=0.4))
    pre = norm64(params)
    stats = outer.clip_()
    gradclip.clip_grad_agc_(reference[:4], 0.05)
    cap(reference[4:], 0.3)
    cap(reference, 0.4)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, reference))
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-6)
    assert stats.clipped_norm.item() == pytest.approx(norm64(params), rel=1e-5)
    assert len(outer.param_groups) == 3 and len(outer.params) == len(params)


def test_nonfinite_and_missing_grads() -> None:
    params = make()
    params[1].grad = None
    params[4].grad[0] = math.nan
    stats = chain(NormClip(params[:3]), NormClip(params[3:])).clip_()
    assert not bool(stats.finite) and math.isnan(stats.total_norm.item())
    assert len(stats.norms) == len(params) - 1
    empty = make()
    for p in empty:
        p.grad = None
    stats = chain(NormClip(empty), AGC(empty)).clip_()
    assert stats.total_norm.item() == 0.0 and stats.scale.item() == 1.0


def grads_for(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return [torch.randn(s, generator=g) * (1.0 + step % 3) for s in SHAPES]


def run(clipper: Chain, params, steps: range) -> list[torch.Tensor]:
    out = []
    for step in steps:
        for p, g in zip(params, grads_for(step)):
            p.grad = g
        clipper.clip_()
        out.extend(p.grad.clone() for p in params)
    return out


def build(params) -> Chain:
    return chain(
        AGC(params[:4], clip_factor=0.05),
        NormClip(params, max_norm=1.0, schedule=RelaxOnCalm(window=3, max_cv=0.9, growth=1.5)),
    )


def test_checkpoint_round_trip_is_bit_identical() -> None:
    params = make()
    whole = run(build(params), params, range(12))
    first = build(params)
    head = run(first, params, range(5))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build(params)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.step == 5 and second[1].step == 5
    tail = run(second, params, range(5, 12))
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole))
    second.reset()
    assert second.step == 0 and all(m.step == 0 for m in second)
    schedule = second[1].param_groups[0]["schedule"]
    assert schedule.current_factor.item() == 1.0


def test_errors_name_the_problem() -> None:
    params = make()
    with pytest.raises(ValueError, match="at least one clipper"):
        chain()
    norm = NormClip(params)
    with pytest.raises(ValueError, match="same clipper twice"):
        chain(norm, norm)
    with pytest.raises(TypeError, match="member 1 is a list"):
        chain(norm, params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"different norm_type values \[2.0, inf\]"):
        chain(AGC(params), NormClip(params, norm_type=math.inf))
    with pytest.raises(ValueError, match="2 chain members; this chain has 1"):
        chain(NoClip(params)).load_state_dict(chain(NoClip(params), NoClip(params)).state_dict())


@pytest.mark.parametrize("overlap", ["same", "disjoint", "partial"])
def test_chain_is_sync_free(no_cpu_branch: None, overlap: str) -> None:
    params = make(scale=3.0)
    second = {"same": params, "disjoint": params[4:], "partial": params[2:]}[overlap]
    relax = RelaxOnCalm(window=2)
    clipper = chain(AGC(params[:4], 0.05), NormClip(second, max_norm=0.5, schedule=relax))
    with no_host_sync():
        stats = [clipper.clip_() for _ in range(3)]
    assert bool(stats[0].clipped)


@given(
    assignment=st.lists(
        st.sets(st.integers(0, len(SHAPES) - 1), min_size=1), min_size=1, max_size=4
    ),
    seed=st.integers(0, 1000),
    max_norm=st.sampled_from([0.2, 1.0, 100.0]),
)
def test_property_stats_match_the_union(assignment, seed, max_norm) -> None:
    """Any overlap pattern: total/clipped norms are those of the union, scale in [0, 1]."""
    params = make(seed, scale=2.0)
    reference = clone(params)
    members = [
        NormClip([params[i] for i in sorted(s)], max_norm=max_norm * (k + 1))
        for k, s in enumerate(assignment)
    ]
    touched = sorted(set().union(*assignment))
    pre = norm64([params[i] for i in touched])
    stats = chain(*members).clip_()
    for k, s in enumerate(assignment):
        cap([reference[i] for i in sorted(s)], max_norm * (k + 1))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, reference))
    assert stats.total_norm.item() == pytest.approx(pre, rel=1e-5)
    assert stats.clipped_norm.item() == pytest.approx(
        norm64([params[i] for i in touched]), rel=1e-5
    )
    assert 0.0 <= stats.scale.item() <= 1.0 + 1e-6
    assert {id(p) for p in stats.params} == {id(params[i]) for i in touched}


def test_first_seen_norms_follow_the_gradients_present_at_each_step() -> None:
    """The first-seen bookkeeping is cached between steps; it must follow every change
    of which parameters have gradients, including a return to an earlier set."""
    params = make()
    members = [NoClip(params[2:]), NoClip(params[:4]), NoClip(params)]
    outer = chain(chain(members[0], members[1]), members[2])
    missing_by_step = [(), (), (3,), (3,), (), (0, 5), (), (2, 3, 4, 5), (2, 3, 4, 5), ()]
    for step, missing in enumerate(missing_by_step):
        for i, (p, g) in enumerate(zip(params, grads_for(step))):
            p.grad = None if i in missing else g
        stats = outer.clip_()
        # the reference: member by member, each parameter with a gradient the first time
        order: list[int] = []
        for bound in (range(2, 6), range(4), range(6)):
            order += [i for i in bound if i not in missing and i not in order]
        assert [id(q) for q in stats.params] == [id(params[i]) for i in order], step
        expected = torch.stack([params[i].grad.norm() for i in order])
        torch.testing.assert_close(stats.norms, expected, rtol=1e-6, atol=0)
        assert stats.total_norm.item() == pytest.approx(norm64(params), rel=1e-6)
