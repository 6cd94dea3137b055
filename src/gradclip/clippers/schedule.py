"""Threshold schedules: the threshold of a norm-based strategy as a function of the step.

A schedule takes the threshold a strategy computed for this step and returns the
one to clip to. Every norm-based strategy accepts one through its ``schedule`` option
(per parameter group; :class:`~gradclip.clippers.base.ScheduledClipper`):
:class:`~gradclip.NormClip`, :class:`~gradclip.AutoClip`, :class:`~gradclip.ZClip`,
:class:`~gradclip.EMARatio` and :class:`~gradclip.AdaGC` (the per-tensor ones scale
every tensor's threshold by the same factor)::

    clipper = NormClip(model.parameters(), max_norm=1.0, schedule=Cosine(1000, 0.1))

A schedule scales only the threshold applied: the adaptive strategies' statistics
(AutoClip's history, ZClip's μ and σ, EMARatio's average, AdaGC's γ) are updated as
without it, so a schedule never feeds back into the threshold it scales.

Four schedules:

* :class:`Constant`: the threshold times a fixed factor (1 by default).
* :class:`LinearWarmup`: from ``start_factor`` times the threshold to the threshold,
  linearly over ``warmup_steps`` (as ``torch.optim.lr_scheduler.LinearLR`` does for
  learning rates).
* :class:`Cosine`: from the threshold to ``final_factor`` times it along a half
  cosine over ``total_steps`` (the shape of SGDR's annealing, Loshchilov & Hutter
  2016, arXiv:1608.03983, without restarts), then constant.
* :class:`RelaxOnCalm`: "relax as training stabilizes": the threshold's multiplier
  grows while the recent gradient norms stay calm and drops back on a spike.

The step a schedule sees is the 0-based index of the current ``clip_()`` call (the
number of earlier calls), a host integer: the step-based schedules cost no device
work beyond one multiply and never read a tensor. :class:`RelaxOnCalm` keeps its
statistics in tensors on the gradients' device and updates them branch-free, so it
is free of host syncs too; a non-finite norm leaves its state untouched.

There is no paper for threshold schedules as such: the literature tunes one fixed
threshold (Pascanu et al. 2013, arXiv:1211.5063) or adapts it from norm statistics
(AutoClip, arXiv:2007.14469; ZClip, arXiv:2504.02507). These schedules are simple
deterministic shapes borrowed from learning-rate scheduling, and the relax-on-calm
rule is this library's own heuristic (documented in :class:`RelaxOnCalm`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Constant", "Cosine", "LinearWarmup", "RelaxOnCalm", "Schedule", "check_schedule"]


class Schedule:
    """Base class of threshold schedules.

    Subclasses either implement :meth:`factor` (a multiplier of the host step, for
    stateless schedules) or override :meth:`__call__` and the state methods.
    """

    def __call__(self, step: int, threshold: Tensor, total_norm: Tensor) -> Tensor:
        """The threshold to clip to at ``step``.

        Args:
            step: the 0-based index of the current ``clip_()`` call (a host int).
            threshold: the strategy's threshold for this step: a 0-d tensor, or 1-D
                with one bound per tensor for per-tensor strategies (EMARatio with
                ``per_tensor=True``, AdaGC after its warm-up), all scaled alike.
            total_norm: the group's pre-clip norm (0-d; per-tensor strategies
                compare each tensor's norm with its own bound);
                read only by schedules that adapt to the norms, never on the host.

        Returns:
            The scheduled threshold, a tensor shaped like ``threshold``
            (``threshold`` itself when the factor is exactly 1).
        """
        factor = self.factor(_check_step(step))
        return threshold if factor == 1.0 else threshold * factor

    def follows_step(self, step: int) -> bool:
        """Whether the threshold may still depend on the step count from ``step`` on.

        ``step`` is the 0-based index of the next ``clip_()`` call. True by default
        (a schedule of your own is assumed to follow the step); a schedule that ends,
        or never depends on the step, says so. :func:`gradclip.attach` reads it to
        keep a skipped step from shifting the schedule.
        """
        return True

    def factor(self, step: int) -> float:
        """The multiplier at ``step`` (stateless schedules only)."""
        raise NotImplementedError(f"{type(self).__name__} must implement factor() or __call__()")

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state: tensors and numbers only (empty for stateless schedules)."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: the keys do not match this schedule's.
        """
        _check_keys(self, state_dict)

    def reset(self) -> None:
        """Forget all history (nothing to forget for stateless schedules)."""

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


