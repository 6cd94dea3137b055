"""AutoClip against the paper's rule (numpy.percentile over the history) and autoclip 0.2.1.

The reference below is the paper's code path written out: keep a list of global
norms, append the current one, take ``numpy.percentile`` (linear interpolation), clip
with ``torch.nn.utils.clip_grad_norm_``. Non-finite norms are skipped (gradclip's
documented deviation: the paper's code would append them and return NaN forever).

Tolerances, stated once:

* ``history="full"`` and ``"window"``: float64 runs agree with numpy to 1e-12
  relative (both do numpy's (n - 1) q virtual index and the same lerp); float32 runs
  to 1e-6 (the threshold is rounded to float32 once).
* ``history="stream"``: within a relative ``relative_accuracy`` (default 1 %) of the
  exact full-history percentile at every step, for any sequence of norms in
  float32's normal range (a hypothesis property); on 5,000 steps of a stationary
  lognormal its rank in the history stays within 2 percentage points of p.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradclip._sync
from gradclip.clippers.autoclip import (
    AutoClip,
    _percentile_from_table,
    _percentile_of_sorted,
    _window_ranks,
)
from gradclip.spec import from_spec
from sync_guard import no_host_sync

MODES = ("full", "window", "stream")


# -- the reference and drivers ---------------------------------------------------------


def paper_thresholds(
    norms: Sequence[float],
    p: float,
    *,
    window: int | None = None,
    include_current: bool = True,
) -> np.ndarray:
    """The paper's threshold sequence: numpy.percentile of the (finite) norm history.

    ``window`` keeps only the last ``window`` finite norms; ``include_current=False``
    takes the percentile before appending (autoclip 0.2.1's convention). An empty
    history gives ``inf`` (no clipping).
    """
    history: list[float] = []
    out = []
    for n in norms:
        if include_current and math.isfinite(n):
            history.append(n)
        kept = history if window is None else history[-window:]
        out.append(np.percentile(np.array(kept, dtype=np.float64), p) if kept else math.inf)
        if not include_current and math.isfinite(n):
            history.append(n)
    return np.array(out)


def one_param(dtype: torch.dtype = torch.float64) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(1, dtype=dtype))


def drive(
    clipper: AutoClip, param: torch.nn.Parameter, norms: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Feed gradients ``[n]`` (global norm |n|); return the measured norms and thresholds."""
    total, threshold = [], []
    for n in norms:
        param.grad = torch.tensor([n], dtype=param.dtype)
        stats = clipper.clip_()
        total.append(stats.total_norm)
        threshold.append(stats.threshold)
    return (
        torch.stack(total).double().numpy(),
        torch.stack(threshold).double().numpy(),
    )


def heavy_tailed(kind: str, steps: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        return rng.lognormal(0.0, 2.0, steps)
    if kind == "pareto":  # tail index 1.1: infinite variance
        return rng.pareto(1.1, steps) + 1e-3
    if kind == "cauchy":
        return np.abs(rng.standard_cauchy(steps))
    if kind == "spiky-decay":  # training-like: a decaying scale with rare 1000x spikes
        base = np.exp(-np.arange(steps) / 150.0) * rng.lognormal(0.0, 0.3, steps)
        spikes = rng.random(steps) < 0.02
        return np.where(spikes, base * 1000.0, base)
    if kind == "ties":  # few distinct values, and exact zeros
        return rng.choice([0.0, 0.5, 1.0, 1.0, 2.0, 8.0], steps)
    raise ValueError(kind)


SEQUENCES = ("lognormal", "pareto", "cauchy", "spiky-decay", "ties")


def model_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 5), (8,), (3, 8), ()]]


