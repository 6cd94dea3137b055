"""Threshold schedules: closed forms, the relax-on-calm rule against a slow reference,
NormClip integration, checkpoints, sync-freedom and argument checks."""

from __future__ import annotations

import io
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradclip import from_spec
from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.compose import chain
from gradclip.clippers.fixed import NormClip
from gradclip.clippers.schedule import Constant, Cosine, LinearWarmup, RelaxOnCalm, Schedule
from sync_guard import no_host_sync


def params_with_grads(seed: int = 0, scale: float = 1.0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(6, 4), (6,), (3, 6), ()]:
        p = nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * scale
        out.append(p)
    return out


def thresholds(schedule: Schedule, steps: int, base: float = 2.0) -> list[float]:
    return [schedule(t, torch.tensor(base), torch.tensor(1.0)).item() for t in range(steps)]


# -- closed forms ------------------------------------------------------------------------


def test_constant() -> None:
    assert thresholds(Constant(), 4) == [2.0] * 4
    assert thresholds(Constant(0.25), 3) == [0.5] * 3


@pytest.mark.parametrize(("warmup", "start"), [(1, 0.5), (5, 0.1), (10, 3.0)])
def test_linear_warmup_closed_form(warmup: int, start: float) -> None:
    steps = np.arange(warmup + 5)
    expected = 2.0 * np.interp(steps, [0, warmup], [start, 1.0])
    np.testing.assert_allclose(thresholds(LinearWarmup(warmup, start), len(steps)), expected, 1e-6)


@pytest.mark.parametrize(("total", "final"), [(1, 0.5), (8, 0.1), (100, 2.0)])
def test_cosine_closed_form(total: int, final: float) -> None:
    s = Cosine(total, final)
    steps = list(range(total + 4))
    expected = [
        2.0 * ((1 + final) / 2 + (1 - final) / 2 * math.cos(math.pi * min(t, total) / total))
        for t in steps
    ]
    np.testing.assert_allclose(thresholds(s, len(steps)), expected, rtol=1e-6)
    # Landmarks: full at 0, the midpoint halfway, final from total_steps on.
    assert s.factor(0) == 1.0 and s.factor(total) == pytest.approx(final)
    if total % 2 == 0:
        assert s.factor(total // 2) == pytest.approx((1 + final) / 2)


def test_schedules_keep_an_infinite_threshold_infinite() -> None:
    for s in (Constant(0.5), LinearWarmup(3), Cosine(3), RelaxOnCalm(window=2)):
        assert math.isinf(s(0, torch.tensor(math.inf), torch.tensor(1.0)).item())


# -- RelaxOnCalm against a slow reference --------------------------------------------------


def relax_reference(norms, *, window, max_cv, growth, max_factor, spike_ratio, spike_factor):
    """The documented rule with Python lists and the statistics module."""
    history: list[float] = []
    factor, out = 1.0, []
    for g in norms:
        if math.isfinite(g):
            if len(history) >= window:
                recent = history[-window:]
                mu, sigma = statistics.fmean(recent), statistics.pstdev(recent)
                spike = g > spike_ratio * mu
                cv = sigma / mu if mu > 0 else math.inf
                if spike:
                    factor = min(factor, spike_factor)
                elif cv < max_cv:
                    factor = min(factor * growth, max_factor)
            history.append(g)
        out.append(factor)
    return out


RELAX = {
    "window": 5,
    "max_cv": 0.1,
    "growth": 1.1,
    "max_factor": 1.5,
    "spike_ratio": 2.0,
    "spike_factor": 0.5,
}


def run_relax(norms, **options) -> list[float]:
    s = RelaxOnCalm(**options)
    base = torch.tensor(1.0, dtype=torch.float64)
    return [s(t, base, torch.tensor(g, dtype=torch.float64)).item() for t, g in enumerate(norms)]


def test_relax_on_calm_matches_reference_on_a_mixed_series() -> None:
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.02 * rng.standard_normal(60))
    norms[25] = 5.0  # a spike
    norms[40] = math.nan  # a bad batch
    norms[41] = math.inf
    for i in range(45, 52):  # a noisy stretch
        norms[i] = float(rng.uniform(0.3, 1.8))
    got = run_relax(norms, **RELAX)
    expected = relax_reference(norms, **RELAX)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert max(expected) == RELAX["max_factor"] and min(expected) == RELAX["spike_factor"]