class Constant(Schedule):
    """The strategy's threshold times a fixed ``factor`` at every step.

    Args:
        factor: the multiplier, a finite number > 0 (1: the threshold unchanged).

    Raises:
        ValueError, TypeError: ``factor`` is not a finite number > 0.

    Example:
        >>> Constant(0.5)(7, torch.tensor(2.0), torch.tensor(9.0))
        tensor(1.)
    """

    def __init__(self, factor: float = 1.0) -> None:
        self.factor_value = _positive(factor, "Constant factor")

    def factor(self, step: int) -> float:
        """``factor`` at every step."""
        return self.factor_value

    def follows_step(self, step: int) -> bool:
        """Never: the same factor at every step."""
        return False

    def __repr__(self) -> str:
        return f"Constant({self.factor_value!r})"


class LinearWarmup(Schedule):
    """Grow the threshold linearly from ``start_factor`` times it to itself.

    ``factor(t) = start_factor + (1 − start_factor) · min(t, warmup_steps) / warmup_steps``:
    ``start_factor`` at step 0, 1 from step ``warmup_steps`` on. A ``start_factor``
    below 1 clips hard while the first, often large, gradients arrive and relaxes
    to the strategy's threshold; above 1 it starts loose and tightens.

    Args:
        warmup_steps: the number of steps to reach the full threshold, an int ≥ 1.
        start_factor: the multiplier at step 0, a finite number > 0 (default 0.1,
            our choice; no paper prescribes one).

    Raises:
        ValueError, TypeError: an argument out of range, naming its value.

    Example:
        >>> s = LinearWarmup(warmup_steps=4, start_factor=0.2)
        >>> [round(s.factor(t), 2) for t in range(6)]
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    """

    def __init__(self, warmup_steps: int, start_factor: float = 0.1) -> None:
        self.warmup_steps = _positive_int(warmup_steps, "LinearWarmup warmup_steps")
        self.start_factor = _positive(start_factor, "LinearWarmup start_factor")

    def factor(self, step: int) -> float:
        """The warm-up multiplier at ``step``."""
        progress = min(step, self.warmup_steps) / self.warmup_steps
        return self.start_factor + (1.0 - self.start_factor) * progress

    def follows_step(self, step: int) -> bool:
        """Until ``warmup_steps``; the full threshold from then on."""
        return step < self.warmup_steps


class Cosine(Schedule):
    """Move the threshold from itself to ``final_factor`` times it along a half cosine.

    ``factor(t) = f + (1 − f) · (1 + cos(π · min(t, T) / T)) / 2`` with
    ``f = final_factor`` and ``T = total_steps``: 1 at step 0, ``f`` from step ``T``
    on. ``final_factor`` < 1 tightens clipping as training goes on; > 1 relaxes it.

    Args:
        total_steps: the length of the cosine, an int ≥ 1.
        final_factor: the multiplier from ``total_steps`` on, a finite number > 0
            (0 would zero every gradient). Default 0.1, our choice.

    Raises:
        ValueError, TypeError: an argument out of range, naming its value.

    References:
        Loshchilov, Hutter. SGDR: Stochastic Gradient Descent with Warm Restarts.
        ICLR 2017, arXiv:1608.03983 (the cosine shape, used here without restarts).

    Example:
        >>> s = Cosine(total_steps=4, final_factor=0.2)
        >>> [round(s.factor(t), 3) for t in (0, 2, 4, 10)]
        [1.0, 0.6, 0.2, 0.2]
    """

    def __init__(self, total_steps: int, final_factor: float = 0.1) -> None:
        self.total_steps = _positive_int(total_steps, "Cosine total_steps")
        self.final_factor = _positive(final_factor, "Cosine final_factor")

    def factor(self, step: int) -> float:
        """The cosine multiplier at ``step``."""
        progress = min(step, self.total_steps) / self.total_steps
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def follows_step(self, step: int) -> bool:
        """Until ``total_steps``; ``final_factor`` from then on."""
        return step < self.total_steps