def set_grads(params: list[torch.nn.Parameter], step: int, seed: int = 0) -> None:
    """Step-dependent random gradients with occasional spikes (the same for equal inputs)."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    spike = 50.0 if step % 11 == 5 else 1.0
    scale = float(torch.empty(()).log_normal_(0.0, 1.0, generator=g)) * spike
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


# -- exactness against numpy --------------------------------------------------------------


@pytest.mark.parametrize("kind", SEQUENCES)
@pytest.mark.parametrize("p", [10.0, 37.5, 90.0])
def test_full_history_matches_numpy_percentile_every_step(kind: str, p: float) -> None:
    norms = heavy_tailed(kind, 400)
    param = one_param()
    total, thresholds = drive(AutoClip([param], p, history="full"), param, norms)
    np.testing.assert_array_equal(total, np.abs(norms))
    np.testing.assert_allclose(thresholds, paper_thresholds(total, p), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["lognormal", "spiky-decay", "ties"])
@pytest.mark.parametrize("window", [1, 7, 100])
def test_window_matches_numpy_on_the_last_window_norms(kind: str, window: int) -> None:
    param = one_param()
    norms = heavy_tailed(kind, 300, seed=1)
    total, thresholds = drive(AutoClip([param], 10, window=window), param, norms)
    expected = paper_thresholds(total, 10, window=window)
    np.testing.assert_allclose(thresholds, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["full", "window"])
@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_host_path_is_bit_identical_to_the_branch_free_path(
    monkeypatch: pytest.MonkeyPatch, mode: str, include_current: bool, dtype: torch.dtype
) -> None:
    # On CPU the window and full modes read the count on the host; an accelerator takes
    # the branch-free path. Both must give the same thresholds, gradients and state,
    # through NaN steps, ties, the window's wrap-around and the full history's growth.
    norms = heavy_tailed("ties", 150, seed=3)
    norms[[4, 40, 41, 99]] = [math.nan, math.inf, math.nan, math.nan]

    def run(on_host: bool) -> tuple[list[torch.Tensor], dict[str, object]]:
        monkeypatch.setattr(gradclip._sync, "branch_on_cpu", on_host)
        param = one_param(dtype)
        clipper = AutoClip([param], 30, history=mode, window=7, include_current=include_current)
        seen = []
        for n in norms:
            param.grad = torch.tensor([n], dtype=dtype)
            stats = clipper.clip_()
            seen += [stats.threshold, stats.scale, param.grad.clone()]
        return seen, clipper.state_dict()

    (host, host_state), (device, device_state) = run(True), run(False)
    for a, b in zip(host, device, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert host_state["step"] == device_state["step"]
    torch.testing.assert_close(host_state["state"], device_state["state"], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0.1, 1 / 3, 0.9, 0.999])
def test_window_rank_table_is_bit_identical_to_the_direct_percentile(
    dtype: torch.dtype, window: int, q: float
) -> None:
    # The window mode looks up, per count, what _percentile_of_sorted computes.
    values = torch.sort(torch.rand(window, dtype=dtype, generator=torch.Generator().manual_seed(0)))
    table = _window_ranks(window, q, torch.device("cpu"), dtype)
    for count in range(window + 1):
        filled = values.values.clone()
        filled[count:] = math.inf  # unfilled ring slots sort last as +inf
        got = _percentile_from_table(filled, torch.tensor(count), table)
        want = _percentile_of_sorted(filled, torch.tensor(count), q)
        assert torch.equal(got, want), (count, got, want)
        if count:
            ref = np.percentile(filled[:count].numpy(), 100 * q)
            np.testing.assert_allclose(
                got.numpy(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-12
            )


@pytest.mark.parametrize("mode", ["full", "window"])
def test_float32_thresholds_match_numpy_on_the_float32_norms(mode: str) -> None:
    param = one_param(torch.float32)
    norms = heavy_tailed("lognormal", 300, seed=2)
    total, thresholds = drive(AutoClip([param], 10, history=mode, window=50), param, norms)
    expected = paper_thresholds(total, 10, window=50 if mode == "window" else None)
    np.testing.assert_allclose(thresholds, expected, rtol=1e-6, atol=0)


def test_gradients_are_clipped_like_clip_grad_norm_at_the_paper_threshold() -> None:
    """End to end on a model's gradients: the paper's code (list + numpy + torch)."""
    ours, ref = model_params(), model_params()
    clipper = AutoClip(ours, percentile=10, history="full")
    history: list[float] = []
    for step in range(60):
        set_grads(ours, step)
        set_grads(ref, step)
        # The paper's reference: global norm, append, np.percentile, clip_grad_norm_.
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref]))
        history.append(norm)
        torch.nn.utils.clip_grad_norm_(ref, float(np.percentile(history, 10)))
        stats = clipper.clip_()
        assert stats.total_norm.item() == pytest.approx(norm, rel=1e-6)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=1e-7)
    # p = 10 over heavy-tailed norms clips most steps, as in the paper.
    assert bool(stats.clipped)


def test_window_per_step_state_does_not_grow() -> None:
    param = one_param()
    clipper = AutoClip([param], 10, window=16)
    drive(clipper, param, heavy_tailed("lognormal", 200))
    assert clipper.state[0]["ring"].shape == (16,)
    assert int(clipper.state[0]["count"]) == 200


def test_full_history_grows_by_doubling() -> None:
    param = one_param()
    clipper = AutoClip([param], 10, history="full")
    capacities = []
    for n in heavy_tailed("lognormal", 300):
        param.grad = torch.tensor([n], dtype=torch.float64)
        clipper.clip_()
        capacities.append(clipper.state[0]["sorted_history"].numel())
    assert sorted(set(capacities)) == [64, 128, 256, 512]
    history = clipper.state[0]["sorted_history"]
    assert torch.equal(history[:300], torch.sort(history[:300]).values)
    assert torch.isinf(history[300:]).all()


# -- the stream sketch -----------------------------------------------------------------------


norm_sequences = st.lists(
    st.one_of(st.floats(-30.0, 30.0).map(lambda e: 10.0**e), st.just(0.0)),
    min_size=1,
    max_size=80,
)


@pytest.mark.filterwarnings("ignore:AutoClip percentile=0")  # percentiles below 1 on purpose
@given(norms=norm_sequences, p=st.floats(0.5, 99.5), accuracy=st.sampled_from([0.01, 0.05]))
def test_stream_is_within_relative_accuracy_of_the_exact_percentile(
    norms: list[float], p: float, accuracy: float
) -> None:
    param = one_param()
    clipper = AutoClip([param], p, history="stream", relative_accuracy=accuracy)
    total, thresholds = drive(clipper, param, norms)
    exact = paper_thresholds(total, p)
    assert np.all(np.abs(thresholds - exact) <= accuracy * exact * (1 + 1e-9))


@pytest.mark.parametrize("kind", ["pareto", "spiky-decay"])
def test_stream_within_one_percent_on_heavy_tails(kind: str) -> None:
    param = one_param()
    total, thresholds = drive(
        AutoClip([param], 10, history="stream"), param, heavy_tailed(kind, 1000)
    )
    exact = paper_thresholds(total, 10)
    assert np.max(np.abs(thresholds - exact) / exact) <= 0.01 * (1 + 1e-9)


def test_stream_rank_on_a_long_stationary_lognormal() -> None:
    """5,000 steps: the threshold's rank among all norms so far is p ± 2 points."""
    param = one_param()
    norms = np.random.default_rng(3).lognormal(0.0, 1.0, 5000)
    total, thresholds = drive(AutoClip([param], 10, history="stream"), param, norms)
    for t in range(99, 5000, 100):
        history = np.sort(total[: t + 1])
        rank = np.searchsorted(history, thresholds[t], side="right") / (t + 1)
        assert abs(rank - 0.10) <= 0.02, (t, rank)


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_window_rank_in_the_full_history_on_a_long_stationary_lognormal(q: float) -> None:
    """The documented tolerance: 5,000 i.i.d. lognormal norms, window 1000. At every step
    the window threshold's rank among all norms so far is q ± 5·sqrt(q(1 − q)/window)."""
    window = 1000
    param = one_param()
    norms = np.random.default_rng(3).lognormal(0.0, 1.0, 5000)
    clipper = AutoClip([param], 100 * q, history="window", window=window)
    total, thresholds = drive(clipper, param, norms)
    tolerance = 5 * math.sqrt(q * (1 - q) / window)
    worst = 0.0
    for t in range(window - 1, len(norms)):
        history = np.sort(total[: t + 1])
        rank = np.searchsorted(history, thresholds[t], side="right") / (t + 1)
        worst = max(worst, abs(rank - q))
    assert worst <= tolerance, (worst, tolerance)
    # and it is the exact percentile of the last `window` norms, not an approximation
    np.testing.assert_allclose(thresholds[-1], np.percentile(total[-window:], 100 * q), rtol=1e-12)