def test_relax_on_calm_raises_on_calm_series_not_on_spiky_one() -> None:
    rng = np.random.default_rng(1)
    calm = list(1.0 + 0.01 * rng.standard_normal(40))
    spiky = [10.0 if t % 4 == 0 else 1.0 for t in range(40)]
    options = {**RELAX, "max_factor": 100.0}
    relaxed = run_relax(calm, **options)
    assert relaxed[4] == 1.0  # window not full yet
    assert relaxed[-1] == pytest.approx(1.1 ** (40 - 5))  # grew on every full-window step
    assert max(run_relax(spiky, **options)) <= 1.0


def test_relax_on_calm_spike_resets_at_once() -> None:
    s = RelaxOnCalm(window=3, growth=2.0, max_factor=8.0)
    one = torch.tensor(1.0)
    for t in range(6):
        s(t, one, one)
    assert s.current_factor.item() == 8.0
    assert s(6, one, torch.tensor(2.5)).item() == 1.0  # spike: back to spike_factor=1


def test_relax_on_calm_nonfinite_norm_changes_nothing() -> None:
    s = RelaxOnCalm(window=3, growth=2.0)
    one = torch.tensor(1.0)
    for t in range(5):
        s(t, one, one)
    before = s.state_dict()
    for bad in (math.nan, math.inf, -math.inf):
        assert s(5, one, torch.tensor(bad)).item() == before["factor"].item()
        after = s.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)


@given(
    norms=st.lists(st.one_of(st.floats(0.01, 100.0), st.just(math.nan)), min_size=1, max_size=40),
    window=st.integers(2, 6),
    growth=st.sampled_from([1.01, 1.5]),
    spike_factor=st.sampled_from([0.25, 1.0]),
)
def test_property_relax_matches_reference_and_stays_in_range(
    norms, window, growth, spike_factor
) -> None:
    options = {
        "window": window,
        "max_cv": 0.3,
        "growth": growth,
        "max_factor": 3.0,
        "spike_ratio": 1.5,
        "spike_factor": spike_factor,
    }
    got = run_relax(norms, **options)
    np.testing.assert_allclose(got, relax_reference(norms, **options), rtol=1e-9)
    assert all(min(spike_factor, 1.0) <= f <= 3.0 for f in got)


@given(step=st.integers(0, 10_000), warmup=st.integers(1, 500), start=st.floats(0.01, 5.0))
def test_property_warmup_between_start_and_one(step, warmup, start) -> None:
    f = LinearWarmup(warmup, start).factor(step)
    assert min(start, 1.0) - 1e-12 <= f <= max(start, 1.0) + 1e-12
    assert f == pytest.approx(1.0) if step >= warmup else True


# -- NormClip integration ------------------------------------------------------------------


def test_normclip_with_schedule_clips_to_the_scheduled_threshold() -> None:
    schedule = Cosine(4, 0.2)
    ours = params_with_grads(scale=10.0)
    clipper = NormClip(ours, max_norm=1.0, schedule=schedule)
    for step in range(6):
        theirs = [nn.Parameter(p.detach().clone()) for p in ours]
        for p, q in zip(ours, theirs):
            q.grad = p.grad.clone()
        stats = clipper.clip_()
        max_norm = schedule.factor(step)
        total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert stats.threshold.item() == pytest.approx(max_norm, rel=1e-6)
        assert torch.equal(stats.total_norm, total)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
            p.grad = torch.randn_like(p) * 10.0


def test_normclip_without_schedule_is_unchanged() -> None:
    clipper = NormClip(params_with_grads(), max_norm=0.5)
    assert repr(clipper) == "NormClip(max_norm=0.5; params per group: [4])"
    assert clipper.state_dict()["schedules"] == [{}]


def make_grads(step: int) -> list[torch.Tensor]:
    """Gradients for step `step`: calm norms with a spike at step 9."""
    g = torch.Generator().manual_seed(100 + step)
    scale = 8.0 if step == 9 else 1.0 + 0.01 * step
    return [torch.randn(s, generator=g) * scale for s in [(6, 4), (6,), (3, 6), ()]]


def run(clipper: NormClip, params, steps: range) -> list[torch.Tensor]:
    out = []
    for step in steps:
        for p, g in zip(params, make_grads(step)):
            p.grad = g
        clipper.clip_()
        out.extend(p.grad.clone() for p in params)
    return out


