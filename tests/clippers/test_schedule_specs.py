"""Schedules from strings, and on the adaptive strategies (AutoClip, ZClip, EMARatio, AdaGC)."""

from __future__ import annotations

import pytest
import torch

from gradclip import AdaGC, AutoClip, EMARatio, NormClip, ZClip, from_spec
from gradclip.clippers.schedule import Constant, Cosine, LinearWarmup, RelaxOnCalm, parse_schedule


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("constant", Constant()),
        ("constant:0.5", Constant(0.5)),
        ("warmup:100", LinearWarmup(100)),
        ("warmup:100:0.2", LinearWarmup(100, 0.2)),
        ("cosine:1000", Cosine(1000)),
        ("COSINE:10:0.05", Cosine(10, 0.05)),
        ("relax", RelaxOnCalm()),
        ("relax:20", RelaxOnCalm(20)),
    ],
)
def test_parse_schedule(text: str, expected: object) -> None:
    def options(schedule: object) -> dict[str, object]:
        return {k: v for k, v in vars(schedule).items() if not isinstance(v, torch.Tensor)}

    parsed = parse_schedule(text)
    assert type(parsed) is type(expected) and options(parsed) == options(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linear:10", "unknown schedule 'linear:10'; valid: constant"),
        ("cosine", "wrong number of arguments"),
        ("warmup:1:2:3", "wrong number of arguments"),
        ("cosine:ten", "malformed number"),
        ("warmup:0", "warmup_steps"),
    ],
)
def test_bad_schedule_strings(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_schedule(text)


def params(scale: float) -> list[torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), scale)
    return [p]


def test_spec_with_a_schedule_equals_the_instance() -> None:
    a, b = params(3.0), params(3.0)
    by_spec = from_spec("norm:1.0,schedule=warmup:4:0.25", a)
    by_hand = NormClip(b, max_norm=1.0, schedule=LinearWarmup(4, 0.25))
    for _ in range(6):
        a[0].grad.fill_(3.0)
        b[0].grad.fill_(3.0)
        assert torch.equal(by_spec.clip_().threshold, by_hand.clip_().threshold)
        assert torch.equal(a[0].grad, b[0].grad)


@pytest.mark.parametrize(
    "make",
    [
        lambda p, s: AutoClip(p, percentile=50, history="full", schedule=s),
        lambda p, s: ZClip(p, warmup_steps=3, z_thresh=1.0, schedule=s),
        lambda p, s: EMARatio(p, ratio=1.5, beta=0.5, warmup_steps=2, schedule=s),
        lambda p, s: EMARatio(p, ratio=1.5, beta=0.5, per_tensor=True, warmup_steps=2, schedule=s),
        lambda p, s: AdaGC(p, lambda_abs=1.5, lambda_rel=1.2, warmup_steps=3, schedule=s),
    ],
    ids=["autoclip", "zclip", "emaratio", "emaratio-per-tensor", "adagc"],
)
def test_adaptive_strategies_scale_the_applied_threshold_only(make) -> None:  # type: ignore[no-untyped-def]
    norms = [1.0, 1.2, 0.9, 1.1, 5.0, 1.0, 8.0, 1.05]
    plain_params, scheduled_params = params(1.0), params(1.0)
    plain = make(plain_params, None)
    scheduled = make(scheduled_params, Constant(0.5))
    clipped = []
    for norm in norms:
        for p in (plain_params, scheduled_params):
            p[0].grad.fill_(norm / 2.0)  # ‖g‖ = norm for 4 elements of norm/2
        a, b = plain.clip_(), scheduled.clip_()
        torch.testing.assert_close(b.threshold, a.threshold * 0.5)
        clipped.append(bool(b.clipped))
        # the statistics never see the schedule: states stay identical
        for key, value in plain.state[0].items():
            other = scheduled.state[0][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), key
    assert any(clipped)  # the halved threshold bites


def test_schedule_state_round_trips_through_specs() -> None:
    clipper = from_spec("autoclip:p=10,schedule=relax:5", params(1.0))
    for _ in range(7):
        clipper.clip_()
    fresh = from_spec("autoclip:p=10,schedule=relax:5", params(1.0))
    fresh.load_state_dict(clipper.state_dict())
    assert fresh.state_dict()["schedules"][0].keys() == clipper.state_dict()["schedules"][0].keys()
    for key, value in clipper.state_dict()["schedules"][0].items():
        other = fresh.state_dict()["schedules"][0][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize(
    "spec",
    ["emaratio:r=1.5,warmup_steps=2,schedule=relax:3", "adagc:warmup_steps=2,schedule=relax:3"],
)
def test_per_tensor_strategies_checkpoint_their_schedule(spec: str) -> None:
    """A RelaxOnCalm schedule's state goes into the clipper's checkpoint and back: the
    resumed clipper continues bit for bit (the factor grows on calm norms)."""

    def grads(step: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return [torch.randn(4, generator=g) * (1 + 0.01 * step), torch.randn(3, generator=g)]

    def run(clipper, ps, steps: range) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        out = []
        for step in steps:
            for p, g in zip(ps, grads(step)):
                p.grad = g
            out.append(clipper.clip_().threshold)
            out += [p.grad.clone() for p in ps]
        return out

    def fresh() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]

    a, b = fresh(), fresh()
    straight, first = from_spec(spec, a), from_spec(spec, b)
    run(straight, a, range(8))
    run(first, b, range(8))
    resumed = from_spec(spec, b)
    resumed.load_state_dict(first.state_dict())
    schedule = resumed.param_groups[0]["schedule"]
    assert isinstance(schedule, RelaxOnCalm) and float(schedule.current_factor) > 1.0
    for x, y in zip(run(straight, a, range(8, 14)), run(resumed, b, range(8, 14))):
        assert torch.equal(x, y)
