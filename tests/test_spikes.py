"""Spike detection: injected spikes found at known positions, few false positives on
stationary series, no spikes on a loss alternating between two levels, and the score
against a numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradclip.spikes import SpikeDetector, robust_score


def detect(values, **kwargs) -> tuple[list[float], list[int]]:
    detector = SpikeDetector("total_norm", **kwargs)
    scores, events = detector.update(range(len(values)), list(values))
    return scores, [e.step for e in events]


def reference_score(value: float, window: list[float], rel_floor: float, log: bool) -> float:
    """From the formula, with numpy: ``(x - median) / max(1.4826 MAD, 0.7413 IQR, floor)``.

    The quartiles are numpy's default (linear interpolation between order statistics).
    """
    w = np.asarray(window, dtype=np.float64)
    med = np.median(w)
    mad = np.median(np.abs(w - med))
    q1, q3 = np.percentile(w, [25.0, 75.0])
    floor = rel_floor if log else rel_floor * abs(med)
    return float((value - med) / max(1.4826 * mad, 0.7413 * (q3 - q1), floor, 1e-12))


def test_reference_on_hand_computed_windows() -> None:
    """The reference itself, on windows worked out by hand."""
    # median 3, MAD 1, quartiles 2 and 4: both scales are 1.4826
    assert reference_score(10.0, [1, 2, 3, 4, 5], 0.01, False) == pytest.approx(7 / 1.4826)
    # two levels, majority at 1: MAD 0, quartiles 1 and 2: the IQR's scale, 0.7413
    assert reference_score(2.0, [1, 2, 1, 2, 1], 0.01, False) == pytest.approx(1 / 0.7413)
    # one outlier among five: MAD 1 (scale 1.4826) beats IQR 1 (scale 0.7413)
    assert reference_score(3.0, [0, 1, 2, 3, 100], 0.01, False) == pytest.approx(1 / 1.4826)
    # constant: the floor, 1% of the median (raw scale) or 0.01 itself (log scale)
    assert reference_score(5.5, [5.0] * 7, 0.01, False) == pytest.approx(0.5 / 0.05)
    assert reference_score(0.5, [0.0] * 7, 0.01, True) == pytest.approx(50.0)


@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=3, max_size=60),
    st.floats(-1e7, 1e7, allow_nan=False),
    st.booleans(),
)
def test_score_matches_numpy_reference(window: list[float], value: float, log: bool) -> None:
    got = robust_score(value, window, 0.01, log)
    assert got == pytest.approx(reference_score(value, window, 0.01, log), rel=1e-9, abs=1e-9)


@given(st.lists(st.integers(-5, 5), min_size=1, max_size=80), st.integers(3, 12))
def test_rolling_window_with_ties_matches_reference(values: list[int], window: int) -> None:
    """The detector's sorted window (insert/evict) gives the reference score at every step."""
    xs = [float(v) for v in values]
    scores, _ = detect(xs, window=window, min_history=3)
    for t, score in enumerate(scores):
        past = xs[max(0, t - window) : t]
        if len(past) < 3:
            assert math.isnan(score)
        else:
            assert score == pytest.approx(reference_score(xs[t], past, 0.01, False), abs=1e-9)


def test_detector_scores_against_the_previous_window_only() -> None:
    gen = np.random.default_rng(0)
    values = gen.normal(10.0, 1.0, 300).tolist()
    scores, _ = detect(values, window=50, min_history=10)
    assert all(math.isnan(s) for s in scores[:10])
    for t in (10, 49, 50, 51, 299):
        window = values[max(0, t - 50) : t]
        assert scores[t] == pytest.approx(reference_score(values[t], window, 0.01, False))


@pytest.mark.parametrize("seed", range(3))
def test_injected_spikes_are_found_at_their_positions(seed: int) -> None:
    gen = np.random.default_rng(seed)
    n = 2000
    norms = np.exp(gen.normal(0.0, 0.25, n))  # log-normal, like gradient norms
    norms *= np.linspace(3.0, 1.0, n)  # with a slow drift, as in training
    positions = [150, 700, 701, 1333, 1990]  # two in a row, one near the end
    for p in positions:
        norms[p] *= 8.0
    _, found = detect(norms, log=True)
    assert found == positions


