"""What a monitored run looked like: the host-side history behind ``summary()`` and reports.

A :class:`gradclip.monitor.GradMonitor` appends to a :class:`History` at every flush
(values already on the host); ``gradclip report`` builds one from a saved log. Only
the per-step scalars are kept (8 bytes per step for the norms), not the per-layer
columns.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gradclip.spikes import SpikeEvent

__all__ = ["PERCENTILES", "History", "Summary", "percentile"]

PERCENTILES = (0.0, 10.0, 50.0, 90.0, 99.0, 100.0)
"""The norm percentiles a :class:`Summary` reports (0 and 100 are the min and max)."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, interpolating linearly.

    The same definition as ``numpy.percentile``'s default (``method="linear"``).

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
        2.5
        >>> percentile([1.0, 2.0, 3.0, 4.0], 90)
        3.7
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100]; got {q}")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    frac = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac


@dataclass(frozen=True)
class Summary:
    """A run at a glance.

    Attributes:
        steps: steps recorded.
        clipped_steps: steps where the gradients were scaled down.
        clip_rate: ``clipped_steps / steps`` (0 for no steps).
        norm_percentiles: percentile (0-100) -> pre-clip total norm, over the finite
            norms; empty if there are none.
        spikes: the detected spikes, in step order.
        nonfinite_steps: steps with a non-finite gradient norm.
    """

    steps: int
    clipped_steps: int
    clip_rate: float
    norm_percentiles: dict[float, float]
    spikes: tuple[SpikeEvent, ...] = field(default=())
    nonfinite_steps: tuple[int, ...] = field(default=())

    def __str__(self) -> str:
        lines = [
            f"steps: {self.steps}",
            f"clipped: {self.clipped_steps} steps ({self.clip_rate:.1%})",
        ]
        if self.norm_percentiles:
            parts = ", ".join(
                f"{_label(q)} {v:.4g}" for q, v in sorted(self.norm_percentiles.items())
            )
            lines.append(f"total norm: {parts}")
        else:
            lines.append("total norm: no finite values")
        lines.append(f"non-finite steps: {_steps_text(self.nonfinite_steps)}")
        if self.spikes:
            lines.append(f"spikes: {len(self.spikes)}")
            lines += [
                f"  step {e.step}: {e.metric} = {e.value:.4g} (score {e.score:.1f})"
                for e in self.spikes[:20]
            ]
            if len(self.spikes) > 20:
                lines.append(f"  ... and {len(self.spikes) - 20} more")
        else:
            lines.append("spikes: none")
        return "\n".join(lines)


def _label(q: float) -> str:
    return {0.0: "min", 100.0: "max"}.get(q, f"p{q:g}")


def _steps_text(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[:20]))
    more = f" ... ({len(steps)} in all)" if len(steps) > 20 else ""
    return shown + more


class History:
    """Per-step scalars of a run, on the host, appended one block at a time.

    Example:
        >>> h = History()
        >>> h.extend([1, 2, 3], [1.0, 2.0, float("nan")], clipped=[0, 1, 0], nonfinite=[0, 0, 1])
        >>> s = h.summary()
        >>> s.steps, s.clipped_steps, s.nonfinite_steps, s.norm_percentiles[50.0]
        (3, 1, (3,), 1.5)
    """

    def __init__(self) -> None:
        self.steps = array("q")
        self.total_norm = array("d")
        self.clipped_steps = 0
        self.nonfinite_steps: list[int] = []
        self.spikes: list[SpikeEvent] = []

    def __len__(self) -> int:
        return len(self.steps)

    def extend(
        self,
        steps: Iterable[int],
        total_norm: Iterable[float],
        *,
        clipped: Iterable[float],
        nonfinite: Iterable[float],
        spikes: Iterable[SpikeEvent] = (),
    ) -> None:
        """Append a block of steps (all iterables aligned, one entry per step).

        A step counts as non-finite if its ``nonfinite`` count is > 0 or its total norm
        is not finite.
        """
        for step, norm, was_clipped, bad in zip(steps, total_norm, clipped, nonfinite):
            self.steps.append(int(step))
            self.total_norm.append(float(norm))
            if was_clipped and not math.isnan(was_clipped):
                self.clipped_steps += 1
            if (bad and not math.isnan(bad)) or not math.isfinite(norm):
                self.nonfinite_steps.append(int(step))
        self.spikes.extend(spikes)

    def finite_norms(self) -> list[float]:
        """The finite total norms, sorted."""
        return sorted(v for v in self.total_norm if math.isfinite(v))

    def summary(self) -> Summary:
        """Steps, clip rate, norm percentiles, spikes and non-finite steps so far."""
        norms = self.finite_norms()
        steps = len(self.steps)
        return Summary(
            steps=steps,
            clipped_steps=self.clipped_steps,
            clip_rate=self.clipped_steps / steps if steps else 0.0,
            norm_percentiles={q: percentile(norms, q) for q in PERCENTILES} if norms else {},
            spikes=tuple(sorted(self.spikes, key=lambda e: (e.step, e.metric))),
            nonfinite_steps=tuple(self.nonfinite_steps),
        )
