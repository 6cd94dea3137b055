"""``AutoClip``: clip to a percentile of the gradient-norm history (Seetharaman et al., 2020).

Each step appends the current global norm ``n_t`` to the history, takes the
threshold ``η_t`` as the ``p``-th percentile of the history *including* ``n_t``, and
clips to it (``p = 10`` is the paper's recommendation).

Where this follows the paper (and its reference code, which keeps a Python list and
calls ``numpy.percentile``):

* the percentile is numpy's default ``"linear"`` interpolation (Hyndman & Fan's
  method 7), the current norm is part of the history before the percentile is
  taken, and the clip is torch's ``min(1, η / (n + 1e-6))``;
* ``history="full"`` keeps every norm and reproduces the reference's thresholds
  (to floating-point rounding of the interpolation).

Where it deliberately differs, and why:

* **Bounded cost.** The reference recomputes a percentile over the whole history:
  O(t) per step and O(T²) per run, with a host round trip per step. Here all state
  lives on the gradients' device and nothing is read on the host. The full history
  is kept sorted (a binary search and one shift per step: O(t) memory traffic, no
  sort); ``history="window"`` (the default) keeps the last ``window`` norms in a ring
  buffer and costs O(window · log window) per step whatever the step count;
  ``history="stream"`` approximates the full-history percentile with state of a
  fixed size: a log-bucketed sketch of all norms seen (as in DDSketch, Masson et al.,
  2019), which puts the threshold within a relative ``relative_accuracy`` (1 %) of
  the exact full-history percentile for any norm sequence in float32's normal range,
  at a fixed cost per step (a bucket increment, a cumulative sum over ~9k buckets, a
  binary search). A P² marker tracker was tried first: with five markers its state
  is smaller, but its update is ~130 scalar operations (kernel launches on a GPU) and
  it has no error bound. The window is the default
  because long runs should not pay a cost that grows with the step count, and
  because a percentile of recent norms follows the drift of the gradient scale that
  training produces; for the first ``window`` steps it equals the paper's rule.
* **How far the window is from the full history.** The window's threshold is a
  percentile of the last ``window`` norms only, so it equals the paper's (full
  history) threshold only for the first ``window`` steps. For a *stationary* run
  (norms drawn independently from one continuous distribution) the gap is bounded
  in rank: the threshold is an order statistic of ``window`` such draws, whose rank
  ``F(η)`` in their distribution has standard deviation ``s = sqrt(q (1 − q) /
  window)`` whatever the distribution (it is Beta-distributed), and its rank among
  all norms so far differs from ``q = percentile / 100`` by at most ``5 s`` at any
  step but with probability of order 1e-6 (0.047 for ``q = 0.1`` and the default
  window of 1000: the 10th percentile of the window lies between the 5th and 15th
  of the full history; over 40 simulated 5,000-step runs the largest gap seen was
  3.1 ``s``). For a *non-stationary* run there is no bound, by design: when the
  gradient scale drifts, the window follows the recent norms and the full-history
  percentile does not (after a steady 100× decay over 5,000 steps, the window's
  10th percentile is the 2nd of the full history). Use ``"full"`` or ``"stream"`` to get the paper's
  rule whatever the sequence.
* **Non-finite norms are never recorded**: the reference appends them and
  ``numpy.percentile`` then returns NaN on every later step. Here a NaN/inf step
  leaves the state bit-identical (the step is still scaled by the non-finite norm
  under ``nonfinite="ignore"``, as torch does).
* **Norms of large CPU gradients from the blocked kernel** (``norm_kernel="blocked"``,
  see :mod:`gradclip.norms`): far more accurate than torch's CPU kernel, which the
  reference uses, on large tensors; ``norm_kernel="torch"`` gives torch's norms bit
  for bit.
* **``p = 100`` is exactly no clipping** (threshold ``inf``). Taken literally, the
  threshold would be the running maximum and torch's ``1e-6`` in the denominator
  would shrink every new record norm by a factor ``n / (n + 1e-6)``.

The PyPI package ``autoclip`` 0.2.1 (``QuantileClip``) differs from the paper: a
quantile in [0, 1] with default 0.9, per-parameter thresholds unless
``global_threshold=True``, a window of 1000 that *excludes* the current norm (its
first step is unclipped), and NaN norms enter its history. ``include_current=False``
gives its causal convention with a global norm.

References:
    Seetharaman, Wichern, Pardo, Le Roux. AutoClip: Adaptive Gradient Clipping for
    Source Separation Networks. MLSP 2020, arXiv:2007.14469.

    Masson, Rim, Lee. DDSketch: A Fast and Fully-Mergeable Quantile Sketch with
    Relative-Error Guarantees. PVLDB 12(12), 2019, arXiv:1908.10693.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradclip import _sync
from gradclip._params import ParamsLike
from gradclip.clippers.base import GlobalNormClipper, ParamGroup, State
from gradclip.clippers.schedule import Schedule

HISTORY_MODES = ("full", "window", "stream")
"""The ways to keep the norm history: every norm, the last ``window``, or a sketch."""

_MIN_CAPACITY = 64
"""The full history's first allocation; it doubles when full (amortised O(1) growth)."""

