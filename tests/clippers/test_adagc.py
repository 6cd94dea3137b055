"""AdaGC against a slow reference written from the paper's formulas, plus invariants.

The reference works on plain Python floats: the per-tensor norms of each step's
gradients (computed here in float64) go in, one factor per tensor comes out, and the
expected gradients are the original ones times those factors.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradclip._sync
from gradclip.clippers.adagc import AdaGC
from gradclip.nonfinite import NonFiniteGradientError
from gradclip.spec import from_spec
from sync_guard import no_host_sync

SHAPES = [(8, 4), (8,), (3, 8), (3,), ()]
EPS = 1e-6


# --- the reference -------------------------------------------------------------------


def pnorm(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    if math.isinf(p):
        return max(abs(v) for v in values)
    return sum(abs(v) ** p for v in values) ** (1.0 / p)


class ReferenceAdaGC:
    """AdaGC for one parameter group, step by step, in Python floats.

    γ_i is None until tensor i is seen with a nonzero clipped norm (the documented
    initialisation: the first warm-up step's clipped norm, then the running minimum;
    a tensor without γ after the warm-up is not clipped and takes its norm as γ).
    """

    def __init__(
        self,
        n: int,
        *,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        eps: float = EPS,
        p: float = 2.0,
        schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.gamma: list[float | None] = [None] * n
        self.lambda_abs, self.lambda_rel, self.beta = lambda_abs, lambda_rel, beta
        self.warmup_steps, self.eps, self.p = warmup_steps, eps, p
        self.schedule = schedule  # the thresholds' multiplier at 0-based call t
        self.t = 0
        self.threshold = math.inf

    def _scaled(self, bound: float) -> float:
        return bound if self.schedule is None else self.schedule(self.t - 1) * bound

    def step(self, norms: list[float | None]) -> list[float | None]:
        """Factors for the tensors with gradients (None where a tensor has none)."""
        self.t += 1
        present = [n for n in norms if n is not None]
        if self.t <= self.warmup_steps:
            total = pnorm(present, self.p)
            self.threshold = self._scaled(self.lambda_abs)
            h = min(1.0, self.threshold / (total + self.eps))
            seen = min(1.0, self.lambda_abs / (total + self.eps))  # γ: unscheduled
            for i, n in enumerate(norms):
                if n is None or n * seen == 0:
                    continue
                old = self.gamma[i]
                self.gamma[i] = n * seen if old is None else min(old, n * seen)
            return [None if n is None else h for n in norms]
        factors: list[float | None] = []
        bounds = []
        for i, n in enumerate(norms):
            if n is None:
                factors.append(None)
                continue
            old = self.gamma[i]
            if old is None:
                factors.append(1.0)
                bounds.append(math.inf)
                self.gamma[i] = n if n > 0 else None
                continue
            bound = self.lambda_rel * old
            applied = self._scaled(bound)
            h = min(1.0, applied / (n + self.eps))
            factors.append(h)
            bounds.append(applied)
            seen = n * min(1.0, bound / (n + self.eps))  # γ: unscheduled
            self.gamma[i] = self.beta * old + (1 - self.beta) * seen
        self.threshold = pnorm(bounds, self.p)
        return factors


# --- gradient sequences with spikes ----------------------------------------------------


def grad_sequence(
    steps: int,
    seed: int = 0,
    *,
    shapes: list[tuple[int, ...]] = SHAPES,
    dtype: torch.dtype = torch.float64,
    missing: frozenset[tuple[int, int]] = frozenset(),
    zeros: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[list[torch.Tensor | None]]:
    """Per-step gradients: norms that shrink as training goes on, per-tensor scales that
    differ, spikes in single tensors and in the whole model, some missing/zero tensors."""
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
            if (t, i) in zeros:
                g = torch.zeros_like(g)
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
    for grads in sequence:
        set_grads(params, grads)
        stats = clipper.clip_()
        factors = reference.step(norms_of(grads, p))
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
        present = [n for n in norms_of(grads, p) if n is not None]
        clipped = [n * h for n, h in zip(norms_of(grads, p), factors) if n is not None]
        assert stats.total_norm.item() == pytest.approx(pnorm(present, p), rel=rel)
        assert stats.clipped_norm.item() == pytest.approx(pnorm(clipped, p), rel=rel)
        assert bool(stats.clipped) == any(h < 1 for h in factors if h is not None)


# --- against the reference -------------------------------------------------------------


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_matches_reference_through_warmup_and_after(p: float) -> None:
    params = make_params()
    clipper = AdaGC(params, lambda_abs=2.0, warmup_steps=40, norm_type=p)
    reference = ReferenceAdaGC(len(params), lambda_abs=2.0, warmup_steps=40, p=p)
    run_against_reference(clipper, reference, params, grad_sequence(300), p=p)
    expected = [math.inf if g is None else g for g in reference.gamma]
    gamma = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(clipper.state[0]["gamma"], gamma, rtol=1e-12, atol=0)


def test_matches_reference_with_missing_and_zero_gradients() -> None:
    # Tensor 1 has no gradient until step 60 (after the warm-up), then a zero one; tensor
    # 3 has a zero gradient at the first steps; tensor 4 skips some steps on both sides.
    missing = frozenset({(t, 1) for t in range(60)} | {(t, 4) for t in (3, 10, 35, 80, 81)})
    zeros = frozenset({(0, 3), (1, 3), (45, 2), (46, 2), (60, 1)})
    params = make_params()
    clipper = AdaGC(params, warmup_steps=30, lambda_rel=1.2, beta=0.9)
    reference = ReferenceAdaGC(len(params), warmup_steps=30, lambda_rel=1.2, beta=0.9)
    run_against_reference(
        clipper, reference, params, grad_sequence(200, seed=3, missing=missing, zeros=zeros)
    )


def test_float32_gradients_match_reference_within_float32_precision() -> None:
    params = make_params(dtype=torch.float32)
    clipper = AdaGC(params, warmup_steps=20)
    reference = ReferenceAdaGC(len(params), warmup_steps=20)
    sequence = grad_sequence(150, seed=1, dtype=torch.float32)
    run_against_reference(clipper, reference, params, sequence, rtol=1e-4)
    assert clipper.state[0]["gamma"].dtype == torch.float32


def test_bfloat16_gradients_are_clipped_per_tensor() -> None:
    params = make_params(dtype=torch.bfloat16)
    clipper = AdaGC(params, warmup_steps=2)
    for grads in grad_sequence(3, dtype=torch.bfloat16):
        set_grads(params, grads)
        clipper.clip_()
    gamma = clipper.state[0]["gamma"].clone()
    set_grads(params, [torch.full(s, 100.0, dtype=torch.bfloat16) for s in SHAPES])
    clipper.clip_()
    after = torch.stack([p.grad.double().norm() for p in params])
    assert torch.all(after <= 1.05 * gamma.double() * 1.01)


def test_warmup_is_exactly_the_first_warmup_steps_calls() -> None:
    params = make_params([(2,), (2,)])
    clipper = AdaGC(params, lambda_abs=1.0, warmup_steps=3)
    for _ in range(3):
        set_grads(params, [torch.tensor([3.0, 4.0]).double(), torch.tensor([0.0, 0.5]).double()])
        stats = clipper.clip_()
        assert stats.threshold.item() == 1.0  # global clipping: the same factor for both
        assert params[1].grad[1].item() == pytest.approx(0.5 / math.hypot(5, 0.5), rel=1e-6)
    set_grads(params, [torch.tensor([3.0, 4.0]).double(), torch.tensor([0.0, 0.5]).double()])
    stats = clipper.clip_()  # step 4: per tensor, each against its own γ
    gamma = [5 / math.hypot(5, 0.5), 0.5 / math.hypot(5, 0.5)]
    # (relative differences up to eps / norm come from the eps in the division)
    assert params[0].grad.norm().item() == pytest.approx(1.05 * gamma[0], rel=1e-5)
    assert params[1].grad.norm().item() == pytest.approx(1.05 * gamma[1], rel=1e-5)
    assert stats.threshold.item() == pytest.approx(1.05 * math.hypot(*gamma), rel=1e-5)


def test_zero_warmup_initialises_from_the_first_norms_without_clipping() -> None:
    params = make_params()
    clipper = AdaGC(params, warmup_steps=0)
    reference = ReferenceAdaGC(len(params), warmup_steps=0)
    grads = next(grad_sequence(1))
    set_grads(params, grads)
    stats = clipper.clip_()
    assert not bool(stats.clipped) and math.isinf(stats.threshold.item())
    reference.step(norms_of(grads, 2.0))
    run_against_reference(clipper, reference, params, grad_sequence(50, seed=2))


def test_a_spike_in_one_tensor_clips_only_that_tensor() -> None:
    params = make_params([(4,), (4,)])
    clipper = AdaGC(params, lambda_abs=100.0, warmup_steps=5)  # no clipping in warm-up
    for _ in range(20):
        set_grads(params, [torch.ones(4).double(), torch.ones(4).double()])
        assert not bool(clipper.clip_().clipped)
    set_grads(params, [torch.ones(4).double() * 100, torch.ones(4).double()])
    assert bool(clipper.clip_().clipped)
    assert params[1].grad.tolist() == [1.0] * 4
    assert params[0].grad.norm().item() == pytest.approx(1.05 * 2.0, rel=1e-6)


def test_thresholds_grow_slowly_after_a_tight_warmup() -> None:
    # The documented consequence of the paper's rule: after a warm-up clipped at
    # lambda_abs, a threshold rises by at most a factor β + (1 − β)·λ_rel per step.
    params = make_params([(4,)])
    clipper = AdaGC(params, lambda_abs=1.0, warmup_steps=3)
    growth = 0.98 + 0.02 * 1.05
    for t in range(50):
        set_grads(params, [torch.ones(4).double()])  # norm 2, twice lambda_abs
        clipper.clip_()
        if t >= 3:
            expected = growth ** (t - 2)  # γ = 1 (minus eps) after the warm-up
            assert clipper.state[0]["gamma"].item() == pytest.approx(expected, rel=1e-5)


def test_param_groups_follow_their_own_options() -> None:
    first, second = make_params(SHAPES[:2]), make_params(SHAPES[2:])
    clipper = AdaGC(
        [
            {"params": first, "lambda_rel": 1.05, "warmup_steps": 10},
            {"params": second, "lambda_abs": 3.0, "lambda_rel": 1.5, "beta": 0.9},
        ],
        warmup_steps=40,
    )
    ref_first = ReferenceAdaGC(2, lambda_rel=1.05, warmup_steps=10)
    ref_second = ReferenceAdaGC(3, lambda_abs=3.0, lambda_rel=1.5, beta=0.9, warmup_steps=40)
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


def test_spec_builds_it() -> None:
    clipper = from_spec("adagc:lambda_rel=1.1,warmup_steps=5", make_params())
    assert isinstance(clipper, AdaGC)
    assert clipper.param_groups[0]["lambda_rel"] == 1.1
    assert clipper.param_groups[0]["warmup_steps"] == 5


# --- invariants ------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    warmup=st.integers(0, 8),
    lambda_rel=st.floats(1.001, 3.0),
    beta=st.floats(0.5, 0.999),
    lambda_abs=st.floats(0.01, 100.0),
    p=st.sampled_from([1.0, 2.0, math.inf]),
)
def test_properties(
    seed: int, warmup: int, lambda_rel: float, beta: float, lambda_abs: float, p: float
) -> None:
    params = make_params()
    clipper = AdaGC(
        params,
        lambda_abs=lambda_abs,
        lambda_rel=lambda_rel,
        beta=beta,
        warmup_steps=warmup,
        norm_type=p,
    )
    for t, grads in enumerate(grad_sequence(30, seed=seed), start=1):
        gamma = clipper.state[0]["gamma"].clone()
        set_grads(params, grads)
        stats = clipper.clip_()
        before = torch.tensor(norms_of(grads, p), dtype=torch.float64)
        after = torch.tensor(norms_of([q.grad for q in params], p), dtype=torch.float64)
        assert torch.all(after <= before * (1 + 1e-12)), "a tensor's norm grew"
        assert stats.scale.item() <= 1 + 1e-12
        assert stats.clipped_norm.item() <= stats.threshold.item() * (1 + 1e-9)
        if t > warmup:
            bound = lambda_rel * gamma.to(after.dtype)
            assert torch.all(after <= bound * (1 + 1e-9)), "a tensor exceeds λ_rel·γ"
        else:
            assert stats.clipped_norm.item() <= lambda_abs * (1 + 1e-9)
        assert torch.all(clipper.state[0]["gamma"] > 0)


# --- state: checkpoints, non-finite steps, reset -----------------------------------------


@pytest.mark.parametrize("stop", [5, 30])  # inside the warm-up, and after it
def test_checkpoint_round_trip_is_bit_identical(stop: int) -> None:
    sequence = list(grad_sequence(60, seed=7, dtype=torch.float32))
    params_a, params_b = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    uninterrupted = AdaGC(params_a, warmup_steps=20)
    first = AdaGC(params_b, warmup_steps=20)
    for grads in sequence[:stop]:
        set_grads(params_a, grads)
        uninterrupted.clip_()
        set_grads(params_b, grads)
        first.clip_()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdaGC(params_b, warmup_steps=20)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == stop
    for grads in sequence[stop:]:
        set_grads(params_a, grads)
        uninterrupted.clip_()
        set_grads(params_b, grads)
        resumed.clip_()
        for a, b in zip(params_a, params_b):
            assert torch.equal(a.grad, b.grad)
    assert torch.equal(uninterrupted.state[0]["gamma"], resumed.state[0]["gamma"])


@pytest.mark.parametrize("policy", ["ignore", "zero", "raise"])
@pytest.mark.parametrize("bad_step", [3, 15])  # inside the warm-up, and after it
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_steps_leave_state_untouched(policy: str, bad_step: int, bad: float) -> None:
    params = make_params()
    clipper = AdaGC(params, warmup_steps=10, nonfinite=policy)
    for t, grads in enumerate(grad_sequence(20, seed=4), start=1):
        if t == bad_step:
            grads[2] = grads[2].clone()
            grads[2].view(-1)[0] = bad
        set_grads(params, grads)
        before = clipper.state[0]["gamma"].clone()
        if t == bad_step and policy == "raise":
            with pytest.raises(NonFiniteGradientError):
                clipper.clip_()
        else:
            clipper.clip_()
        if t == bad_step:
            assert torch.equal(clipper.state[0]["gamma"], before)
            if policy == "zero":
                assert all(bool((q.grad == 0).all()) for q in params)
    assert torch.all(torch.isfinite(clipper.state[0]["gamma"]))


def test_reset_forgets_everything() -> None:
    params = make_params()
    clipper = AdaGC(params, warmup_steps=2)
    for grads in grad_sequence(5):
        set_grads(params, grads)
        clipper.clip_()
    clipper.reset()
    assert clipper.step == 0
    assert torch.all(torch.isinf(clipper.state[0]["gamma"]))


# --- bad hyperparameters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"lambda_abs": 0.0}, ValueError, r"lambda_abs must be > 0; got 0\.0"),
        ({"lambda_abs": -1.0}, ValueError, r"lambda_abs must be > 0; got -1\.0"),
        ({"lambda_abs": math.nan}, ValueError, r"lambda_abs must be a finite number; got nan"),
        ({"lambda_rel": 1.0}, ValueError, r"lambda_rel must be a finite number > 1.*got 1\.0"),
        ({"lambda_rel": 0.5}, ValueError, r"lambda_rel .*> 1.*got 0\.5"),
        ({"lambda_rel": math.inf}, ValueError, r"lambda_rel .*> 1.*got inf"),
        ({"lambda_rel": "big"}, TypeError, r"lambda_rel must be a real number; got 'big'"),
        ({"beta": 1.0}, ValueError, r"beta must be in \(0, 1\); got 1\.0"),
        ({"beta": 0.0}, ValueError, r"beta must be in \(0, 1\); got 0\.0"),
        ({"beta": -0.5}, ValueError, r"beta must be in \(0, 1\); got -0\.5"),
        ({"beta": True}, TypeError, r"beta must be a real number; got True"),
        ({"warmup_steps": -1}, ValueError, r"warmup_steps must be an int >= 0; got -1"),
        ({"warmup_steps": 2.5}, TypeError, r"warmup_steps must be an int >= 0; got 2\.5"),
        ({"eps": -1e-6}, ValueError, r"eps must be >= 0; got -1e-06"),
        ({"norm_type": 0.0}, ValueError, r"norm_type must be > 0 or inf; got 0\.0"),
        ({"nonfinite": "skip"}, ValueError, r"nonfinite must be one of .*got 'skip'"),
    ],
)
def test_bad_hyperparameters_name_the_value(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AdaGC(make_params(), **options)


def test_bad_option_in_a_param_group_is_caught() -> None:
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\); got 2\.0"):
        AdaGC([{"params": make_params()[:2]}, {"params": make_params()[2:], "beta": 2.0}])
    with pytest.raises(ValueError, match=r"no option 'lambda'"):
        AdaGC([{"params": make_params(), "lambda": 2.0}])


# --- no host sync ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["ignore", "zero"])
def test_clip_is_sync_free(no_cpu_branch: None, policy: str) -> None:
    assert gradclip._sync.branch_on_cpu is False
    params = make_params(dtype=torch.float32)
    clipper = AdaGC(
        [{"params": params[:3]}, {"params": params[3:], "lambda_rel": 2.0}],
        warmup_steps=2,
        nonfinite=policy,
    )
    missing = frozenset({(3, 1), (4, 4)})  # exercises the gather/scatter path
    sequences = list(grad_sequence(6, dtype=torch.float32, missing=missing))
    with no_host_sync():
        for grads in sequences:
            set_grads(params, grads)
            clipper.clip_()


# --- threshold schedules ----------------------------------------------------------------


def cosine(total: int, final: float) -> Callable[[int], float]:
    """The half-cosine multiplier, written from its formula (not from Cosine.factor)."""
    return lambda t: final + (1 - final) * (1 + math.cos(math.pi * min(t, total) / total)) / 2


def test_a_cosine_schedule_matches_the_reference_in_and_after_the_warmup() -> None:
    """The schedule scales λ_abs in the warm-up and every λ_rel·γ_i after it; γ is updated
    from the unscheduled clipped norms (with final factor 0.3 < 1/λ_rel, the scheduled
    ones would shrink every γ geometrically)."""
    params = make_params()
    options = {"lambda_abs": 2.0, "warmup_steps": 40, "lambda_rel": 1.2, "beta": 0.9}
    clipper = AdaGC(params, **options, schedule="cosine:80:0.3")
    reference = ReferenceAdaGC(len(params), **options, schedule=cosine(80, 0.3))
    run_against_reference(clipper, reference, params, grad_sequence(250, seed=6))
    expected = [math.inf if g is None else g for g in reference.gamma]
    gamma = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(clipper.state[0]["gamma"], gamma, rtol=1e-12, atol=0)
    plain = AdaGC(make_params(), **options)
    for grads in grad_sequence(250, seed=6):
        set_grads(plain.param_groups[0]["params"], grads)
        plain.clip_()
    torch.testing.assert_close(
        clipper.state[0]["gamma"], plain.state[0]["gamma"], rtol=1e-12, atol=0
    )