def test_injected_loss_spikes_on_a_decreasing_loss() -> None:
    gen = np.random.default_rng(4)
    steps = np.arange(3000)
    loss = 2.0 * np.exp(-steps / 800) + 0.1 + np.abs(gen.normal(0.0, 0.02, steps.size))
    positions = [400, 1500, 2800]
    for p in positions:
        loss[p] *= 3.0
    _, found = detect(loss, log="auto")
    assert found == positions


@pytest.mark.parametrize(
    ("name", "make", "log"),
    [
        ("gaussian", lambda g, n: g.normal(5.0, 1.0, n), False),
        ("log-normal", lambda g, n: np.exp(g.normal(0.0, 0.5, n)), True),
        ("student-t 5 dof", lambda g, n: 5.0 + g.standard_t(5, n), False),
    ],
)
def test_false_positive_rate_on_stationary_series_is_bounded(name, make, log) -> None:
    """On long stationary series the spike rate stays below 1e-4 per step (default threshold 6).

    For normal data a robust z of 6 is a ~1e-9 event (none are seen in 100k steps).
    Student-t with 5 degrees of freedom has heavy tails: 6 MAD-scaled deviations are
    6.5 units, and P(t5 > 6.5) ≈ 6.5e-4, so its bound is 1e-3 (about 7e-4 is observed).
    Log-normal norms are scored on the log scale, where they are normal (on the raw
    scale the same series gives ~4e-3 false spikes: why norms use ``log=True``).
    """
    n, spikes = 0, 0
    for seed in range(4):
        values = make(np.random.default_rng(100 + seed), 25_000)
        _, found = detect(values, log=log)
        n += values.size
        spikes += len(found)
    bound = 1e-3 if "student" in name else 1e-4
    assert spikes / n <= bound, f"{name}: {spikes} spikes in {n} steps"


def test_drops_are_not_spikes() -> None:
    values = [10.0 + 0.1 * math.sin(i) for i in range(100)] + [0.01] + [10.0] * 5
    _, found = detect(values, log=True)
    assert found == []
    scores, _ = detect(values)
    assert scores[100] < -6


def test_constant_series_does_not_turn_float_noise_into_spikes() -> None:
    values = [1.0] * 200 + [1.0 + 1e-7, 1.0, 1.02, 1.0, 1.5]
    _, found = detect(values)
    assert found == [204]  # +50% is a spike; +1e-7 and +2% are not (floor: 1% of median)


def test_nonfinite_and_nonpositive_values_are_skipped() -> None:
    detector = SpikeDetector("total_norm", window=5, min_history=3, log=True)
    scores, events = detector.update(range(8), [1.0, math.nan, 1.1, math.inf, 0.0, 0.9, 1.0, 100.0])
    assert [math.isnan(s) for s in scores] == [True] * 6 + [False, False]
    assert list(detector._history) == pytest.approx([0.0, math.log(1.1), math.log(0.9), 0.0,
                                                     math.log(100.0)])  # fmt: skip
    assert [e.step for e in events] == [7]


def test_auto_scale_switches_to_raw_values_at_the_first_nonpositive_value() -> None:
    detector = SpikeDetector("loss", window=50, min_history=5, log="auto")
    detector.update(range(5), [1.0, 2.0, 3.0, 2.0, 1.0])
    scores, _ = detector.update([5], [-1.0])
    assert not detector._log_scale
    assert list(detector._history)[:5] == pytest.approx([1.0, 2.0, 3.0, 2.0, 1.0])
    assert scores[0] == pytest.approx(reference_score(-1.0, [1.0, 2.0, 3.0, 2.0, 1.0], 0.01, False))
    detector.reset()
    assert detector._log_scale and not detector._history


def test_the_window_persists_across_updates() -> None:
    gen = np.random.default_rng(7)
    values = gen.normal(1.0, 0.1, 400).tolist()
    values[300] = 5.0
    all_at_once = detect(values, window=64)
    detector = SpikeDetector("total_norm", window=64)
    scores, found = [], []
    for start in range(0, 400, 37):  # flushes of uneven size
        s, e = detector.update(range(start, min(start + 37, 400)), values[start : start + 37])
        scores += s
        found += [x.step for x in e]
    assert found == all_at_once[1] == [300]
    np.testing.assert_array_equal(scores, all_at_once[0])


# --- a loss alternating between two levels (large-step SGD) ----------------------------


def two_levels(n: int, noise: float, seed: int = 0, period: int = 2) -> np.ndarray:
    """0.5 then 0.8 every ``period``-th step (0.5, 0.8, 0.5, ... for 2), times
    ``exp(noise * N(0, 1))``."""
    gen = np.random.default_rng(seed)
    high = np.arange(n) % period == period - 1
    return np.where(high, 0.8, 0.5) * np.exp(noise * gen.standard_normal(n))