_LOG_LOWEST = -126 * math.log(2.0)
_LOG_HIGHEST = 128 * math.log(2.0)
"""The stream sketch's buckets span float32's normal range of norms, [2^-126, 2^128]."""


class AutoClip(GlobalNormClipper):
    """Clip the global gradient norm to the ``percentile``-th percentile of its history.

    Each step records the current norm, then clips to the percentile of the recorded
    norms, the current one included (the paper's rule). With param groups, each group
    keeps its own history of its own norm.

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups.
        percentile: ``p`` in (0, 100]; 10 is the paper's choice. A percentile, not a
            quantile: ``autoclip``'s ``QuantileClip(quantile=0.1)`` is ``percentile=10``.
            ``100`` never clips. A value below 1 warns (``UserWarning``): it is most
            likely a quantile (``0.9`` meant as ``percentile=90``).
        history: ``"window"`` (default): the last ``window`` norms, exact percentile
            (numpy's linear interpolation), O(window · log window) per step.
            ``"full"``: every norm since the start, the paper's exact rule; memory and
            per-step work grow linearly with the step count. ``"stream"``: the
            full-history percentile within a relative ``relative_accuracy``, from a
            sketch of fixed size (about 9k int64 counts at 1 %); norms below 2^-126
            count as 2^-126 (exact zeros stay zeros), float64 norms above 2^128
            as 2^128.
        window: the number of recent norms kept by ``history="window"`` (>= 1).
        relative_accuracy: the stream sketch's relative error α in [1e-4, 0.5]; it
            holds ``ln(2^254) / ln((1 + α) / (1 - α))`` counts.
        include_current: ``True`` (the paper): the current norm is in the history
            the percentile is taken over. ``False``: only earlier norms count, and
            the first step is not clipped (the convention of ``autoclip`` 0.2.1).
        schedule: a threshold schedule (a :class:`~gradclip.clippers.schedule.Schedule`
            or a string such as ``"cosine:1000"``) that scales the threshold applied
            each step; the strategy's own statistics never see the scheduled value.
        norm_type: the p of the norms, p > 0 or ``inf``.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``; non-finite norms are never
            recorded, whatever the policy.
        norm_kernel: how the norms are computed (see :func:`gradclip.tensor_norms`).
            ``"blocked"`` (default): faster and more accurate on large CPU tensors;
            norms differ from ``torch.nn.utils`` in the last bits (more on very large
            tensors, where torch's CPU kernel loses precision). ``"torch"``:
            bit-identical to ``torch.nn.utils``.

    Raises:
        ValueError: ``percentile`` outside (0, 100], ``window`` < 1,
            ``relative_accuracy`` outside [1e-4, 0.5], or an unknown ``history``.
        TypeError: an option of the wrong type (e.g. a float ``window``).

    References:
        Seetharaman, Wichern, Pardo, Le Roux. AutoClip: Adaptive Gradient Clipping
        for Source Separation Networks. MLSP 2020, arXiv:2007.14469.

        Masson, Rim, Lee. DDSketch: A Fast and Fully-Mergeable Quantile Sketch with
        Relative-Error Guarantees. PVLDB 12(12), 2019, arXiv:1908.10693.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> clipper = AutoClip([w], percentile=50, history="full")
        >>> for g in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0]):  # norms 5, 1, 50
        ...     w.grad = torch.tensor(g)
        ...     stats = clipper.clip_()
        >>> stats.threshold  # the median of [5, 1, 50]
        tensor(5.)
        >>> w.grad.norm().round(decimals=4)
        tensor(5.)
    """

    spec_name = "autoclip"
    spec_positional = "percentile"
    spec_aliases: ClassVar[Mapping[str, str]] = {"p": "percentile"}
    growing_state: ClassVar[frozenset[str]] = frozenset({"sorted_history"})
    default_norm_kernel: ClassVar[str] = "blocked"

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        percentile: float = 10.0,
        *,
        history: str = "window",
        window: int = 1000,
        relative_accuracy: float = 0.01,
        include_current: bool = True,
        schedule: Schedule | str | None = None,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
        norm_kernel: str | None = None,
    ) -> None:
        defaults = {
            "percentile": percentile,
            "history": history,
            "window": window,
            "relative_accuracy": relative_accuracy,
            "include_current": include_current,
            "schedule": schedule,
        }
        super().__init__(
            params, defaults, norm_type=norm_type, nonfinite=nonfinite, norm_kernel=norm_kernel
        )

    # -- options and state ------------------------------------------------------------

    def _check_options(self, group: ParamGroup) -> None:
        p = group["percentile"]
        if isinstance(p, bool) or not isinstance(p, Real):
            raise TypeError(f"percentile must be a number in (0, 100]; got {p!r}")
        if not 0.0 < float(p) <= 100.0:
            raise ValueError(
                f"percentile must be in (0, 100] (a percentile, not a quantile: 10 is the "
                f"paper's choice, 100 never clips); got {p!r}"
            )
        group["percentile"] = float(p)
        if float(p) < 1.0:
            warnings.warn(
                f"AutoClip percentile={p!r} clips at the {float(p):g}th percentile of the "
                "norms, i.e. almost always. Percentiles are in (0, 100]: autoclip's "
                f"QuantileClip(quantile=0.9) corresponds to percentile=90 (did you mean "
                f"percentile={100 * float(p):g}?)",
                UserWarning,
                stacklevel=_caller_outside_gradclip(),
            )
        history = group["history"]
        if history not in HISTORY_MODES:
            raise ValueError(
                f"history must be one of {', '.join(map(repr, HISTORY_MODES))}; got {history!r}"
            )
        window = group["window"]
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int >= 1; got {window!r}")
        if window < 1:
            raise ValueError(f"window must be an int >= 1; got {window!r}")
        accuracy = group["relative_accuracy"]
        if isinstance(accuracy, bool) or not isinstance(accuracy, Real):
            raise TypeError(f"relative_accuracy must be a number in [1e-4, 0.5]; got {accuracy!r}")
        if not 1e-4 <= float(accuracy) <= 0.5:
            raise ValueError(f"relative_accuracy must be in [1e-4, 0.5]; got {accuracy!r}")
        group["relative_accuracy"] = float(accuracy)
        if not isinstance(group["include_current"], bool):
            raise TypeError(f"include_current must be a bool; got {group['include_current']!r}")

    def _init_state(self, group: ParamGroup) -> State:
        count = torch.zeros((), dtype=torch.int64)
        if group["history"] == "full":
            # Every finite norm so far, ascending, padded with +inf to the capacity.
            return {"sorted_history": torch.full((0,), math.inf), "count": count}
        if group["history"] == "window":
            # The last `window` finite norms in arrival order, +inf where not yet filled;
            # the next write goes to slot count % window.
            return {"ring": torch.full((group["window"],), math.inf), "count": count}
        # Norm counts per slot: slot 0 holds exact zeros, slot 1 + j the j-th bucket.
        _, _, positive = _sketch_geometry(group["relative_accuracy"])
        return {"sketch": torch.zeros(1 + positive, dtype=torch.int64), "count": count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: the checkpoint was saved with another ``history`` mode or
                ``window`` size, or does not match the groups (see the base class).
        """
        saved_options = state_dict.get("options") or [{}] * len(self.param_groups)
        for index, (group, options, saved) in enumerate(
            zip(self.param_groups, saved_options, state_dict["state"])
        ):
            mode = options.get("history", group["history"])
            if mode != group["history"]:
                raise ValueError(
                    f"state_dict group {index} was saved with history={mode!r}; this "
                    f"AutoClip has history={group['history']!r}"
                )
            mode = group["history"]
            ring, sketch = saved.get("ring"), saved.get("sketch")
            if mode == "window" and isinstance(ring, Tensor) and ring.shape != (group["window"],):
                raise ValueError(
                    f"state_dict group {index} was saved with window={ring.shape[0]}; "
                    f"this AutoClip has window={group['window']}"
                )
            buckets = _sketch_geometry(group["relative_accuracy"])[2] + 1
            if mode == "stream" and isinstance(sketch, Tensor) and sketch.numel() != buckets:
                raise ValueError(
                    f"state_dict group {index} was saved with relative_accuracy="
                    f"{options.get('relative_accuracy', '?')} ({sketch.numel()} buckets); "
                    f"this AutoClip has relative_accuracy={group['relative_accuracy']}"
                )
        super().load_state_dict(state_dict)

    # -- the strategy -------------------------------------------------------------------

    def _threshold(self, group: ParamGroup, state: State, total_norm: Tensor) -> Tensor:
        """Record ``total_norm`` (if finite) and return the percentile of the history.

        With ``include_current=False`` the percentile is taken before recording.
        """
        q = group["percentile"] / 100.0
        norm = total_norm.detach()
        if group["history"] != "stream" and _sync.branch_on_host([norm, state["count"]]):
            return _no_clip_at_100(self._host_threshold(group, state, norm), q)
        finite = torch.isfinite(norm)
        if not group["include_current"]:
            before = self._percentile(group, state, norm.dtype)
            self._record(group, state, norm, finite)
            return _no_clip_at_100(before, q)
        self._record(group, state, norm, finite)
        return _no_clip_at_100(self._percentile(group, state, norm.dtype), q)

    def _host_threshold(self, group: ParamGroup, state: State, norm: Tensor) -> Tensor:
        """``_threshold`` of the window and full modes for CPU state: same state, same result.

        On the CPU there is no device to wait for, so the count and the norm's
        finiteness are read on the host and the step takes a few operations where
        the branch-free path takes about twenty (each costs microseconds of dispatch,
        as much as the percentile itself).
        """
        q = group["percentile"] / 100.0
        count = int(state["count"])
        value = norm.reshape(())
        record = math.isfinite(float(value))
        if group["history"] == "window":
            ring = _as_dtype(state, "ring", norm.dtype)
            size = ring.numel()

            def percentile(n: int) -> Tensor:
                return _host_percentile(ring, min(n, size), q, select=True)

            def insert() -> None:
                ring[count % size] = value

        else:
            history = self._full_history(state, norm.dtype)

            def percentile(n: int) -> Tensor:
                return _host_percentile(history, n, q)

            def insert() -> None:
                slot = int(torch.searchsorted(history[:count], value.reshape(1)))
                history[slot + 1 : count + 1] = history[slot:count].clone()
                history[slot] = value

        if group["include_current"]:
            if record:
                insert()
            threshold = percentile(count + record)
        else:  # the earlier norms only
            threshold = percentile(count)
            if record:
                insert()
        if record:
            state["count"] = state["count"] + 1
        return threshold

    def _record(self, group: ParamGroup, state: State, norm: Tensor, finite: Tensor) -> None:
        """Add ``norm`` to the history; a non-finite norm leaves the state bit-identical."""
        mode = group["history"]
        if mode == "full":
            self._record_full(state, norm, finite)
        elif mode == "window":
            ring = _as_dtype(state, "ring", norm.dtype)
            slot = torch.remainder(state["count"], ring.numel()).reshape(1)
            kept = torch.where(finite, norm.reshape(1), ring.index_select(0, slot))
            ring.index_copy_(0, slot, kept)
        else:
            sketch = state["sketch"]
            safe = torch.where(finite, norm, 1.0)
            slot = _sketch_slot(safe, group["relative_accuracy"])
            sketch.index_add_(0, slot, finite.to(sketch.dtype).reshape(1))
        state["count"] = state["count"] + finite.to(state["count"].dtype)

    def _record_full(self, state: State, norm: Tensor, finite: Tensor) -> None:
        history = self._full_history(state, norm.dtype)
        prefix = history[: self.step]
        # A non-finite norm is inserted as +inf: it lands at `count`, on top of the
        # +inf padding, so the buffer does not change.
        value = torch.where(finite, norm.to(history.dtype), math.inf)
        slot = torch.searchsorted(prefix, value.reshape(1))
        index = torch.arange(self.step, device=history.device)
        shifted = torch.roll(prefix, 1)
        prefix.copy_(torch.where(index < slot, prefix, torch.where(index == slot, value, shifted)))

    def _full_history(self, state: State, dtype: torch.dtype) -> Tensor:
        """The sorted history buffer, grown (doubling) to hold this step's norm."""
        # count <= self.step (only finite norms are recorded, at most one per step), so
        # the host step counter bounds the length in use without reading the device.
        history = _as_dtype(state, "sorted_history", dtype)
        used = self.step
        if history.numel() < used:
            capacity = max(used, 2 * history.numel(), _MIN_CAPACITY)
            grown = torch.full((capacity,), math.inf, dtype=history.dtype, device=history.device)
            grown[: history.numel()] = history
            state["sorted_history"] = history = grown
        return history

    def _percentile(self, group: ParamGroup, state: State, dtype: torch.dtype) -> Tensor:
        """The percentile of the recorded norms (``inf`` if there are none)."""
        q = group["percentile"] / 100.0
        mode = group["history"]
        count = state["count"]
        if mode == "full":
            history = state["sorted_history"]
            used = min(self.step, history.numel())
            if used == 0:
                return torch.full((), math.inf, dtype=history.dtype, device=history.device)
            return _percentile_of_sorted(history[:used], count, q)
        if mode == "window":
            ring = state["ring"]
            table = _window_ranks(ring.numel(), q, ring.device, ring.dtype)
            return _percentile_from_table(torch.sort(ring).values, count, table)
        return _sketch_percentile(state["sketch"], count, q, group["relative_accuracy"], dtype)


# -- percentile helpers (device-side, no host reads) -----------------------------------


def _rank_dtype(device: torch.device) -> torch.dtype:
    """Ranks and positions in float64 (exact to 2**53 steps) where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _as_dtype(state: State, key: str, dtype: torch.dtype) -> Tensor:
    """``state[key]`` in the norms' dtype (a fresh state is float32; float64 runs upcast)."""
    if state[key].dtype != dtype:
        state[key] = state[key].to(dtype)
    tensor: Tensor = state[key]
    return tensor


def _caller_outside_gradclip() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller point at user code.

    Counts the frames from the function calling this one up to the first frame whose
    file is not in the gradclip package (constructors, ``from_spec`` and
    ``add_param_group`` reach the option checks through different depths).
    """
    package = __file__.rsplit("clippers", 1)[0]
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def _no_clip_at_100(threshold: Tensor, q: float) -> Tensor:
    return torch.full_like(threshold, math.inf) if q >= 1.0 else threshold


def _host_percentile(values: Tensor, count: int, q: float, *, select: bool = False) -> Tensor:
    """:func:`_percentile_of_sorted` with ``count`` known on the host (same arithmetic).

    With ``select``, ``values`` is unsorted (unused entries +inf) and the two order
    statistics are selected (``torch.kthvalue``, linear time) instead of sorting.
    """
    if count == 0:
        return torch.full((), math.inf, dtype=values.dtype, device=values.device)
    last = count - 1
    rank = last * q  # float64, as the device path's rank
    low = math.floor(rank)
    high = min(low + 1, last)
    weight = torch.tensor(rank - low, dtype=torch.float64).to(values.dtype)
    if not select:
        return torch.lerp(values[low], values[high], weight)
    a = torch.kthvalue(values, low + 1).values
    b = a if high == low else torch.kthvalue(values, high + 1).values
    return torch.lerp(a, b, weight)


def _percentile_of_sorted(values: Tensor, count: Tensor, q: float) -> Tensor:
    """``numpy.percentile(values[:count], 100 q)`` (linear) for ascending ``values``.

    ``count`` is a device tensor; entries past it are ignored (they are +inf). Returns
    ``inf`` when ``count`` is 0.
    """
    rank_dtype = _rank_dtype(values.device)
    last = torch.clamp(count - 1, min=0)
    rank = last.to(rank_dtype) * q  # numpy's virtual index (n - 1) q
    low = torch.floor(rank)
    weight = (rank - low).to(values.dtype)
    low_index = low.to(torch.int64).reshape(1)
    high_index = torch.minimum(low_index + 1, last.reshape(1))
    a = values.index_select(0, low_index)[0]
    b = values.index_select(0, high_index)[0]
    # torch.lerp is numpy's _lerp: a + (b - a) w below w = 0.5, b - (b - a)(1 - w) above.
    result = torch.lerp(a, b, weight)
    return torch.where(count > 0, result, math.inf)


@functools.lru_cache(maxsize=64)
def _window_ranks(
    window: int, q: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """:func:`_percentile_of_sorted`'s positions and weights for every count 0..``window``.

    Row ``n`` holds the two positions the percentile of ``n`` sorted values
    interpolates between and the weight of the second; computed with the same
    operations in the same dtypes, so a lookup gives bit-identical thresholds with a
    handful of operations per step instead of a dozen.
    """
    counts = torch.arange(window + 1)
    last = torch.clamp(counts - 1, min=0)
    rank = last.to(_rank_dtype(device)) * q
    low = torch.floor(rank)
    weight = (rank - low).to(dtype)
    low_index = low.to(torch.int64)
    high_index = torch.minimum(low_index + 1, last)
    positions = torch.stack([low_index, high_index], dim=1)
    return positions.to(device), weight.to(device)


def _percentile_from_table(values: Tensor, count: Tensor, table: tuple[Tensor, Tensor]) -> Tensor:
    """:func:`_percentile_of_sorted` of ``values[:min(count, len(values))]`` via a table."""
    positions, weights = table
    n = torch.clamp(count, max=values.numel()).reshape(1)
    pair = values.index_select(0, positions.index_select(0, n).reshape(2))
    result = torch.lerp(pair[0], pair[1], weights.index_select(0, n)[0])
    return torch.where(count > 0, result, math.inf)


def _sketch_geometry(relative_accuracy: float) -> tuple[float, int, int]:
    """``(ln γ, first bucket index, number of positive buckets)`` of the norm sketch.

    Bucket ``i`` holds the norms in ``(γ^(i-1), γ^i]`` with ``γ = (1 + α) / (1 - α)``;
    buckets cover float32's normal range ``[2^-126, 2^128]``.
    """
    log_gamma = math.log((1.0 + relative_accuracy) / (1.0 - relative_accuracy))
    first = math.ceil(_LOG_LOWEST / log_gamma)
    last = math.ceil(_LOG_HIGHEST / log_gamma)
    return log_gamma, first, last - first + 1


def _sketch_slot(norm: Tensor, relative_accuracy: float) -> Tensor:
    """The slot of a finite norm: 0 for exactly 0, else 1 + its bucket (clamped to range)."""
    log_gamma, first, positive = _sketch_geometry(relative_accuracy)
    x = norm.to(_rank_dtype(norm.device))
    bucket = torch.ceil(torch.log(x) / log_gamma)  # -inf for 0, handled below
    slot = 1 + torch.clamp(bucket - first, 0, positive - 1).to(torch.int64)
    return torch.where(x > 0, slot, 0).reshape(1)


def _sketch_values(slot: Tensor, relative_accuracy: float, dtype: torch.dtype) -> Tensor:
    """Each slot's representative norm ``2 γ^i / (γ + 1)``: within α of every norm in it."""
    log_gamma, first, _ = _sketch_geometry(relative_accuracy)
    bucket = (slot - 1 + first).to(_rank_dtype(slot.device))
    value = torch.exp(bucket * log_gamma) * (1.0 - relative_accuracy)  # 2 / (γ + 1) = 1 - α
    value = torch.clamp(value, max=torch.finfo(dtype).max)
    return torch.where(slot > 0, value, 0.0).to(dtype)


def _sketch_percentile(
    counts: Tensor, total: Tensor, quantile: float, relative_accuracy: float, dtype: torch.dtype
) -> Tensor:
    """The linear percentile (numpy's) with each order statistic read from the sketch.

    The two order statistics around numpy's virtual index are replaced by their
    buckets' representatives, each within a relative α of the true value, so their
    interpolation is within α of the exact percentile. ``inf`` when ``total`` is 0.
    """
    rank_dtype = _rank_dtype(counts.device)
    last = torch.clamp(total - 1, min=0)
    rank = last.to(rank_dtype) * quantile
    low = torch.floor(rank)
    weight = (rank - low).to(dtype)
    # The k-th smallest norm (1-based) lies in the first slot whose running count >= k.
    wanted = low.to(torch.int64) + torch.stack([torch.ones_like(last), torch.full_like(last, 2)])
    wanted = torch.minimum(wanted, torch.clamp(total, min=1))
    slots = torch.searchsorted(torch.cumsum(counts, 0), wanted)
    slots = torch.clamp(slots, max=counts.numel() - 1)
    a, b = _sketch_values(slots, relative_accuracy, dtype).unbind()
    return torch.where(total > 0, torch.lerp(a, b, weight), math.inf)