@pytest.mark.parametrize(
    "make_schedule",
    [
        lambda: RelaxOnCalm(window=4, max_cv=0.5, growth=1.3, max_factor=4.0),
        lambda: Cosine(10, 0.3),
        lambda: LinearWarmup(6, 0.2),
    ],
    ids=["relax", "cosine", "warmup"],
)
def test_checkpoint_round_trip_is_bit_identical(make_schedule) -> None:
    params = params_with_grads()
    whole = run(NormClip(params, max_norm=2.0, schedule=make_schedule()), params, range(16))

    first = NormClip(params, max_norm=2.0, schedule=make_schedule())
    head = run(first, params, range(7))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = NormClip(params, max_norm=2.0, schedule=make_schedule())
    second.load_state_dict(torch.load(buffer, weights_only=True))
    tail = run(second, params, range(7, 16))
    assert len(head + tail) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole))


def test_relax_state_is_in_the_clipper_state_and_reset() -> None:
    params = params_with_grads()
    schedule = RelaxOnCalm(window=2, max_cv=0.5, growth=2.0, max_factor=4.0)
    clipper = NormClip(params, max_norm=1.0, schedule=schedule)
    run(clipper, params, range(5))
    state = clipper.state_dict()
    assert state["schedules"][0]["factor"].item() == 4.0
    assert int(state["schedules"][0]["count"]) == 5
    # Loading restores it; a fresh schedule's state must not leak in.
    other = NormClip(params, max_norm=1.0, schedule=RelaxOnCalm(window=2))
    other.load_state_dict(state)
    assert other.param_groups[0]["schedule"].current_factor.item() == 4.0
    clipper.reset()
    assert clipper.step == 0 and schedule.current_factor.item() == 1.0
    assert int(schedule.state_dict()["count"]) == 0


def test_relax_nonfinite_step_leaves_clipper_state_alone() -> None:
    params = params_with_grads()
    clipper = NormClip(params, max_norm=1.0, schedule=RelaxOnCalm(window=2, growth=2.0))
    run(clipper, params, range(4))
    before = clipper.state_dict()["schedules"][0]
    params[0].grad[0, 0] = math.nan
    clipper.clip_()
    after = clipper.state_dict()["schedules"][0]
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_state_dict_mismatches_are_errors() -> None:
    params = params_with_grads()
    with_relax = NormClip(params, max_norm=1.0, schedule=RelaxOnCalm(window=3))
    plain = NormClip(params, max_norm=1.0)
    with pytest.raises(ValueError, match="has no schedule"):
        plain.load_state_dict(with_relax.state_dict())
    with pytest.raises(ValueError, match=r"RelaxOnCalm state has keys \[\]"):
        with_relax.load_state_dict(plain.state_dict())
    other_window = NormClip(params, max_norm=1.0, schedule=RelaxOnCalm(window=5))
    with pytest.raises(ValueError, match="window is 5"):
        other_window.load_state_dict(with_relax.state_dict())
    # A checkpoint from before schedules existed (no "schedules" key) still loads.
    legacy = plain.state_dict()
    del legacy["schedules"]
    plain.load_state_dict(legacy)


def test_groups_never_share_schedule_state() -> None:
    a, b = params_with_grads(1), params_with_grads(2, scale=5.0)
    shared = RelaxOnCalm(window=2)
    clipper = NormClip([{"params": a}, {"params": b}], max_norm=1.0, schedule=shared)
    first, second = (g["schedule"] for g in clipper.param_groups)
    assert first is shared and second is not shared and isinstance(second, RelaxOnCalm)
    clipper.clip_()
    assert not torch.equal(first.state_dict()["history"], second.state_dict()["history"])