@pytest.mark.parametrize("window", [5, 15, 16, 17, 100, 101])
@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_a_loss_alternating_between_two_levels_has_no_spikes(window: int, noise: float) -> None:
    """Odd windows put the median on the majority level (MAD 0, or the 1% noise);
    the IQR is the gap between the levels, so no value scores beyond about 1.35."""
    values = two_levels(300, noise)
    scores, found = detect(values, window=window, min_history=min(20, window), log="auto")
    assert found == []
    scored = np.array(scores[min(20, window) :])
    assert np.all(np.isfinite(scored))
    assert np.max(np.abs(scored)) < 1.5


@pytest.mark.parametrize("window", [15, 16])
def test_two_levels_taking_uneven_turns_have_no_spikes(window: int) -> None:
    """Two low steps, then a high one: an even window has its median on the low level
    too (with the MAD alone, the study's window of 16 flagged every third step). The
    high level holds a third of the window, more than a quarter: the IQR spans the gap.
    """
    values = two_levels(300, 0.01, period=3)
    scores, found = detect(values, window=window, min_history=window, log="auto")
    assert found == []
    assert np.nanmax(scores) < 1.5


def test_exact_scores_on_a_full_window_of_two_levels() -> None:
    """Noise-free, from the formula by hand: an odd window of 0.5 and 0.8 (in logs a and
    b) has its quartiles on the two levels and the median on the majority one, so a
    value of the other level scores ±(b - a) / (0.7413 (b - a)) = ±1/0.7413; an even,
    balanced window has the median halfway, MAD (b - a)/2 and IQR b - a: ±0.5/0.7413."""
    values = two_levels(60, 0.0)
    odd, _ = detect(values, window=15, min_history=15, log="auto")
    even, _ = detect(values, window=16, min_history=16, log="auto")
    for t in range(16, 60):
        sign = 1.0 if t % 2 else -1.0  # odd steps are at 0.8
        assert odd[t] == pytest.approx(sign / 0.7413, rel=1e-9)
        assert even[t] == pytest.approx(sign * 0.5 / 0.7413, rel=1e-9)


@pytest.mark.parametrize("window", [15, 16, 100])
def test_a_real_spike_on_an_alternating_loss_is_still_found(window: int) -> None:
    """A 20× jump on either level stands out against the gap between the levels."""
    values = two_levels(300, 0.01, seed=1)
    positions = [120, 171, 250]  # on the 0.5 level, the 0.8 level, 0.5 again
    for p in positions:
        values[p] *= 20.0
    _, found = detect(values, window=window, min_history=min(20, window), log="auto")
    assert found == positions


def test_a_burst_shorter_than_a_quarter_of_the_window_does_not_hide_the_next_spike() -> None:
    gen = np.random.default_rng(11)
    values = np.exp(gen.normal(0.0, 0.05, 200))
    burst = [60, 61, 62, 63, 64]  # the last one has 4 spikes (20%) in its window of 20
    later = [150]
    for p in burst + later:
        values[p] *= np.e**2
    _, found = detect(values, window=20, min_history=20, log=True)
    assert found == burst + later


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 2}, "spike window must be an int >= 3; got 2"),
        ({"window": 5.0}, "spike window must be an int >= 3; got 5.0"),
        ({"threshold": -1.0}, "spike threshold must be a finite number > 0; got -1.0"),
        ({"threshold": math.inf}, "spike threshold must be a finite number > 0; got inf"),
        ({"min_history": 2}, r"min_history must be in \[3, window=100\]; got 2"),
        ({"min_history": 101}, r"min_history must be in \[3, window=100\]; got 101"),
        ({"log": "yes"}, "log must be True, False or 'auto'; got 'yes'"),
        ({"threshold": True}, "spike threshold must be a finite number > 0; got True"),
        ({"rel_floor": 0}, "rel_floor must be a finite number > 0; got 0"),
        ({"rel_floor": math.inf}, "rel_floor must be a finite number > 0; got inf"),
        ({"rel_floor": math.nan}, "rel_floor must be a finite number > 0; got nan"),
        ({"rel_floor": True}, "rel_floor must be a finite number > 0; got True"),
    ],
)
def test_bad_options_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpikeDetector("x", **kwargs)