def test_window_follows_a_drift_the_full_history_does_not() -> None:
    """No bound without stationarity, by design: after a steady 100x decay the window's
    10th percentile is far below the full history's."""
    param = one_param()
    rng = np.random.default_rng(4)
    norms = rng.lognormal(0.0, 0.5, 5000) * np.geomspace(1.0, 0.01, 5000)
    total, window = drive(AutoClip([param], 10, window=1000), param, norms)
    _, full = drive(AutoClip([param], 10, history="full"), param, norms)
    ranks = np.searchsorted(np.sort(total), [window[-1], full[-1]], side="right") / len(total)
    assert ranks[0] < 0.05  # the window: far outside 0.1 ± 0.047
    assert abs(ranks[1] - 0.1) <= 1 / len(total)  # the full history: the paper's rule


# -- autoclip 0.2.1 -------------------------------------------------------------------------


def test_include_current_false_reproduces_autoclip_quantileclip_global() -> None:
    """autoclip 0.2.1 QuantileClip(global_threshold=True): the threshold comes from the
    previous ``history_length`` norms (the current one excluded; the first step is
    not clipped). ``include_current=False`` with the same window gives the same
    gradients; eviction is exercised with a window shorter than the run."""
    quantile_clip = pytest.importorskip("autoclip.torch").QuantileClip
    ours, theirs = model_params(), model_params()
    clipper = AutoClip(ours, 25, window=40, include_current=False)
    package = quantile_clip(theirs, quantile=0.25, history_length=40, global_threshold=True)
    for step in range(120):
        set_grads(ours, step)
        set_grads(theirs, step)
        stats = clipper.clip_()
        package.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        if step == 0:
            assert math.isinf(stats.threshold.item())