class RelaxOnCalm(Schedule):
    """Raise the threshold gradually while training is calm; drop back on a spike.

    The rule, evaluated at each step with the current pre-clip norm ``g`` and the
    last ``window`` finite norms before this step (mean ``μ``, population standard
    deviation ``σ``; the window must be full for either test to fire)::

        spike = g > spike_ratio · μ
        calm  = σ / μ < max_cv  and not spike
        f ← min(f, spike_factor)        on a spike (1: back to the base threshold;
                                        < 1: tighter than it until calm returns)
        f ← min(f · growth, max_factor) when calm
        threshold_t = f · threshold     (f after this step's update, so a spike is
                                        met by the tightened threshold at once)

    ``f`` starts at 1. ``g`` then enters the window, spikes included, so a spike also
    keeps ``σ/μ`` high, and growth paused, until it leaves the window. A non-finite
    ``g`` changes nothing (neither ``f`` nor the window). Everything lives in tensors
    on ``g``'s device (the window is a ring buffer) and is updated with masked
    arithmetic: no host sync.

    This is a heuristic of this library, not a published method: it answers "clip
    hard early, relax once the norms settle" without the user picking a step count.
    The defaults are our choices: with ``growth=1.002`` the factor doubles after
    about 350 calm steps.

    Args:
        window: how many recent finite norms form the statistics, an int ≥ 2.
        max_cv: the coefficient of variation ``σ/μ`` below which the norms count
            as calm, > 0.
        growth: the factor's multiplier per calm step, > 1.
        max_factor: the factor's ceiling, ≥ 1.
        spike_ratio: a norm above ``spike_ratio · μ`` is a spike, > 1.
        spike_factor: the factor's ceiling after a spike, in (0, 1].

    Raises:
        ValueError, TypeError: an argument out of range, naming its value.

    Example:
        >>> s = RelaxOnCalm(window=3, growth=2.0, max_factor=8.0)
        >>> [s(t, torch.tensor(1.0), torch.tensor(1.0)).item() for t in range(6)]
        [1.0, 1.0, 1.0, 2.0, 4.0, 8.0]
        >>> s(6, torch.tensor(1.0), torch.tensor(5.0)).item()  # a spike: back to 1
        1.0
    """

    def __init__(
        self,
        window: int = 50,
        max_cv: float = 0.2,
        growth: float = 1.002,
        max_factor: float = 2.0,
        spike_ratio: float = 2.0,
        spike_factor: float = 1.0,
    ) -> None:
        self.window = _positive_int(window, "RelaxOnCalm window", minimum=2)
        self.max_cv = _positive(max_cv, "RelaxOnCalm max_cv")
        self.growth = _positive(growth, "RelaxOnCalm growth", above=1.0)
        self.max_factor = _positive(max_factor, "RelaxOnCalm max_factor", at_least=1.0)
        self.spike_ratio = _positive(spike_ratio, "RelaxOnCalm spike_ratio", above=1.0)
        self.spike_factor = _positive(spike_factor, "RelaxOnCalm spike_factor")
        if self.spike_factor > 1.0:
            raise ValueError(f"RelaxOnCalm spike_factor must be in (0, 1]; got {self.spike_factor}")
        self.reset()

    def reset(self) -> None:
        """Back to factor 1 and an empty window."""
        self._history = torch.zeros(self.window)  # (window,) recent finite norms, a ring
        self._count = torch.zeros((), dtype=torch.int64)  # finite norms seen so far
        self._factor = torch.ones(())  # the current multiplier f

    def follows_step(self, step: int) -> bool:
        """Never: the factor follows the norms, not the step count."""
        return False

    @property
    def current_factor(self) -> Tensor:
        """The multiplier ``f`` applied at the last step (a 0-d tensor; 1 before any)."""
        return self._factor

    def __call__(self, step: int, threshold: Tensor, total_norm: Tensor) -> Tensor:
        """Update the statistics with ``total_norm`` and return ``f · threshold``."""
        _check_step(step)
        like = total_norm
        history = self._history.to(device=like.device, dtype=like.dtype)
        count = self._count.to(like.device)
        factor = self._factor.to(device=like.device, dtype=like.dtype)
        g = total_norm.to(like.dtype)

        finite = torch.isfinite(g)
        full = count >= self.window
        mean = history.mean()
        cv = torch.where(mean > 0, history.std(correction=0) / mean, math.inf)
        spike = full & (g > self.spike_ratio * mean)
        calm = full & (cv < self.max_cv) & ~spike
        new = torch.where(
            spike,
            factor.clamp(max=self.spike_factor),
            torch.where(calm, (factor * self.growth).clamp(max=self.max_factor), factor),
        )
        self._factor = torch.where(finite, new, factor)
        slot = torch.arange(self.window, device=like.device) == count % self.window
        self._history = torch.where(finite & slot, g, history)
        self._count = count + finite.to(count.dtype)
        return threshold * self._factor.to(threshold.dtype)

    def state_dict(self) -> dict[str, Any]:
        """``history`` (the ring), ``count`` and ``factor``, as tensor copies."""
        return {
            "history": self._history.detach().clone(),
            "count": self._count.detach().clone(),
            "factor": self._factor.detach().clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: wrong keys, or a window of another length.
        """
        _check_keys(self, state_dict)
        history = state_dict["history"]
        if not isinstance(history, Tensor) or tuple(history.shape) != (self.window,):
            shape = tuple(history.shape) if isinstance(history, Tensor) else type(history)
            raise ValueError(
                f"RelaxOnCalm state has a history of shape {shape}; this schedule's "
                f"window is {self.window}"
            )
        self._history = history.detach().clone()
        self._count = torch.as_tensor(state_dict["count"]).detach().clone().to(torch.int64)
        self._factor = torch.as_tensor(state_dict["factor"]).detach().clone()


SCHEDULE_SPECS = (
    "constant[:FACTOR]",
    "warmup:STEPS[:START_FACTOR]",
    "cosine:STEPS[:FINAL_FACTOR]",
    "relax[:WINDOW]",
)
"""The forms of :func:`parse_schedule` strings (as in ``"norm:1.0,schedule=cosine:1000"``)."""


def parse_schedule(text: str) -> Schedule:
    """A schedule from a short string, for strategy specs and the command line.

    >>> parse_schedule("cosine:1000:0.05")
    Cosine(total_steps=1000, final_factor=0.05)
    >>> parse_schedule("warmup:100")
    LinearWarmup(warmup_steps=100, start_factor=0.1)

    Raises:
        ValueError: an unknown name or malformed arguments; lists the valid forms.
    """
    name, *args = text.strip().lower().split(":")
    makers: dict[str, tuple[type[Schedule], tuple[type, ...]]] = {
        "constant": (Constant, (float,)),
        "warmup": (LinearWarmup, (int, float)),
        "cosine": (Cosine, (int, float)),
        "relax": (RelaxOnCalm, (int,)),
    }
    valid = ", ".join(SCHEDULE_SPECS)
    if name not in makers:
        raise ValueError(f"unknown schedule {text!r}; valid: {valid}")
    cls, kinds = makers[name]
    required = 1 if name in ("warmup", "cosine") else 0
    if not required <= len(args) <= len(kinds):
        raise ValueError(f"schedule {text!r} has the wrong number of arguments; valid: {valid}")
    try:
        values = [kind(arg) for kind, arg in zip(kinds, args)]
    except ValueError:
        raise ValueError(f"schedule {text!r} has a malformed number; valid: {valid}") from None
    return cls(*values)


def check_schedule(value: object) -> Schedule | None:
    """Validate a ``schedule`` option: a :class:`Schedule`, a spec string, or None.

    Raises:
        TypeError: anything else.
        ValueError: a malformed schedule string (see :func:`parse_schedule`).
    """
    if isinstance(value, str):
        return parse_schedule(value)
    if value is None or isinstance(value, Schedule):
        return value
    raise TypeError(
        f"schedule must be a gradclip Schedule (Constant, LinearWarmup, Cosine, "
        f"RelaxOnCalm), a string such as 'cosine:1000', or None; got {value!r}"
    )


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a schedule's step must be an int >= 0; got {step!r}")
    return step


def _check_keys(schedule: Schedule, state_dict: Mapping[str, Any]) -> None:
    expected = set(schedule.state_dict())
    if set(state_dict) != expected:
        raise ValueError(
            f"{type(schedule).__name__} state has keys {sorted(state_dict)}; "
            f"expected {sorted(expected)}"
        )


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {number}")
    return number


def _positive(
    value: object, name: str, *, above: float = 0.0, at_least: float | None = None
) -> float:
    number = _number(value, name)
    if at_least is not None:
        if number < at_least:
            raise ValueError(f"{name} must be >= {at_least}; got {number}")
    elif number <= above:
        raise ValueError(f"{name} must be > {above}; got {number}")
    return number


def _positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return value
