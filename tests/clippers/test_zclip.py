"""ZClip against the zclip 1.0.0 package, a slow float64 reference, and its invariants.

References used here never come from gradclip:

* ``zclip.ZClip`` (PyPI 1.0.0), configured as the paper (``max_grad_norm=None``) and
  in its own defaults, driven with the same gradients as ours (each on its own copy
  of a small model) for 500 steps of spiky, heavy-tailed and trending norms;
* ``reference_zclip`` below, written from the paper's formulas in float64, for the
  options zclip lacks or does differently (non-finite norms, ``clip_factor_scope``).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import zclip
from hypothesis import given
from hypothesis import strategies as st

import gradclip._sync
from gradclip.clippers.zclip import ZClip
from gradclip.nonfinite import NonFiniteGradientError
from gradclip.spec import from_spec
from sync_guard import no_host_sync

STEPS = 500
STATE_KEYS = ("buffer", "count", "mean", "var")


# -- norm sequences ------------------------------------------------------------------


def _spikes(rng: np.random.Generator, n: int, rate: float, low: float, high: float) -> np.ndarray:
    return np.where(rng.random(n) < rate, rng.uniform(low, high, n), 1.0)


def random_spiky(n: int, seed: int) -> np.ndarray:
    """Log-normal noise around 1 with 4% spikes of 2x to 20x."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.normal(0.0, 0.25, n)) * _spikes(rng, n, 0.04, 2.0, 20.0)


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    """0.5 + |Student t(1.5)|: occasional norms hundreds of times the median."""
    rng = np.random.default_rng(seed)
    return 0.5 + np.abs(rng.standard_t(1.5, n))


