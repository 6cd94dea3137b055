"""Candidate clipping thresholds from observed gradient norms, each with its rationale.

Three heuristics, applied to the pre-clip total norms of a run (ideally an
unclipped one, or one whose clipping rarely engaged):

* **AutoClip percentile** (Seetharaman, Wichern, Pardo, Le Roux 2020, "AutoClip:
  Adaptive Gradient Clipping for Source Separation Networks", arXiv 2007.14469).
  AutoClip clips each step to the p-th percentile of *all norms seen so far* and
  recommends p = 10. Here the percentile is of the whole observed run, a fixed
  threshold: a deliberate simplification, since a suggestion must be one number.
  p = 10 clips about 90% of the steps, as AutoClip does once its history is long.
* **Multiple of the average norm** (Pascanu, Mikolov, Bengio 2013, "On the
  difficulty of training recurrent neural networks", arXiv 1211.5063, section 3.2):
  "One good heuristic for setting this threshold is to look at statistics on the
  average norm over a sufficiently large number of updates"; they report that
  training is not very sensitive to the threshold and works well even for rather
  small ones. The paper gives no fixed multiple; the default here is 1 (the mean
  itself), other multiples on request.
* **Clip a chosen fraction of steps**: the ``(1 - f)`` quantile, which clips the
  fraction ``f`` of the observed steps with the largest norms (the outliers only,
  for a small ``f``).

Percentiles interpolate linearly, like ``numpy.percentile``. Non-finite norms are
left out (and counted in the rationale).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor

from gradclip.history import percentile

__all__ = ["ThresholdCandidate", "suggest_threshold"]


@dataclass(frozen=True)
class ThresholdCandidate:
    """One suggested threshold.

    Attributes:
        method: ``"autoclip"``, ``"pascanu"`` or ``"clip_fraction"``.
        parameter: the method's parameter: the percentile (0-100), the multiple of
            the mean, or the fraction of steps to clip.
        threshold: the suggested ``max_norm``.
        clip_fraction: the fraction of the observed (finite) steps whose norm is above
            ``threshold``, i.e. that it would have clipped.
        rationale: one sentence on where the number comes from.

    Example:
        :func:`suggest_threshold` returns them; ``str()`` is the line
        ``gradclip suggest`` prints:

        >>> (candidate,) = suggest_threshold([1.0, 2.0, 3.0, 4.0, 100.0], mean_multiples=(),
        ...                                  clip_fractions=(), percentiles=(50,))
        >>> candidate.method, candidate.parameter, candidate.threshold, candidate.clip_fraction
        ('autoclip', 50.0, 3.0, 0.4)
        >>> print(candidate)  # doctest: +ELLIPSIS
        3          autoclip (50): clips 40.0% of steps. The 50th percentile of the 5 ...
    """

    method: str
    parameter: float
    threshold: float
    clip_fraction: float
    rationale: str

    def __str__(self) -> str:
        return (
            f"{self.threshold:<10.4g} {self.method} ({self.parameter:g}): clips "
            f"{self.clip_fraction:.1%} of steps. {self.rationale}"
        )


def suggest_threshold(
    norms: Iterable[float] | Tensor,
    *,
    percentiles: Sequence[float] = (10.0,),
    mean_multiples: Sequence[float] = (1.0,),
    clip_fractions: Sequence[float] = (0.05,),
) -> list[ThresholdCandidate]:
    """Candidate clipping thresholds for gradients whose total norms were ``norms``.

    Args:
        norms: observed pre-clip total norms: real numbers (Python or NumPy) or
            one-element tensors, or a tensor of them (one host transfer for a device
            tensor). NaN and infinite values are ignored.
        percentiles: AutoClip percentiles, each in (0, 100].
        mean_multiples: multiples of the mean norm (Pascanu et al.), each > 0.
        clip_fractions: fractions of steps to clip, each in (0, 1).

    Returns:
        One :class:`ThresholdCandidate` per requested value, in the order: AutoClip
        percentiles, mean multiples, clip fractions.

    Raises:
        TypeError: ``norms`` is a string or not iterable, or one of them is not a
            number (named, with its index).
        ValueError: no finite norm, or a parameter out of its range (named).

    References:
        Seetharaman et al. AutoClip. arXiv 2007.14469.
        Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural
        networks. arXiv 1211.5063.

    Example:
        >>> norms = [float(n) for n in range(1, 101)]  # 1, 2, ..., 100
        >>> for c in suggest_threshold(norms):
        ...     print(c.method, c.parameter, round(c.threshold, 2), c.clip_fraction)
        autoclip 10.0 10.9 0.9
        pascanu 1.0 50.5 0.5
        clip_fraction 0.05 95.05 0.05
    """
    values = _host_values(norms)
    finite = sorted(v for v in values if math.isfinite(v))
    dropped = len(values) - len(finite)
    if not finite:
        raise ValueError(
            f"no finite gradient norms to suggest a threshold from ({len(values)} values given)"
        )
    for q in percentiles:
        if not 0 < q <= 100:
            raise ValueError(f"percentiles must be in (0, 100]; got {q}")
    for m in mean_multiples:
        if not (m > 0 and math.isfinite(m)):
            raise ValueError(f"mean_multiples must be finite numbers > 0; got {m}")
    for f in clip_fractions:
        if not 0 < f < 1:
            raise ValueError(f"clip_fractions must be in (0, 1); got {f}")
    n = len(finite)
    note = f" ({dropped} non-finite norms left out)" if dropped else ""

    def above(threshold: float) -> float:
        return sum(1 for v in finite if v > threshold) / n

    out: list[ThresholdCandidate] = []
    for q in percentiles:
        t = percentile(finite, q)
        out.append(
            ThresholdCandidate(
                "autoclip",
                float(q),
                t,
                above(t),
                f"The {q:g}th percentile of the {n} observed norms{note}; AutoClip "
                "(arXiv 2007.14469) clips to this percentile of the norms seen so far "
                "and recommends p = 10.",
            )
        )
    mean = math.fsum(finite) / n
    for m in mean_multiples:
        t = m * mean
        out.append(
            ThresholdCandidate(
                "pascanu",
                float(m),
                t,
                above(t),
                f"{m:g} x the average norm ({mean:.4g}) over {n} updates{note}; Pascanu et al. "
                "(arXiv 1211.5063) set the threshold from statistics of the average norm.",
            )
        )
    for f in clip_fractions:
        t = percentile(finite, 100.0 * (1.0 - f))
        out.append(
            ThresholdCandidate(
                "clip_fraction",
                float(f),
                t,
                above(t),
                f"Clips the {f:.1%} of the {n} observed steps with the largest norms{note}.",
            )
        )
    return out


def _host_values(norms: object) -> list[float]:
    """``norms`` as Python floats, or a TypeError that names what is wrong."""
    if isinstance(norms, Tensor):
        return norms.detach().double().cpu().reshape(-1).tolist()  # type: ignore[no-any-return]
    if isinstance(norms, str | bytes) or not isinstance(norms, Iterable):
        raise TypeError(
            "norms must be a sequence of numbers or a tensor (e.g. a log's total_norm "
            f"column); got {type(norms).__name__} {norms!r:.60}"
        )
    values: list[float] = []
    for i, v in enumerate(norms):
        one_element = isinstance(v, Tensor) and v.numel() == 1
        if one_element or (isinstance(v, numbers.Real) and not isinstance(v, bool)):
            values.append(float(v))
        else:
            raise TypeError(f"norms must be numbers; norms[{i}] is {type(v).__name__} {v!r:.60}")
    return values
