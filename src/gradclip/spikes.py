"""Spike detection for gradient norms and losses: a robust z-score over a rolling window.

Each new value ``x_t`` is scored against the ``window`` finite values before it::

    score_t = (x_t - median(W_t)) / max(1.4826 * MAD(W_t), 0.7413 * IQR(W_t), floor)

where ``MAD`` is the median absolute deviation from the median and ``IQR`` the
interquartile range (quartiles interpolated linearly between order statistics, as
numpy's default). ``1.4826 * MAD`` and ``0.7413 * IQR`` (``IQR / 1.349``) each
estimate the standard deviation of normally distributed data, so the score reads like
a z-score; for a symmetric distribution the two estimate the same number (the MAD is
half the IQR), so on most windows the larger one differs from either only by sampling
noise. A value is a **spike** when its score exceeds ``threshold`` (upward only: a
sudden drop of the norm or the loss is not a problem to report).

**Why two scales.** The MAD is the half-width of the interval *centred on the median*
that holds half the window: a symmetric view of spread, which the quartiles, free to
lie at different distances from the median, do not take (Rousseeuw & Croux 1993).
A loss that alternates between two levels step by step (large-step SGD does this)
defeats it in any odd window: ``k + 1`` values at one level and ``k`` at
the other put the median on the majority level, more than half the deviations are
within that level, and the MAD shrinks to its noise (0 without noise), so every
other step scores as a huge spike. An even window only hides this while the levels
take turns exactly. The quartiles lie on different levels as long as each level holds
more than a quarter of the window, so the IQR is the gap between them and those
values score about ±1.35. (The usual fallback for a zero MAD, ``1.2533 * MeanAD`` as
in IBM's modified z-score, would not do: on a noisy loss the MAD is small, not 0, and
the mean deviation is inflated by a single outlier.)

The price is robustness to bursts: the median and the MAD ignore up to half the
window being outliers, the IQR up to a quarter (its breakdown point). A burst of
spikes filling more than a quarter of the window inflates the scale and can hide the
next one; a shorter one does not, unlike a mean and a variance (such as the EMA
statistics of ZClip, Kumar et al. 2025, arXiv 2504.02507, which also clip on a
z-score but adapt to a burst within a few steps).

Gradient norms are scored on a log scale (``log=True``): their fluctuations are
multiplicative, so a spike is a large *ratio* to the typical norm. Minibatch losses
are right-skewed too, but a loss may be zero or negative: ``log="auto"`` (the
monitor's choice for the loss) scores on a log scale until the first value <= 0,
then on the raw scale from then on (the window is converted back).

``floor`` keeps a (nearly) constant series from turning float noise into spikes: the
scale is at least ``rel_floor`` times ``|median|`` (or ``rel_floor`` itself on the log
scale, i.e. a relative change: with the default 0.01 and threshold 6, a flat series
reports a jump of more than ``exp(0.06) - 1``, about 6%).

Detection runs on the host, on values that a :class:`gradclip.monitor.GradMonitor`
has already moved there at its flush: it costs nothing on the training step.

References:
    Rousseeuw, P. J. & Croux, C. (1993). Alternatives to the median absolute
    deviation. *JASA* 88(424), 1273-1283 (the MAD's symmetric view of spread, and
    the breakdown points of the MAD and the IQR).
    Iglewicz, B. & Hoaglin, D. C. (1993). *How to Detect and Handle Outliers*, ASQC
    (the modified z-score with the median and the MAD).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SpikeDetector", "SpikeEvent", "robust_score"]

MAD_TO_STD = 1.4826
"""``1 / Φ⁻¹(3/4)``: turns a MAD into a standard-deviation estimate for normal data."""

IQR_TO_STD = MAD_TO_STD / 2
"""``1 / (2 Φ⁻¹(3/4))``, i.e. ``1 / 1.349``: turns an IQR into a standard-deviation
estimate for normal data (half :data:`MAD_TO_STD`, since the MAD of a symmetric
distribution is half its IQR)."""


@dataclass(frozen=True)
class SpikeEvent:
    """One detected spike.

    Attributes:
        step: the training step.
        metric: what spiked (``"total_norm"`` or ``"loss"``).
        value: the value at that step (as logged, not log-transformed).
        score: its robust z-score, above the detector's threshold.
    """

    step: int
    metric: str
    value: float
    score: float


def _median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    if n % 2:
        return sorted_values[mid]
    return 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def robust_score(value: float, window: Sequence[float], rel_floor: float, log: bool) -> float:
    """The robust z-score of ``value`` against ``window`` (both already on the detector's scale).

    ``(value - median) / max(1.4826 * MAD, 0.7413 * IQR, floor)``: see the module
    docstring.

    Example:
        >>> round(robust_score(10.0, [1.0, 2.0, 3.0, 4.0, 5.0], rel_floor=0.01, log=False), 3)
        4.721

        Two levels, the majority at 1: the MAD is 0, the IQR is the gap (1), so a 2 is
        ordinary (from the MAD and the floor alone it would score 1 / 0.01 = 100):

        >>> round(robust_score(2.0, [1.0, 2.0, 1.0, 2.0, 1.0], rel_floor=0.01, log=False), 3)
        1.349
    """
    return _score_sorted(value, sorted(window), rel_floor, log)


def _score_sorted(value: float, ordered: Sequence[float], rel_floor: float, log: bool) -> float:
    median = _median(ordered)
    floor = rel_floor if log else rel_floor * abs(median)
    spread = max(MAD_TO_STD * _mad_sorted(ordered, median), IQR_TO_STD * _iqr_sorted(ordered))
    return (value - median) / max(spread, floor, 1e-12)


def _quantile_sorted(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly (numpy's default)."""
    position = q * (len(ordered) - 1)
    below = int(position)
    fraction = position - below
    if fraction == 0.0:
        return ordered[below]
    return ordered[below] + fraction * (ordered[below + 1] - ordered[below])


def _iqr_sorted(ordered: Sequence[float]) -> float:
    return _quantile_sorted(ordered, 0.75) - _quantile_sorted(ordered, 0.25)


def _mad_sorted(ordered: Sequence[float], median: float) -> float:
    """The median of ``|x - median|`` over sorted values, without sorting the deviations.

    The deviations below and above the median are each already in increasing order
    (walking outwards from it), so merging the two walks up to the middle rank gives
    the median deviation in O(n) steps.
    """
    n = len(ordered)
    j = bisect.bisect_left(ordered, median)
    i = j - 1
    previous = current = 0.0
    for _ in range(n // 2 + 1):
        if j < n and (i < 0 or ordered[j] - median <= median - ordered[i]):
            deviation = ordered[j] - median
            j += 1
        else:
            deviation = median - ordered[i]
            i -= 1
        previous, current = current, deviation
    return current if n % 2 else 0.5 * (previous + current)


class SpikeDetector:
    """Scores a stream of values against a rolling window and reports spikes.

    Args:
        metric: the name written into the events (``"total_norm"``, ``"loss"``).
        window: how many previous finite values the median, MAD and IQR use (>= 3).
        threshold: a score above this is a spike (> 0). The default, 6, is about a
            one-in-a-billion event for normally distributed values.
        min_history: no score before this many finite values were seen (>= 3,
            <= ``window``).
        log: ``True``: score ``log(x)``, skipping values <= 0 like non-finite ones;
            ``False``: score ``x``; ``"auto"``: ``log(x)`` until the first value <= 0,
            then ``x``.
        rel_floor: the smallest scale, relative to ``|median|`` (or absolute on the log
            scale), so a constant series does not report float noise (> 0, finite).

    Raises:
        ValueError: an option out of its range, naming the value.

    Example:
        >>> detector = SpikeDetector("total_norm", window=20, min_history=5, log=True)
        >>> norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 50.0, 1.0]
        >>> scores, events = detector.update(range(1, 11), norms)
        >>> [(e.step, e.metric, e.value, round(e.score)) for e in events]
        [(9, 'total_norm', 50.0, 76)]
        >>> [math.isnan(s) for s in scores[:5]]  # warming up: no score yet
        [True, True, True, True, True]
    """

    def __init__(
        self,
        metric: str,
        *,
        window: int = 100,
        threshold: float = 6.0,
        min_history: int = 20,
        log: bool | str = False,
        rel_floor: float = 0.01,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise ValueError(f"spike window must be an int >= 3; got {window!r}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0 < threshold < math.inf
        ):
            raise ValueError(f"spike threshold must be a finite number > 0; got {threshold!r}")
        if isinstance(min_history, bool) or not isinstance(min_history, int):
            raise ValueError(f"min_history must be an int; got {min_history!r}")
        if not 3 <= min_history <= window:
            raise ValueError(f"min_history must be in [3, window={window}]; got {min_history}")
        if log not in (True, False, "auto"):
            raise ValueError(f"log must be True, False or 'auto'; got {log!r}")
        if (
            isinstance(rel_floor, bool)
            or not isinstance(rel_floor, int | float)
            or not 0 < rel_floor < math.inf
        ):
            raise ValueError(f"rel_floor must be a finite number > 0; got {rel_floor!r}")
        self.metric = metric
        self.window = window
        self.threshold = float(threshold)
        self.min_history = min_history
        self.log = log
        self.rel_floor = float(rel_floor)
        self._history: deque[float] = deque(maxlen=window)  # in arrival order
        self._sorted: list[float] = []  # the same values, sorted
        self._log_scale = log is not False

    def update(
        self, steps: Sequence[int] | range, values: Sequence[float]
    ) -> tuple[list[float], list[SpikeEvent]]:
        """Score ``values`` (one per step, in order) and add them to the window.

        Returns:
            The score of each value (NaN while warming up, and for non-finite values
            or, with ``log``, values <= 0, which are not added to the window), and
            the spikes among them.
        """
        scores: list[float] = []
        events: list[SpikeEvent] = []
        for step, value in zip(steps, values):
            if self.log == "auto" and self._log_scale and value <= 0:
                self._log_scale = False
                self._history = deque((math.exp(v) for v in self._history), maxlen=self.window)
                self._sorted = sorted(self._history)
            x = value
            if self._log_scale:
                x = math.log(value) if value > 0 else math.nan
            if not math.isfinite(x):
                scores.append(math.nan)
                continue
            score = math.nan
            if len(self._history) >= self.min_history:
                score = _score_sorted(x, self._sorted, self.rel_floor, self._log_scale)
                if score > self.threshold:
                    events.append(SpikeEvent(int(step), self.metric, float(value), score))
            scores.append(score)
            if len(self._history) == self.window:
                oldest = self._history[0]
                del self._sorted[bisect.bisect_left(self._sorted, oldest)]
            self._history.append(x)
            bisect.insort(self._sorted, x)
        return scores, events

    def reset(self) -> None:
        """Forget the window (and, for ``log="auto"``, go back to the log scale)."""
        self._history.clear()
        self._sorted.clear()
        self._log_scale = self.log is not False

    def __repr__(self) -> str:
        return (
            f"SpikeDetector({self.metric!r}, window={self.window}, threshold={self.threshold}, "
            f"min_history={self.min_history}, log={self.log!r}, rel_floor={self.rel_floor})"
        )