def trending(n: int, seed: int) -> np.ndarray:
    """A decay from ~10 to ~0.3, then a slow rise, with noise and 3% spikes."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = 0.3 + 10.0 * np.exp(-t / 100.0) + 0.002 * t
    return base * np.exp(rng.normal(0.0, 0.1, n)) * _spikes(rng, n, 0.03, 3.0, 10.0)


SEQUENCES: dict[str, Callable[[int, int], np.ndarray]] = {
    "random": random_spiky,
    "heavy": heavy_tailed,
    "trending": trending,
}


# -- the slow reference --------------------------------------------------------------


def _z_score(g: float, mean: float, denominator: float) -> float:
    if denominator == 0.0:
        return math.inf if g > mean else (math.nan if g == mean else -math.inf)
    return (g - mean) / denominator


def reference_zclip(
    norms: Sequence[float],
    *,
    z_thresh: float = 2.5,
    alpha: float = 0.97,
    eps: float = 1e-6,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    max_grad_norm: float | None = None,
    clip_factor: float = 1.0,
    clip_factor_scope: str = "deviation",
    skip_update_on_spike: bool = False,
) -> tuple[list[float], float | None, float | None]:
    """Per-step thresholds (inf: not clipped) and the final (μ, σ²), in float64.

    Warm-up: the first ``warmup_steps`` finite norms give μ (mean) and σ² (population
    variance). Then, with μ, σ from before the step, a flagged step is clipped to its
    threshold and the EMA is fed that threshold; otherwise it is fed the norm.
    Non-finite norms are never recorded.
    """
    buffer: list[float] = []
    mean: float | None = None
    var: float | None = None
    thresholds = []
    for g in norms:
        threshold = math.inf
        if mean is None or var is None:
            if math.isfinite(g):
                buffer.append(g)
                if len(buffer) == warmup_steps:
                    mean = sum(buffer) / len(buffer)
                    var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
        else:
            std = math.sqrt(var)
            spike: float | None = None
            if mode == "percentile":
                if g > mean + z_thresh * std:
                    spike = mean + z_thresh * std
            else:
                z = _z_score(g, mean, std + eps)
                if z > z_thresh:
                    deviation = z_thresh**2 * std / z
                    if clip_option == "mean":
                        spike = mean
                    elif clip_factor_scope == "threshold":
                        spike = clip_factor * (mean + deviation)
                    else:
                        spike = mean + clip_factor * deviation
            if spike is not None:
                threshold = spike
            if math.isfinite(g) and not (skip_update_on_spike and spike is not None):
                value = g if spike is None else spike
                mean = alpha * mean + (1 - alpha) * value
                var = alpha * var + (1 - alpha) * (value - mean) ** 2
        if max_grad_norm is not None:
            threshold = min(threshold, max_grad_norm)
        thresholds.append(threshold)
    return thresholds, mean, var


# -- drivers -------------------------------------------------------------------------


def scalar_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(1))


def run_scalar(
    norms: Sequence[float], **options: Any
) -> tuple[ZClip, list[float], list[float], list[float]]:
    """Feed ``norms`` as the gradient of one scalar; (clipper, thresholds, norms seen, grads)."""
    w = scalar_param()
    clipper = ZClip([w], **options)
    thresholds, seen, grads = [], [], []
    for g in norms:
        w.grad = torch.tensor([g], dtype=torch.float32)
        stats = clipper.clip_()
        thresholds.append(stats.threshold.item())
        seen.append(stats.total_norm.item())
        grads.append(w.grad.item())
    return clipper, thresholds, seen, grads


def assert_thresholds_close(
    ours: Sequence[float], expected: Sequence[float], rtol: float = 2e-5
) -> None:
    assert len(ours) == len(expected)
    for t, (a, b) in enumerate(zip(ours, expected)):
        if math.isinf(b):
            assert a == b, f"step {t + 1}: threshold {a}, expected {b}"
        else:
            assert a == pytest.approx(b, rel=rtol), f"step {t + 1}: threshold {a}, expected {b}"


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def set_grads(models: Sequence[torch.nn.Module], norm: float, gen: torch.Generator) -> None:
    """Give every model the same random gradients, of global L2 norm ``norm``."""
    shapes = [p.shape for p in models[0].parameters()]
    directions = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    total = math.sqrt(sum(float(d.square().sum()) for d in directions))
    for model in models:
        for p, d in zip(model.parameters(), directions):
            p.grad = (d * (norm / total)).to(torch.float32)


def package_threshold(package: Any, model: torch.nn.Module) -> float:
    """The norm zclip 1.0.0 clips to on its next ``step(model)`` (inf: none); no side effects."""
    if not package.initialized:
        cap = package.max_grad_norm
        return math.inf if cap is None else cap
    clip_val = package._compute_clip_val(package._compute_grad_norm(model))
    threshold = math.inf if clip_val is None else clip_val
    if package.max_grad_norm is not None:
        threshold = min(threshold, package.max_grad_norm)
    return threshold


# -- differential tests against zclip 1.0.0 ------------------------------------------

# (our options, the package's options): each pair is the same algorithm.
PACKAGE_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": ({}, {"max_grad_norm": None}),
    "zscore-mean": ({"clip_option": "mean"}, {"clip_option": "mean", "max_grad_norm": None}),
    "percentile": ({"mode": "percentile"}, {"mode": "percentile", "max_grad_norm": None}),
    "tuned": (
        {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 10},
        {"alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 10, "max_grad_norm": None},
    ),
    # The package's own defaults clip at 1.0 on every step: ours does with max_grad_norm=1.
    "package-defaults": ({"max_grad_norm": 1.0}, {}),
    # zclip 1.0.0's clip_factor multiplies μ too: ours with clip_factor_scope="threshold".
    "clip-factor": (
        {"clip_factor": 0.7, "clip_factor_scope": "threshold"},
        {"clip_factor": 0.7, "max_grad_norm": None},
    ),
    "skip-update": (
        {"skip_update_on_spike": True},
        {"skip_update_on_spike": True, "max_grad_norm": None},
    ),
}


# The paper's configuration on every sequence; each variant on one (rotating).
PACKAGE_CASES = [("paper", name) for name in sorted(SEQUENCES)] + [
    (config, sorted(SEQUENCES)[i % len(SEQUENCES)])
    for i, config in enumerate(c for c in PACKAGE_CONFIGS if c != "paper")
]


@pytest.mark.parametrize(("config", "sequence"), PACKAGE_CASES)
def test_matches_zclip_package_every_step(config: str, sequence: str) -> None:
    ours_options, package_options = PACKAGE_CONFIGS[config]
    norms = SEQUENCES[sequence](STEPS, seed=len(config) * 7 + len(sequence))
    ours_model, package_model = small_model(), small_model()
    clipper = ZClip(ours_model.parameters(), **ours_options)
    package = zclip.ZClip(**package_options)
    gen = torch.Generator().manual_seed(1)
    clipped_steps = 0
    for t, norm in enumerate(norms):
        set_grads([ours_model, package_model], float(norm), gen)
        expected = package_threshold(package, package_model)
        stats = clipper.clip_()
        package.step(package_model)
        where = f"step {t + 1} (norm {norm:.4g})"
        threshold = stats.threshold.item()
        if math.isinf(expected):
            assert math.isinf(threshold), f"{where}: we clip to {threshold}, zclip does not"
        else:
            assert threshold == pytest.approx(expected, rel=2e-5), where
        assert bool(stats.clipped) == (expected < norm), where
        clipped_steps += bool(stats.clipped)
        for a, b in zip(ours_model.parameters(), package_model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=1e-9, msg=where)
        if package.initialized:
            state = clipper.state[0]
            assert state["mean"].item() == pytest.approx(package.mean, rel=2e-5), where
            assert state["var"].item() == pytest.approx(package.var, rel=1e-4, abs=1e-9), where
    # The comparison means something: both clipped and unclipped steps occurred.
    assert 5 <= clipped_steps < STEPS, clipped_steps


def test_package_defaults_clip_every_warmup_step_ours_do_not() -> None:
    """The documented difference: zclip's max_grad_norm=1.0 default is fixed clipping."""
    ours_model, package_model = small_model(), small_model()
    clipper, package = ZClip(ours_model.parameters()), zclip.ZClip()
    gen = torch.Generator().manual_seed(0)
    set_grads([ours_model, package_model], 5.0, gen)
    before = [p.grad.clone() for p in ours_model.parameters()]
    assert not bool(clipper.clip_().clipped)
    package.step(package_model)
    assert all(torch.equal(p.grad, b) for p, b in zip(ours_model.parameters(), before))
    clipped = math.sqrt(
        sum(float(p.grad.double().square().sum()) for p in package_model.parameters())
    )
    assert clipped == pytest.approx(1.0, rel=1e-5)