def test_per_group_schedule_option() -> None:
    a, b = params_with_grads(1, scale=10.0), params_with_grads(2, scale=10.0)
    clipper = NormClip([{"params": a, "schedule": Constant(0.5)}, {"params": b}], max_norm=1.0)
    clipper.clip_()
    norm_a = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a]))
    norm_b = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in b]))
    assert norm_a.item() == pytest.approx(0.5, rel=1e-5)
    assert norm_b.item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "schedule",
    [
        Constant(0.5),
        LinearWarmup(3, 0.1),
        Cosine(3, 0.1),
        RelaxOnCalm(window=2, max_cv=0.9, growth=2.0),
    ],
    ids=["constant", "warmup", "cosine", "relax"],
)
def test_schedules_are_sync_free(no_cpu_branch: None, schedule: Schedule) -> None:
    params = params_with_grads()
    clipper = NormClip(params, max_norm=1.0, schedule=schedule, nonfinite="zero")
    with no_host_sync():
        for _ in range(4):
            clipper.clip_()


# -- argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_schedule", "match"),
    [
        (lambda: Constant(0.0), "Constant factor must be > 0.0; got 0.0"),
        (lambda: Constant(math.inf), "Constant factor must be finite; got inf"),
        (lambda: LinearWarmup(0), "warmup_steps must be an int >= 1; got 0"),
        (lambda: LinearWarmup(2.5), "warmup_steps must be an int >= 1; got 2.5"),
        (lambda: LinearWarmup(5, -0.1), "start_factor must be > 0.0; got -0.1"),
        (lambda: Cosine(-3), "total_steps must be an int >= 1; got -3"),
        (lambda: Cosine(10, 0.0), "final_factor must be > 0.0; got 0.0"),
        (lambda: Cosine(10, "low"), "final_factor must be a real number; got 'low'"),
        (lambda: RelaxOnCalm(window=1), "window must be an int >= 2; got 1"),
        (lambda: RelaxOnCalm(max_cv=-1.0), "max_cv must be > 0.0; got -1.0"),
        (lambda: RelaxOnCalm(growth=0.99), "growth must be > 1.0; got 0.99"),
        (lambda: RelaxOnCalm(max_factor=0.5), "max_factor must be >= 1.0; got 0.5"),
        (lambda: RelaxOnCalm(spike_ratio=1.0), "spike_ratio must be > 1.0; got 1.0"),
        (lambda: RelaxOnCalm(spike_factor=1.5), r"spike_factor must be in \(0, 1\]; got 1.5"),
        (lambda: RelaxOnCalm(spike_factor=0), "spike_factor must be > 0.0; got 0.0"),
    ],
)
def test_bad_hyperparameters_name_the_value(make_schedule, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make_schedule()


def test_bad_schedule_option_and_step() -> None:
    params = params_with_grads()
    with pytest.raises(TypeError, match=r"schedule must be a gradclip Schedule.*got 3"):
        NormClip(params, max_norm=1.0, schedule=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"schedule 'cosine' has the wrong number of arguments"):
        from_spec("norm:1.0,schedule=cosine", params)
    clipper = from_spec("norm:1.0", params, schedule=Cosine(10, 0.5))
    assert isinstance(clipper.param_groups[0]["schedule"], Cosine)
    with pytest.raises(ValueError, match="step must be an int >= 0; got -1"):
        Cosine(3)(-1, torch.tensor(1.0), torch.tensor(1.0))


# -- follows_step: when a skipped call may shift the schedule ------------------------------


@pytest.mark.parametrize(
    "schedule",
    [Constant(0.5), LinearWarmup(5, 0.2), Cosine(7, 0.1)],
    ids=["constant", "warmup", "cosine"],
)
def test_follows_step_is_false_exactly_from_where_the_factor_stops_changing(
    schedule: Schedule,
) -> None:
    horizon = 30
    factors = [schedule.factor(t) for t in range(horizon)]
    for step in range(horizon - 1):
        constant_from_here = all(f == factors[step] for f in factors[step:])
        assert schedule.follows_step(step) == (not constant_from_here), step


def test_relax_on_calm_does_not_follow_the_step() -> None:
    assert not RelaxOnCalm(window=3).follows_step(0)


def test_step_dependent_clippers() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    clipper = NormClip([w], 1.0, schedule=LinearWarmup(2))
    adagc = AdaGC([w], warmup_steps=2)
    seen = []
    for _ in range(3):
        seen.append((clipper.step_dependent, adagc.step_dependent))
        w.grad = torch.ones(3)
        clipper.clip_()
        adagc.clip_()
    assert seen == [(True, True), (True, True), (False, False)]
    assert not NormClip([w], 1.0).step_dependent
    assert chain(NormClip([w], 1.0), NormClip([w], 2.0, schedule=Cosine(3))).step_dependent
