"""EMARatio against a slow reference written from its formulas, in both modes, plus invariants.

The reference works on plain Python floats: per-tensor norms of each step's gradients
(computed here in float64) go in, one factor per tensor comes out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradclip.clippers.emaratio import EMARatio
from gradclip.nonfinite import NonFiniteGradientError
from gradclip.spec import from_spec
from sync_guard import no_host_sync

SHAPES = [(8, 4), (8,), (3, 8), (3,), ()]
EPS = 1e-6  # torch's, in the division


def pnorm(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    if math.isinf(p):
        return max(abs(v) for v in values)
    return sum(abs(v) ** p for v in values) ** (1.0 / p)


class Average:
    """A bias-corrected EMA of clipped norms: m̂ = Σ (1−β)β^(k−j) x_j / (1 − β^k)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.values: list[float] = []

    def mean(self) -> float | None:
        if not self.values:
            return None
        k = len(self.values)
        weights = [(1 - self.beta) * self.beta ** (k - 1 - j) for j in range(k)]
        return sum(w * x for w, x in zip(weights, self.values)) / (1 - self.beta**k)


class ReferenceEMARatio:
    """EMARatio for one parameter group, step by step, in Python floats."""

    def __init__(
        self,
        n: int,
        *,
        ratio: float = 2.0,
        beta: float = 0.99,
        per_tensor: bool = False,
        warmup_steps: int = 10,
        p: float = 2.0,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.ratio, self.per_tensor, self.warmup_steps, self.p = ratio, per_tensor, warmup_steps, p
        self.averages = [Average(beta) for _ in range(n if per_tensor else 1)]
        self.schedule = schedule  # the threshold's multiplier at 0-based call t
        self.t = 0
        self.threshold = math.inf

    def _factor(self, average: Average, norm: float) -> tuple[float, float]:
        mean = average.mean()
        clipping = self.t > self.warmup_steps and mean is not None
        bound = self.ratio * mean if clipping else math.inf
        applied = bound if self.schedule is None else self.schedule(self.t - 1) * bound
        h = min(1.0, applied / (norm + EPS))
        # the average sees the norm clipped at the unscheduled bound
        average.values.append(norm * min(1.0, bound / (norm + EPS)))
        return h, applied

    def step(self, norms: list[float | None]) -> list[float | None]:
        self.t += 1
        if not self.per_tensor:
            total = pnorm([n for n in norms if n is not None], self.p)
            h, self.threshold = self._factor(self.averages[0], total)
            return [None if n is None else h for n in norms]
        factors: list[float | None] = []
        bounds = []
        for average, n in zip(self.averages, norms):
            if n is None:
                factors.append(None)
                continue
            h, bound = self._factor(average, n)
            factors.append(h)
            bounds.append(bound)
        self.threshold = pnorm(bounds, self.p)
        return factors


def grad_sequence(
    steps: int,
    seed: int = 0,
    *,
    shapes: list[tuple[int, ...]] = SHAPES,
    dtype: torch.dtype = torch.float64,
    missing: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[list[torch.Tensor | None]]:
    """Per-step gradients: slowly shrinking norms, spikes in one tensor or in all of them."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        level = 3.0 * 0.99**t + 0.3
        spike_tensor = int(torch.randint(len(shapes), (1,), generator=gen)) if t % 17 == 5 else -1
        spike_all = t % 53 == 40
        grads: list[torch.Tensor | None] = []
        for i, shape in enumerate(shapes):
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * level * (1 + i)
            if i == spike_tensor:
                g = g * 50
            if spike_all:
                g = g * 20
            grads.append(None if (t, i) in missing else g.to(dtype))
        yield grads


def make_params(shapes: list[tuple[int, ...]] = SHAPES, dtype=torch.float64):
    return [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def norms_of(grads, p: float) -> list[float | None]:
    return [None if g is None else float(torch.linalg.vector_norm(g.double(), p)) for g in grads]


def run_against_reference(clipper, reference, params, sequence, p=2.0, rtol=1e-12):
    clipped_steps = 0
    for grads in sequence:
        set_grads(params, grads)
        stats = clipper.clip_()
        norms = norms_of(grads, p)
        factors = reference.step(norms)
        for k, (param, g, h) in enumerate(zip(params, grads, factors)):
            if g is None:
                assert param.grad is None
                continue
            expected = (g.double() * h).to(g.dtype)
            torch.testing.assert_close(
                param.grad, expected, rtol=rtol, atol=0, msg=f"step {reference.t}, tensor {k}"
            )
        rel = max(rtol, 1e-9)
        assert stats.threshold.item() == pytest.approx(reference.threshold, rel=rel)
        clipped = [n * h for n, h in zip(norms, factors) if n is not None]
        assert stats.clipped_norm.item() == pytest.approx(pnorm(clipped, p), rel=rel)
        was_clipped = any(h < 1 for h in factors if h is not None)
        assert bool(stats.clipped) == was_clipped
        clipped_steps += was_clipped
    assert clipped_steps > 0, "the sequence should make the clipper clip"


# --- against the reference -------------------------------------------------------------


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_matches_reference_through_warmup_and_after(per_tensor: bool, p: float) -> None:
    params = make_params()
    clipper = EMARatio(params, ratio=1.5, beta=0.95, per_tensor=per_tensor, norm_type=p)
    reference = ReferenceEMARatio(5, ratio=1.5, beta=0.95, per_tensor=per_tensor, p=p)
    run_against_reference(clipper, reference, params, grad_sequence(300), p=p)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
def test_matches_reference_with_missing_gradients(per_tensor: bool) -> None:
    # Tensor 1 has no gradient until step 50 (after the warm-up): it has no average
    # then, so it is not clipped on its first step. Tensor 4 skips a few steps.
    missing = frozenset({(t, 1) for t in range(50)} | {(t, 4) for t in (2, 9, 30, 31, 90)})
    params = make_params()
    clipper = EMARatio(params, per_tensor=per_tensor, warmup_steps=5)
    reference = ReferenceEMARatio(5, per_tensor=per_tensor, warmup_steps=5)
    sequence = grad_sequence(150, seed=3, missing=missing)
    run_against_reference(clipper, reference, params, sequence)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
def test_float32_gradients_match_reference(per_tensor: bool) -> None:
    params = make_params(dtype=torch.float32)
    clipper = EMARatio(params, per_tensor=per_tensor)
    reference = ReferenceEMARatio(5, per_tensor=per_tensor)
    sequence = grad_sequence(150, seed=1, dtype=torch.float32)
    run_against_reference(clipper, reference, params, sequence, rtol=1e-4)
    assert clipper.state[0]["ema"].dtype == torch.float32


def test_global_and_per_tensor_modes_differ_on_a_single_tensor_spike() -> None:
    def run(per_tensor: bool) -> list[torch.nn.Parameter]:
        params = make_params([(4,), (4,)])
        clipper = EMARatio(params, per_tensor=per_tensor, warmup_steps=3)
        for _ in range(10):
            set_grads(params, [torch.ones(4).double(), torch.ones(4).double()])
            assert not bool(clipper.clip_().clipped)
        set_grads(params, [torch.ones(4).double() * 100, torch.ones(4).double()])
        assert bool(clipper.clip_().clipped)
        return params

    per_tensor = run(True)  # only the spiking tensor is scaled, to 2 × its average 2
    assert per_tensor[1].grad.tolist() == [1.0] * 4
    assert per_tensor[0].grad.norm().item() == pytest.approx(4.0, rel=1e-6)
    whole = run(False)  # one factor for both, the total norm to 2 × its average √8
    factor = 2 * math.sqrt(8) / math.hypot(200, 2)
    for q, g in zip(whole, [100.0, 1.0]):
        torch.testing.assert_close(q.grad, torch.full((4,), g * factor).double(), rtol=1e-6, atol=0)


def test_warmup_one_starts_clipping_on_the_second_step_like_olmo() -> None:
    params = make_params([(2,)])
    clipper = EMARatio(params, ratio=1.5, warmup_steps=1)
    params[0].grad = torch.tensor([3.0, 4.0]).double()
    assert math.isinf(clipper.clip_().threshold.item())
    params[0].grad = torch.tensor([30.0, 40.0]).double()
    stats = clipper.clip_()  # OLMo: the average starts at the first norm, 5
    assert stats.threshold.item() == pytest.approx(7.5)
    assert params[0].grad.norm().item() == pytest.approx(7.5, rel=1e-6)


def test_zero_warmup_does_not_clip_without_history() -> None:
    params = make_params()
    clipper = EMARatio(params, warmup_steps=0, per_tensor=True)
    set_grads(params, next(grad_sequence(1)))
    stats = clipper.clip_()
    assert not bool(stats.clipped) and math.isinf(stats.threshold.item())


def test_param_groups_follow_their_own_options() -> None:
    first, second = make_params(SHAPES[:2]), make_params(SHAPES[2:])
    clipper = EMARatio(
        [
            {"params": first, "ratio": 1.2, "per_tensor": True, "warmup_steps": 3},
            {"params": second, "ratio": 3.0, "beta": 0.9},
        ],
        warmup_steps=20,
    )
    ref_first = ReferenceEMARatio(2, ratio=1.2, per_tensor=True, warmup_steps=3)
    ref_second = ReferenceEMARatio(3, ratio=3.0, beta=0.9, warmup_steps=20)
    for grads in grad_sequence(120, seed=5):
        set_grads(first + second, grads)
        stats = clipper.clip_()
        factors = ref_first.step(norms_of(grads[:2], 2.0)) + ref_second.step(
            norms_of(grads[2:], 2.0)
        )
        for param, g, h in zip(first + second, grads, factors):
            torch.testing.assert_close(param.grad, g * h, rtol=1e-12, atol=0)
        combined = math.hypot(ref_first.threshold, ref_second.threshold)
        assert stats.threshold.item() == pytest.approx(combined, rel=1e-9)
    assert clipper.state[0]["ema"].shape == (2,)
    assert clipper.state[1]["ema"].shape == ()


def test_spec_builds_it_with_aliases() -> None:
    clipper = from_spec("emaratio:r=3,per_tensor=true,warmup_steps=0", make_params())
    assert isinstance(clipper, EMARatio)
    group = clipper.param_groups[0]
    assert (group["ratio"], group["per_tensor"], group["warmup_steps"]) == (3.0, True, 0)
    assert from_spec("emaratio:1.5", make_params()).param_groups[0]["ratio"] == 1.5


# --- invariants ------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    warmup=st.integers(0, 8),
    ratio=st.floats(1.001, 5.0),
    beta=st.floats(0.5, 0.999),
    per_tensor=st.booleans(),
    p=st.sampled_from([1.0, 2.0, math.inf]),
)
def test_properties(
    seed: int, warmup: int, ratio: float, beta: float, per_tensor: bool, p: float
) -> None:
    params = make_params()
    clipper = EMARatio(
        params, ratio=ratio, beta=beta, per_tensor=per_tensor, warmup_steps=warmup, norm_type=p
    )
    for t, grads in enumerate(grad_sequence(30, seed=seed), start=1):
        state = {k: v.clone() for k, v in clipper.state[0].items()}
        set_grads(params, grads)
        stats = clipper.clip_()
        before = torch.tensor(norms_of(grads, p), dtype=torch.float64)
        after = torch.tensor(norms_of([q.grad for q in params], p), dtype=torch.float64)
        assert torch.all(after <= before * (1 + 1e-12)), "a tensor's norm grew"
        assert stats.scale.item() <= 1 + 1e-12
        assert stats.clipped_norm.item() <= stats.threshold.item() * (1 + 1e-9)
        if t <= warmup:
            assert not bool(stats.clipped)
            continue
        # ratio × the bias-corrected average; no bound while there is no history
        weight = state["weight"]
        bound = torch.where(weight > 0, ratio * state["ema"] / weight, math.inf)
        measured = after if per_tensor else torch.linalg.vector_norm(after, p)
        assert torch.all(measured <= bound * (1 + 1e-9)), "a norm exceeds ratio × EMA"


# --- state: checkpoints, non-finite steps, reset -----------------------------------------


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
@pytest.mark.parametrize("stop", [4, 30])  # inside the warm-up, and after it
def test_checkpoint_round_trip_is_bit_identical(per_tensor: bool, stop: int) -> None:
    sequence = list(grad_sequence(60, seed=7, dtype=torch.float32))
    params_a, params_b = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    uninterrupted = EMARatio(params_a, per_tensor=per_tensor)
    first = EMARatio(params_b, per_tensor=per_tensor)
    for grads in sequence[:stop]:
        set_grads(params_a, grads)
        uninterrupted.clip_()
        set_grads(params_b, grads)
        first.clip_()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMARatio(params_b, per_tensor=per_tensor)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == stop
    clipped = 0
    for grads in sequence[stop:]:
        set_grads(params_a, grads)
        clipped += bool(uninterrupted.clip_().clipped)
        set_grads(params_b, grads)
        resumed.clip_()
        for a, b in zip(params_a, params_b):
            assert torch.equal(a.grad, b.grad)
    assert clipped > 0
    for key in ("ema", "weight"):
        assert torch.equal(uninterrupted.state[0][key], resumed.state[0][key])


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
@pytest.mark.parametrize("policy", ["ignore", "zero", "raise"])
@pytest.mark.parametrize("bad_step", [3, 15])  # inside the warm-up, and after it
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_steps_leave_state_untouched(
    per_tensor: bool, policy: str, bad_step: int, bad: float
) -> None:
    params = make_params()
    clipper = EMARatio(params, per_tensor=per_tensor, warmup_steps=10, nonfinite=policy)
    for t, grads in enumerate(grad_sequence(20, seed=4), start=1):
        if t == bad_step:
            grads[2] = grads[2].clone()
            grads[2].view(-1)[0] = bad
        set_grads(params, grads)
        before = {k: v.clone() for k, v in clipper.state[0].items()}
        if t == bad_step and policy == "raise":
            with pytest.raises(NonFiniteGradientError):
                clipper.clip_()
        else:
            clipper.clip_()
        if t == bad_step:
            for key, value in before.items():
                assert torch.equal(clipper.state[0][key], value), key
            if policy == "zero":
                assert all(bool((q.grad == 0).all()) for q in params)
    assert all(torch.all(torch.isfinite(v)) for v in clipper.state[0].values())


def test_reset_forgets_everything() -> None:
    params = make_params()
    clipper = EMARatio(params, per_tensor=True, warmup_steps=2)
    for grads in grad_sequence(5):
        set_grads(params, grads)
        clipper.clip_()
    clipper.reset()
    assert clipper.step == 0
    assert torch.equal(clipper.state[0]["weight"], torch.zeros(5))


# --- bad hyperparameters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"ratio": 1.0}, ValueError, r"ratio must be a finite number > 1.*got 1\.0"),
        ({"ratio": 0.5}, ValueError, r"ratio .*> 1.*got 0\.5"),
        ({"ratio": -2}, ValueError, r"ratio .*> 1.*got -2\.0"),
        ({"ratio": math.nan}, ValueError, r"ratio must be a number; got nan"),
        ({"ratio": math.inf}, ValueError, r"ratio .*> 1.*got inf"),
        ({"ratio": "2"}, TypeError, r"ratio must be a real number; got '2'"),
        ({"beta": 1.0}, ValueError, r"beta must be in \(0, 1\); got 1\.0"),
        ({"beta": 0}, ValueError, r"beta must be in \(0, 1\); got 0\.0"),
        ({"per_tensor": 1}, TypeError, r"per_tensor must be True or False; got 1"),
        ({"warmup_steps": -3}, ValueError, r"warmup_steps must be an int >= 0; got -3"),
        ({"warmup_steps": True}, TypeError, r"warmup_steps must be an int >= 0; got True"),
        ({"norm_type": -1.0}, ValueError, r"norm_type must be > 0 or inf; got -1\.0"),
    ],
)
def test_bad_hyperparameters_name_the_value(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        EMARatio(make_params(), **options)


def test_bad_option_in_a_param_group_is_caught() -> None:
    with pytest.raises(ValueError, match=r"ratio .*> 1.*got 0\.9"):
        EMARatio([{"params": make_params()[:2]}, {"params": make_params()[2:], "ratio": 0.9}])
    with pytest.raises(ValueError, match=r"unknown strategy|no option 'r'"):
        EMARatio([{"params": make_params(), "r": 2.0}])


# --- no host sync ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["ignore", "zero"])
def test_clip_is_sync_free(no_cpu_branch: None, policy: str) -> None:
    params = make_params(dtype=torch.float32)
    clipper = EMARatio(
        [{"params": params[:3], "per_tensor": True}, {"params": params[3:]}],
        warmup_steps=2,
        nonfinite=policy,
    )
    missing = frozenset({(3, 1), (4, 4)})  # exercises the gather/scatter path
    sequence = list(grad_sequence(6, dtype=torch.float32, missing=missing))
    with no_host_sync():
        for grads in sequence:
            set_grads(params, grads)
            clipper.clip_()


# --- threshold schedules ----------------------------------------------------------------


def cosine(total: int, final: float) -> Callable[[int], float]:
    """The half-cosine multiplier, written from its formula (not from Cosine.factor)."""
    return lambda t: final + (1 - final) * (1 + math.cos(math.pi * min(t, total) / total)) / 2


@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
def test_a_cosine_schedule_matches_the_reference(per_tensor: bool) -> None:
    """The schedule multiplies the threshold applied; the average sees the norm clipped at
    the unscheduled threshold (with final factor 0.3 and r = 1.5, feeding it the scheduled
    clipped norms would shrink it by 0.45 per clipped step)."""
    params = make_params()
    clipper = EMARatio(
        params, ratio=1.5, beta=0.9, per_tensor=per_tensor, warmup_steps=5, schedule="cosine:60:0.3"
    )
    reference = ReferenceEMARatio(
        5, ratio=1.5, beta=0.9, per_tensor=per_tensor, warmup_steps=5, schedule=cosine(60, 0.3)
    )
    run_against_reference(clipper, reference, params, grad_sequence(200, seed=5))
    plain = EMARatio(make_params(), ratio=1.5, beta=0.9, per_tensor=per_tensor, warmup_steps=5)
    for grads in grad_sequence(200, seed=5):
        set_grads(plain.param_groups[0]["params"], grads)
        plain.clip_()
    for key in ("ema", "weight"):  # the statistics never saw the schedule
        torch.testing.assert_close(clipper.state[0][key], plain.state[0][key], rtol=1e-12, atol=0)