def test_default_differs_from_autoclip_convention_as_documented() -> None:
    """The paper (gradclip's default) includes the current norm; autoclip 0.2.1 does
    not. Numpy applied to each convention reproduces each implementation, and the two
    conventions give different thresholds: on the first step (package: no clipping)
    and at every spike, which the paper's rule lets raise its own threshold (both at
    their default window of 1000, longer than this run)."""
    quantile_clip = pytest.importorskip("autoclip.torch").QuantileClip
    ours, theirs = model_params(), model_params()
    clipper = AutoClip(ours, 25)
    package = quantile_clip(theirs, quantile=0.25, global_threshold=True)
    norms, ours_t, theirs_grads = [], [], []
    for step in range(80):
        set_grads(ours, step)
        set_grads(theirs, step)
        stats = clipper.clip_()
        pre = torch.nn.utils.get_total_norm([p.grad for p in theirs])
        package.step()
        post = torch.nn.utils.get_total_norm([p.grad for p in theirs])
        norms.append(stats.total_norm.item())
        ours_t.append(stats.threshold.item())
        theirs_grads.append((pre.item(), post.item()))
    paper = paper_thresholds(norms, 25)
    package_rule = paper_thresholds(norms, 25, include_current=False)
    np.testing.assert_allclose(ours_t, paper, rtol=1e-6)
    for (pre, post), threshold in zip(theirs_grads, package_rule):
        assert post == pytest.approx(min(pre, threshold), rel=1e-5)
    assert math.isinf(package_rule[0]) and math.isfinite(paper[0])
    differs = ~np.isclose(paper, package_rule, rtol=1e-9)
    assert differs.mean() > 0.5
    spikes = [s for s in range(1, 80) if s % 11 == 5]
    assert all(paper[s] > package_rule[s] for s in spikes)


def test_a_nan_step_poisons_autoclip_package_but_not_autoclip_here() -> None:
    quantile_clip = pytest.importorskip("autoclip.torch").QuantileClip
    ours, theirs = model_params(), model_params()
    clipper = AutoClip(ours, 10, window=40, include_current=False)
    package = quantile_clip(theirs, quantile=0.1, history_length=40, global_threshold=True)
    for step in range(12):
        set_grads(ours, step)
        set_grads(theirs, step)
        if step == 5:
            ours[0].grad[0, 0] = math.nan
            theirs[0].grad[0, 0] = math.nan
        clipper.clip_()
        package.step()
    assert all(torch.isfinite(p.grad).all() for p in ours)
    assert not all(torch.isfinite(p.grad).all() for p in theirs)


# -- properties -------------------------------------------------------------------------------

positive_norms = st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=40)