def test_clip_factor_scopes_differ_as_documented() -> None:
    """Default scope scales only the deviation (zclip's docstring), not μ (zclip's code)."""
    norms = list(random_spiky(300, seed=5))
    for scope in ("deviation", "threshold"):
        _, ours, seen, _ = run_scalar(norms, clip_factor=0.6, clip_factor_scope=scope)
        expected, _, _ = reference_zclip(seen, clip_factor=0.6, clip_factor_scope=scope)
        assert_thresholds_close(ours, expected)
    _, deviation, _, _ = run_scalar(norms, clip_factor=0.6)
    _, whole, _, _ = run_scalar(norms, clip_factor=0.6, clip_factor_scope="threshold")
    assert any(math.isfinite(a) and a > b * 1.05 for a, b in zip(deviation, whole))


# -- variants against the slow reference ---------------------------------------------

REFERENCE_CONFIGS: list[dict[str, Any]] = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"mode": "PERCENTILE", "z_thresh": 1.5},
    {"max_grad_norm": 2.0},
    {"clip_factor": 0.5},
    {"clip_factor": 0.8, "clip_factor_scope": "threshold", "max_grad_norm": 3.0},
    {"skip_update_on_spike": True, "clip_option": "mean"},
    {"alpha": 0.5, "z_thresh": 1.0, "warmup_steps": 1, "eps": 0.0},
    {"alpha": 0.99, "z_thresh": 3.5, "warmup_steps": 60, "eps": 1e-3},
]