@given(norms=positive_norms, p=st.floats(1.0, 99.0), mode=st.sampled_from(["full", "window"]))
def test_threshold_is_within_the_history_range_and_clip_respects_it(
    norms: list[float], p: float, mode: str
) -> None:
    param = one_param()
    clipper = AutoClip([param], p, history=mode, window=8)
    history: list[float] = []
    for n in norms:
        param.grad = torch.tensor([n], dtype=torch.float64)
        stats = clipper.clip_()
        history.append(n)
        kept = history[-8:] if mode == "window" else history
        threshold = stats.threshold.item()
        assert min(kept) * (1 - 1e-12) <= threshold <= max(kept) * (1 + 1e-12)
        assert stats.clipped_norm.item() <= min(n, threshold) * (1 + 1e-12)
        assert 0.0 < stats.scale.item() <= 1.0
        assert abs(param.grad.item()) == pytest.approx(stats.clipped_norm.item(), rel=1e-12)


@given(norms=positive_norms, p=st.floats(1.0, 99.0), shift=st.integers(-20, 20))
def test_thresholds_scale_with_the_norms(norms: list[float], p: float, shift: int) -> None:
    """Percentiles are equivariant: norms times 2^k give thresholds times 2^k, exactly."""
    factor = 2.0**shift
    results = []
    for scale in (1.0, factor):
        param = one_param()
        clipper = AutoClip([param], p, history="full")
        results.append(drive(clipper, param, [n * scale for n in norms])[1])
    np.testing.assert_array_equal(results[1], results[0] * factor)


@given(norms=positive_norms, ps=st.lists(st.floats(1.0, 99.0), min_size=2, max_size=2))
def test_thresholds_are_monotone_in_the_percentile(norms: list[float], ps: list[float]) -> None:
    low, high = sorted(ps)
    outs = []
    for p in (low, high):
        param = one_param()
        outs.append(drive(AutoClip([param], p, history="full"), param, norms)[1])
    assert np.all(outs[0] <= outs[1] * (1 + 1e-12))


@given(norms=positive_norms, seed=st.integers(0, 2**16))
def test_full_history_final_threshold_ignores_order(norms: list[float], seed: int) -> None:
    shuffled = list(np.random.default_rng(seed).permutation(norms))
    finals = []
    for seq in (norms, shuffled):
        param = one_param()
        finals.append(drive(AutoClip([param], 10, history="full"), param, seq)[1][-1])
    assert finals[0] == pytest.approx(finals[1], rel=1e-12)


@given(norms=positive_norms)
def test_a_window_longer_than_the_run_is_the_full_history(norms: list[float]) -> None:
    outs = []
    for mode in ("full", "window"):
        param = one_param()
        outs.append(drive(AutoClip([param], 10, history=mode, window=64), param, norms)[1])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("mode", MODES)
def test_percentile_100_never_touches_the_gradients(mode: str) -> None:
    params = model_params()
    clipper = AutoClip(params, 100, history=mode)
    for step in range(30):
        set_grads(params, step)
        before = [p.grad.clone() for p in params]
        stats = clipper.clip_()
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
        assert math.isinf(stats.threshold.item()) and not bool(stats.clipped)


@pytest.mark.parametrize("mode", MODES)
def test_first_step_clips_to_its_own_norm(mode: str) -> None:
    """A history of one norm: the threshold is that norm (torch's 1e-6 then scales by
    n / (n + 1e-6), as the paper's code does); without the current norm: no clipping."""
    param = one_param()
    param.grad = torch.tensor([3.0], dtype=torch.float64)
    stats = AutoClip([param], 10, history=mode).clip_()
    assert stats.threshold.item() == pytest.approx(3.0, rel=0.01 if mode == "stream" else 0)
    param.grad = torch.tensor([3.0], dtype=torch.float64)
    stats = AutoClip([param], 10, history=mode, include_current=False).clip_()
    assert math.isinf(stats.threshold.item()) and param.grad.item() == 3.0


def test_param_groups_keep_their_own_histories() -> None:
    a, b = one_param(), one_param()
    clipper = AutoClip(
        [{"params": [a], "percentile": 20.0}, {"params": [b], "history": "full"}],
        percentile=50,
        window=5,
    )
    rng = np.random.default_rng(4)
    na, nb = rng.lognormal(0, 1, 30), rng.lognormal(3, 1, 30)
    for x, y in zip(na, nb):
        a.grad = torch.tensor([x], dtype=torch.float64)
        b.grad = torch.tensor([y], dtype=torch.float64)
        clipper.clip_()
    ring = clipper.state[0]["ring"].numpy()
    assert sorted(ring) == pytest.approx(sorted(na[-5:]))
    for grad, n, threshold in [
        (a.grad, na[-1], np.percentile(na[-5:], 20)),
        (b.grad, nb[-1], np.percentile(nb, 50)),
    ]:
        assert abs(grad.item()) == pytest.approx(n * min(1.0, threshold / (n + 1e-6)), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_reset_forgets_the_history(mode: str) -> None:
    param = one_param()
    clipper = AutoClip([param], 10, history=mode)
    first = drive(clipper, param, [5.0, 1.0, 7.0])[1]
    clipper.reset()
    assert clipper.step == 0
    np.testing.assert_array_equal(drive(clipper, param, [5.0, 1.0, 7.0])[1], first)


def test_low_precision_gradients_keep_a_float32_history() -> None:
    params = [torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    clipper = AutoClip(params, 10, history="full")
    for step in range(5):
        params[0].grad = torch.full((4,), float(step + 1), dtype=torch.bfloat16)
        clipper.clip_()
    assert clipper.state[0]["sorted_history"].dtype == torch.float32
    assert clipper.state[0]["sorted_history"][:5].tolist() == [2.0, 4.0, 6.0, 8.0, 10.0]


# -- non-finite steps ----------------------------------------------------------------------------


def snapshot(clipper: AutoClip) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.items()} for s in clipper.state]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["ignore", "zero"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_steps_leave_the_state_untouched(mode: str, policy: str, bad: float) -> None:
    params = model_params()
    clean = model_params()
    clipper = AutoClip(params, 10, history=mode, window=8, nonfinite=policy)
    reference = AutoClip(clean, 10, history=mode, window=8, nonfinite=policy)
    for step in range(70):  # crosses the full history's growth from 64 to 128
        set_grads(params, step)
        if step % 6 == 3:
            params[1].grad[0] = bad
            before = snapshot(clipper)
            stats = clipper.clip_()
            after = snapshot(clipper)
            assert not bool(stats.finite)
            for s0, s1 in zip(before, after):
                assert s0.keys() == s1.keys()
                assert all(torch.equal(s0[k], s1[k]) for k in s0)
            if policy == "zero":
                assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in params)
            continue
        set_grads(clean, step)
        ours, theirs = clipper.clip_(), reference.clip_()
        assert torch.equal(ours.threshold, theirs.threshold)
        for a, b in zip(params, clean):
            assert torch.equal(a.grad, b.grad)


# -- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("include_current", [True, False])
def test_checkpoint_round_trip_is_bit_identical(mode: str, include_current: bool) -> None:
    def make(params: list[torch.nn.Parameter]) -> AutoClip:
        return AutoClip(params, 10, history=mode, window=16, include_current=include_current)

    straight, resumed = model_params(), model_params()
    uninterrupted = make(straight)
    first = make(resumed)
    for step in range(50):
        set_grads(straight, step)
        set_grads(resumed, step)
        uninterrupted.clip_()
        first.clip_()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    second = make(resumed)
    second.load_state_dict(loaded)
    assert second.step == 50
    for step in range(50, 90):  # the full history grows past 64 after the restore
        set_grads(straight, step)
        set_grads(resumed, step)
        a, b = uninterrupted.clip_(), second.clip_()
        assert torch.equal(a.threshold, b.threshold)
        for p, q in zip(straight, resumed):
            assert torch.equal(p.grad, q.grad)


def test_loading_a_checkpoint_of_another_configuration_names_it() -> None:
    params = model_params()
    for step in range(3):
        set_grads(params, step)
    window = AutoClip(params, 10, window=16)
    window.clip_()
    with pytest.raises(ValueError, match=r"history='window'.*history='full'"):
        AutoClip(params, 10, history="full").load_state_dict(window.state_dict())
    with pytest.raises(ValueError, match=r"window=16.*window=32"):
        AutoClip(params, 10, window=32).load_state_dict(window.state_dict())
    stream = AutoClip(params, 10, history="stream")
    with pytest.raises(ValueError, match=r"relative_accuracy=0\.01.*relative_accuracy=0\.05"):
        AutoClip(params, 10, history="stream", relative_accuracy=0.05).load_state_dict(
            stream.state_dict()
        )
    # Without the options the keys still tell the modes apart.
    bare = {"step": 1, "state": window.state_dict()["state"]}
    with pytest.raises(ValueError, match="keys"):
        AutoClip(params, 10, history="stream").load_state_dict(bare)