def with_nonfinite(norms: np.ndarray, seed: int) -> list[float]:
    """``norms`` with ~3% of the steps NaN or inf (some during the warm-up)."""
    rng = np.random.default_rng(seed)
    out = [float(x) for x in norms]
    for i in (2, 7, *rng.choice(len(out), size=len(out) // 33, replace=False)):
        out[i] = math.nan if rng.random() < 0.5 else math.inf
    return out


@pytest.mark.parametrize(
    ("options", "sequence"),
    [(o, sorted(SEQUENCES)[i % len(SEQUENCES)]) for i, o in enumerate(REFERENCE_CONFIGS)],
    ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else x,
)
def test_variants_match_reference(options: dict[str, Any], sequence: str) -> None:
    norms = with_nonfinite(SEQUENCES[sequence](400, seed=3), seed=4)
    clipper, ours, seen, _ = run_scalar(norms, **options)
    reference_options = {k: v.lower() if isinstance(v, str) else v for k, v in options.items()}
    expected, mean, var = reference_zclip(seen, **reference_options)
    assert_thresholds_close(ours, expected)
    assert sum(math.isfinite(x) for x in ours) >= 5
    assert mean is not None and var is not None
    assert clipper.state[0]["mean"].item() == pytest.approx(mean, rel=2e-5)
    assert clipper.state[0]["var"].item() == pytest.approx(var, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_other_norm_types_follow_the_reference(norm_type: float) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    clipper = ZClip(params, norm_type=norm_type, warmup_steps=10)
    levels = random_spiky(200, seed=8)
    thresholds, seen = [], []
    for level in levels:
        grads = [torch.randn(p.shape, generator=gen) * float(level) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        flat = torch.cat([g.double().flatten() for g in grads]).abs()
        expected_norm = float(flat.max()) if math.isinf(norm_type) else float(flat.sum())
        stats = clipper.clip_()
        assert stats.total_norm.item() == pytest.approx(expected_norm, rel=1e-6)
        thresholds.append(stats.threshold.item())
        seen.append(stats.total_norm.item())
    expected, _, _ = reference_zclip(seen, warmup_steps=10)
    assert_thresholds_close(thresholds, expected)


def test_param_groups_keep_their_own_statistics() -> None:
    a, b = scalar_param(), scalar_param()
    clipper = ZClip(
        [{"params": [a]}, {"params": [b], "z_thresh": 1.5, "warmup_steps": 5}], alpha=0.9
    )
    norms_a, norms_b = random_spiky(150, seed=1), 10.0 * heavy_tailed(150, seed=2)
    got_a, got_b = [], []
    for x, y in zip(norms_a, norms_b):
        a.grad, b.grad = torch.tensor([float(x)]), torch.tensor([float(y)])
        clipper.clip_()
        got_a.append(a.grad.item())
        got_b.append(b.grad.item())
    for got, norms, options in (
        (got_a, norms_a, {"alpha": 0.9}),
        (got_b, norms_b, {"alpha": 0.9, "z_thresh": 1.5, "warmup_steps": 5}),
    ):
        seen = [float(np.float32(x)) for x in norms]
        thresholds, _, _ = reference_zclip(seen, **options)
        expected = [g if g <= t else t * g / (g + 1e-6) for g, t in zip(seen, thresholds)]
        assert got == pytest.approx(expected, rel=2e-5)


# -- warm-up -------------------------------------------------------------------------


def test_warmup_never_clips_then_uses_population_statistics() -> None:
    w = scalar_param()
    clipper = ZClip([w], warmup_steps=6)
    norms = [1.0, 2.0, 1e4, 0.5, 3.0, 1.5]  # a huge spike inside the warm-up
    for g in norms:
        w.grad = torch.tensor([g])
        stats = clipper.clip_()
        assert w.grad.item() == g and not bool(stats.clipped)
        assert math.isinf(stats.threshold.item())
    state = clipper.state[0]
    assert state["count"].item() == 6
    assert state["mean"].item() == pytest.approx(np.mean(norms), rel=1e-6)
    assert state["var"].item() == pytest.approx(np.var(norms), rel=1e-6)  # ddof=0
    # The first step after the warm-up is the first that can clip.
    w.grad = torch.tensor([1e6])
    assert bool(clipper.clip_().clipped)


def test_nonfinite_norms_extend_the_warmup() -> None:
    finite = [1.0, 1.1, 0.9, 1.0, 1.05]
    with_bad = [1.0, math.nan, 1.1, 0.9, math.inf, 1.0, -math.inf, 1.05]
    _, _, _, grads_bad = run_scalar([*with_bad, 50.0], warmup_steps=5)
    clipper, _, _, grads = run_scalar([*finite, 50.0], warmup_steps=5)
    assert grads[-1] < 50.0 and grads_bad[-1] == pytest.approx(grads[-1], rel=1e-6)
    # Only four finite norms before the spike: it completes the warm-up, unclipped.
    _, thresholds, _, _ = run_scalar([*with_bad[:6], 50.0], warmup_steps=5)
    assert math.isinf(thresholds[-1])
    assert clipper.state[0]["count"].item() == 5


def test_max_grad_norm_caps_during_warmup_like_torch() -> None:
    ours, theirs = small_model(), small_model()
    clipper = ZClip(ours.parameters(), max_grad_norm=0.5, warmup_steps=4)
    gen = torch.Generator().manual_seed(3)
    for norm in [0.2, 3.0, 0.7, 1.0]:
        set_grads([ours, theirs], norm, gen)
        stats = clipper.clip_()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        assert all(
            torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), theirs.parameters())
        )
        assert stats.threshold.item() == 0.5


def test_inf_max_grad_norm_means_no_cap() -> None:
    clipper = ZClip([scalar_param()], max_grad_norm=math.inf)
    assert clipper.param_groups[0]["max_grad_norm"] is None


# -- properties ----------------------------------------------------------------------

norm_lists = st.lists(
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=40,
)
option_sets = st.fixed_dictionaries(
    {
        "warmup_steps": st.integers(1, 8),
        "alpha": st.floats(0.05, 0.99),
        "z_thresh": st.floats(0.2, 4.0),
        "mode": st.sampled_from(["zscore", "percentile"]),
    }
)


@given(norm_lists, option_sets)
def test_invariants(norms: list[float], options: dict[str, Any]) -> None:
    w = scalar_param()
    clipper = ZClip([w], **options)
    lo, hi = math.inf, 0.0
    for step, g in enumerate(norms, start=1):
        state = clipper.state[0]
        mean, std = state["mean"].item(), state["var"].sqrt().item()
        w.grad = torch.tensor([g])
        stats = clipper.clip_()
        g32 = stats.total_norm.item()
        scale, threshold = stats.scale.item(), stats.threshold.item()
        assert 0.0 <= scale <= 1.0
        assert stats.clipped_norm.item() <= g32 * (1 + 1e-6)
        if step <= options["warmup_steps"]:
            assert scale == 1.0 and math.isinf(threshold)
        elif bool(stats.clipped):
            # A spike is clipped to between μ and μ + z_thresh·σ, below the norm.
            upper = mean + options["z_thresh"] * std
            assert mean * (1 - 1e-5) <= threshold <= upper * (1 + 1e-5) + 1e-6
            assert threshold < g32
        lo, hi = min(lo, g32), max(hi, g32)
        if step >= options["warmup_steps"]:
            # μ is a convex combination of values between the smallest and largest norm.
            assert lo * (1 - 1e-5) <= clipper.state[0]["mean"].item() <= hi * (1 + 1e-5)
            assert clipper.state[0]["var"].item() >= 0.0


@given(norm_lists, option_sets, st.sampled_from([0.25, 0.5, 2.0, 8.0]))
def test_scale_equivariance_is_exact_for_powers_of_two(
    norms: list[float], options: dict[str, Any], factor: float
) -> None:
    """Scaling every norm by 2^k scales every threshold by 2^k, bit for bit (eps = 0).

    (The scale itself is not exactly invariant: torch's ``+ 1e-6`` in the coefficient.)
    """
    _, base, _, _ = run_scalar(norms, eps=0.0, **options)
    _, scaled, _, _ = run_scalar([g * factor for g in norms], eps=0.0, **options)
    assert [t * factor for t in base] == scaled


@given(
    norm_lists,
    st.lists(st.tuples(st.integers(0, 60), st.sampled_from([math.nan, math.inf])), max_size=6),
    st.sampled_from(["zscore", "percentile"]),
)
def test_nonfinite_steps_change_nothing_else(
    norms: list[float], bad: list[tuple[int, float]], mode: str
) -> None:
    """Inserting NaN/inf steps leaves every finite step's threshold exactly as it was."""
    mixed: list[float] = list(norms)
    for position, value in sorted(bad, reverse=True):
        mixed.insert(min(position, len(mixed)), value)
    clean_clipper, clean, _, _ = run_scalar(norms, warmup_steps=3, mode=mode)
    mixed_clipper, thresholds, _, _ = run_scalar(mixed, warmup_steps=3, mode=mode)
    assert [t for t, g in zip(thresholds, mixed) if math.isfinite(g)] == clean
    for key in STATE_KEYS:
        assert torch.equal(clean_clipper.state[0][key], mixed_clipper.state[0][key])


# -- non-finite steps ----------------------------------------------------------------


@pytest.mark.parametrize("nonfinite", ["ignore", "zero"])
@pytest.mark.parametrize("steps_before", [2, 12])  # in the warm-up, after it
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_step_leaves_state_untouched(
    nonfinite: str, steps_before: int, bad: float
) -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    clipper = ZClip([w], warmup_steps=5, nonfinite=nonfinite)
    for g in random_spiky(steps_before, seed=0):
        w.grad = torch.full((3,), float(g))
        clipper.clip_()
    before = {k: clipper.state[0][k].clone() for k in STATE_KEYS}
    w.grad = torch.tensor([1.0, bad, 2.0])
    stats = clipper.clip_()
    assert not bool(stats.finite)
    for key in STATE_KEYS:
        assert torch.equal(clipper.state[0][key], before[key]), key
    assert clipper.state[0]["calls"] == steps_before + 1
    if nonfinite == "zero":
        assert torch.equal(w.grad, torch.zeros(3))


def test_raise_policy_leaves_state_and_counter_untouched() -> None:
    w = scalar_param()
    clipper = ZClip([w], nonfinite="raise", warmup_steps=2)
    w.grad = torch.tensor([1.0])
    clipper.clip_()
    before = {k: clipper.state[0][k].clone() for k in STATE_KEYS}
    w.grad = torch.tensor([math.nan])
    with pytest.raises(NonFiniteGradientError, match="not finite"):
        clipper.clip_()
    assert clipper.state[0]["calls"] == 1
    for key in STATE_KEYS:
        assert torch.equal(clipper.state[0][key], before[key])


# -- checkpoints ---------------------------------------------------------------------


def make_clipper(params: list[torch.nn.Parameter]) -> ZClip:
    return ZClip(
        [{"params": params[:1]}, {"params": params[1:], "mode": "percentile", "warmup_steps": 7}],
        warmup_steps=10,
        max_grad_norm=50.0,
    )


@pytest.mark.parametrize("k", [0, 4, 9, 30])  # fresh, mid-warm-up, ends it, after it
def test_checkpoint_round_trip_is_bit_identical(k: int) -> None:
    norms = with_nonfinite(random_spiky(60, seed=11), seed=12)

    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]

    def feed(clipper: ZClip, ps: list[torch.nn.Parameter], g: float, t: int) -> list[torch.Tensor]:
        ps[0].grad = torch.tensor([g, 0.5 * g])
        ps[1].grad = torch.tensor([1.0, -2.0, 0.25]) * (g if t % 3 else 2 * g)
        stats = clipper.clip_()
        return [ps[0].grad.clone(), ps[1].grad.clone(), stats.threshold, stats.scale]

    straight_params = params()
    straight = make_clipper(straight_params)
    expected = [feed(straight, straight_params, g, t) for t, g in enumerate(norms)]

    first_params = params()
    first = make_clipper(first_params)
    got = [feed(first, first_params, g, t) for t, g in enumerate(norms[:k])]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_params = params()
    resumed = make_clipper(resumed_params)
    resumed.load_state_dict(loaded)
    got += [feed(resumed, resumed_params, g, t) for t, g in enumerate(norms[k:], start=k)]
    for t, (a, b) in enumerate(zip(got, expected)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f"step {t + 1}")


def test_reset_forgets_history() -> None:
    norms = [float(x) for x in random_spiky(80, seed=2)]
    w = scalar_param()
    clipper = ZClip([w], warmup_steps=5)
    for g in norms:
        w.grad = torch.tensor([g])
        clipper.clip_()
    clipper.reset()
    replay = []
    for g in norms:
        w.grad = torch.tensor([g])
        replay.append(clipper.clip_().threshold.item())
    assert replay == run_scalar(norms, warmup_steps=5)[1]


# -- options and specs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "needle"),
    [
        ({"alpha": 0.0}, ValueError, "alpha must be in (0, 1); got 0.0"),
        ({"alpha": 1.0}, ValueError, "got 1.0"),
        ({"alpha": -0.5}, ValueError, "got -0.5"),
        ({"alpha": "high"}, TypeError, "'high'"),
        ({"z_thresh": 0.0}, ValueError, "z_thresh must be a finite number > 0; got 0.0"),
        ({"z_thresh": -2.5}, ValueError, "got -2.5"),
        ({"z_thresh": math.inf}, ValueError, "got inf"),
        ({"warmup_steps": 0}, ValueError, "warmup_steps must be >= 1; got 0"),
        ({"warmup_steps": -3}, ValueError, "got -3"),
        ({"warmup_steps": 2.5}, TypeError, "got 2.5"),
        ({"warmup_steps": True}, TypeError, "got True"),
        (
            {"mode": "median"},
            ValueError,
            "mode must be one of 'zscore', 'percentile'; got 'median'",
        ),
        ({"clip_option": "max"}, ValueError, "got 'max'"),
        ({"mode": "percentile", "clip_option": "mean"}, ValueError, "clip_option='mean'"),
        ({"eps": -1e-6}, ValueError, "eps must be a finite number >= 0; got -1e-06"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0, inf or None"),
        ({"max_grad_norm": -1}, ValueError, "got -1.0"),
        ({"max_grad_norm": math.nan}, ValueError, "got nan"),
        ({"clip_factor": 1.5}, ValueError, "clip_factor must be in (0, 1]; got 1.5"),
        ({"clip_factor": 0.0}, ValueError, "got 0.0"),
        ({"clip_factor": 0.5, "clip_option": "mean"}, ValueError, "clip_factor=0.5"),
        ({"clip_factor_scope": "mean"}, ValueError, "got 'mean'"),
        ({"skip_update_on_spike": 1}, TypeError, "got 1"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_value(
    options: dict[str, Any], error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as info:
        ZClip([scalar_param()], **options)
    assert needle in str(info.value)


def test_bad_group_option_raises() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\); got 2.0"):
        ZClip([{"params": [scalar_param()], "alpha": 2.0}])
    with pytest.raises(ValueError, match="no option 'zthresh'"):
        ZClip([{"params": [scalar_param()], "zthresh": 2.0}])


def test_spec_strings() -> None:
    clipper = from_spec("zclip:z=3,mode=percentile,warmup=5,max_norm=inf", [scalar_param()])
    assert isinstance(clipper, ZClip)
    group = clipper.param_groups[0]
    assert (group["z_thresh"], group["mode"], group["warmup_steps"]) == (3.0, "percentile", 5)
    assert group["max_grad_norm"] is None
    assert from_spec("zclip:2.0", [scalar_param()]).param_groups[0]["z_thresh"] == 2.0
    assert from_spec("zclip", [scalar_param()]).param_groups[0]["alpha"] == 0.97
    with pytest.raises(ValueError, match="aliases: z=z_thresh"):
        from_spec("zclip:zeta=2", [scalar_param()])


# -- no host sync --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mode": "percentile", "max_grad_norm": 3.0},
        {"clip_option": "mean", "skip_update_on_spike": True},
        {"clip_factor": 0.5, "clip_factor_scope": "threshold", "nonfinite": "zero"},
    ],
    ids=["paper", "percentile-cap", "mean-skip", "factor-zero"],
)
def test_no_host_sync_in_warmup_and_after(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    norms = with_nonfinite(random_spiky(40, seed=6), seed=7)  # NaN/inf at steps 3 and 8
    norms[30] = 100.0

    def run(guard: bool) -> tuple[ZClip, list[torch.Tensor]]:
        params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))]
        clipper = ZClip(
            [{"params": params[:1]}, {"params": params[1:], "warmup_steps": 3}],
            warmup_steps=6,
            **options,
        )
        out = []
        for g in norms:
            params[0].grad = torch.full((4,), g / 2)
            params[1].grad = torch.full((2, 2), g)
            with no_host_sync() if guard else contextlib.nullcontext():
                stats = clipper.clip_()
            out += [stats.clipped, params[0].grad.clone(), params[1].grad.clone()]
        return clipper, out

    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", False)
    clipper, branch_free = run(guard=True)
    assert clipper.state[0]["count"].item() == 6 and clipper.state[1]["count"].item() == 3
    assert bool(branch_free[3 * 30])  # the spike at step 31 was clipped
    # The accelerator path computes what the CPU shortcut computes.
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", True)
    for a, b in zip(branch_free, run(guard=False)[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not hasattr(ZClip, "measure_"), reason="base without measure_()")
def test_measure_gives_the_scale_clip_applies_and_leaves_grads_alone() -> None:
    """ZClip is a plain GlobalNormClipper: its scale can be folded into a fused step."""
    norms = [float(x) for x in random_spiky(120, seed=9)]
    a, b = scalar_param(), scalar_param()
    clipping, measuring = ZClip([a], warmup_steps=5), ZClip([b], warmup_steps=5)
    assert measuring.foldable
    for g in norms:
        a.grad, b.grad = torch.tensor([g]), torch.tensor([g])
        applied = clipping.clip_()
        measured = measuring.measure_()
        assert torch.equal(b.grad, torch.tensor([g]))
        # clip_() multiplied its gradient by exactly the factor measure_() reports.
        assert torch.equal(a.grad, b.grad * measured.scale)
        assert torch.equal(applied.threshold, measured.threshold)
    for key in STATE_KEYS:
        assert torch.equal(clipping.state[0][key], measuring.state[0][key])