# -- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"percentile": 0}, ValueError, "percentile must be in (0, 100]"),
        ({"percentile": 0}, ValueError, "got 0"),
        ({"percentile": -5.0}, ValueError, "got -5.0"),
        ({"percentile": 100.5}, ValueError, "got 100.5"),
        ({"percentile": math.nan}, ValueError, "got nan"),
        ({"percentile": "10"}, TypeError, "got '10'"),
        ({"percentile": True}, TypeError, "got True"),
        ({"window": 0}, ValueError, "window must be an int >= 1; got 0"),
        ({"window": -3}, ValueError, "got -3"),
        ({"window": 2.5}, TypeError, "got 2.5"),
        ({"history": "ring"}, ValueError, "'full', 'window', 'stream'; got 'ring'"),
        ({"relative_accuracy": 0.0}, ValueError, "[1e-4, 0.5]; got 0.0"),
        ({"relative_accuracy": 0.9}, ValueError, "got 0.9"),
        ({"include_current": "yes"}, TypeError, "got 'yes'"),
    ],
)
def test_bad_options_raise_naming_the_value(
    options: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error) as info:
        AutoClip(model_params(), **options)  # type: ignore[arg-type]
    assert text in str(info.value)


def test_bad_options_in_a_param_group_raise() -> None:
    a, b = model_params()[:2]
    clipper = AutoClip([a], 10)
    with pytest.raises(ValueError, match="window must be an int >= 1; got 0"):
        clipper.add_param_group({"params": [b], "window": 0})


def test_spec_strings() -> None:
    clipper = from_spec("autoclip:p=25,history=full", model_params())
    assert isinstance(clipper, AutoClip)
    group = clipper.param_groups[0]
    assert (group["percentile"], group["history"]) == (25.0, "full")
    assert from_spec("autoclip:5", model_params()).param_groups[0]["percentile"] == 5.0
    default = from_spec("autoclip", model_params()).param_groups[0]
    assert (default["percentile"], default["history"], default["window"]) == (10.0, "window", 1000)
    with pytest.raises(ValueError, match="percentile must be in"):
        from_spec("autoclip:p=0.0", model_params())


# -- host sync ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("policy", ["ignore", "zero"])
def test_clip_is_sync_free(
    no_cpu_branch: None, mode: str, include_current: bool, policy: str
) -> None:
    params = model_params()
    clipper = AutoClip(
        params, 10, history=mode, window=8, include_current=include_current, nonfinite=policy
    )
    grads = []
    for step in range(70):  # crosses the full history's growth; NaN steps included
        set_grads(params, step)
        if step % 9 == 4:
            params[0].grad[0, 0] = math.nan
        grads.append([p.grad for p in params])
    with no_host_sync():
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            clipper.clip_()
    assert int(clipper.state[0]["count"]) == 70 - len(range(4, 70, 9))


@pytest.mark.parametrize("build", ["class", "spec", "group"])
def test_a_quantile_given_as_percentile_warns_at_the_callers_line(build: str) -> None:
    param = one_param()
    with pytest.warns(
        UserWarning,
        match=r"percentile=0\.9 .*QuantileClip\(quantile=0\.9\) "
        r"corresponds to percentile=90 \(did you mean percentile=90\?\)",
    ) as record:
        if build == "class":
            AutoClip([param], 0.9)
        elif build == "spec":
            from_spec("autoclip:p=0.9", [param])
        else:
            clipper = AutoClip([param], 10)
            clipper.add_param_group({"params": [one_param()], "percentile": 0.9})
    assert len(record) == 1 and record[0].filename == __file__


@pytest.mark.parametrize("percentile", [1, 1.0, 10, 90, 100])
def test_percentiles_of_one_and_above_do_not_warn(percentile: float) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoClip([one_param()], percentile)
