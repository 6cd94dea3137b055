"""ZClip: clip only the gradient-norm spikes that a running z-score flags.

References:
    Kumar, Owen, Roy Chowdhury, Güra. ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training. 2025, arXiv:2504.02507. Reference code: PyPI ``zclip`` 1.0.0.

The algorithm, per parameter group, with ``g`` the group's gradient norm:

* **Warm-up.** Collect the first ``warmup_steps`` (finite) norms without clipping
  (but for the optional ``max_grad_norm`` cap), then set ``μ`` to their mean and
  ``σ²`` to their population variance.
* **Each later step**, with ``μ, σ`` from before this step, ``z = (g − μ)/(σ + eps)``:

  - ``mode="zscore"``, ``clip_option="adaptive_scaling"`` (the paper's reciprocal
    clipping): if ``z > z_thresh``, clip to ``μ + z_thresh² · σ / z``;
  - ``mode="zscore"``, ``clip_option="mean"``: if ``z > z_thresh``, clip to ``μ``;
  - ``mode="percentile"``: if ``g > μ + z_thresh · σ``, clip to that value (the
    zclip package's name; it is a fixed z-multiple, not a percentile).

  Then update the EMA with ``v`` = that threshold when the step was flagged, else
  ``g``: ``μ ← αμ + (1−α)v``, ``σ² ← ασ² + (1−α)(v − μ_new)²`` (the new mean).

This follows the paper and the zclip 1.0.0 code step for step (same update order,
same formulas, same ``eps`` placement). The differential tests drive both with the
same gradients over hundreds of steps. Deliberate differences, each an option:

* ``max_grad_norm`` (an absolute cap, ``min(threshold, max_grad_norm)``) is off by
  default. zclip 1.0.0 defaults it to 1.0, which clips at 1.0 on every step,
  warm-up included: fixed clipping with ZClip on top, not the paper's method. When
  set, it is applied as zclip does: also during the warm-up, and it never feeds the
  statistics (the EMA sees the adaptive threshold or the raw norm).
* ``clip_factor`` (zclip's extension; not in the paper) must be in (0, 1]. By default
  it scales the deviation term, ``μ + clip_factor · z_thresh² σ / z``, as zclip's
  docstring says. zclip 1.0.0's code multiplies the whole threshold, ``μ`` included;
  ``clip_factor_scope="threshold"`` does that. Both agree at the default 1.0.
* Non-finite norms never enter the state. zclip appends them to its warm-up buffer
  (a NaN mean for ever after) and feeds them to its EMA. Here the warm-up ends after
  ``warmup_steps`` *finite* norms, and a NaN/inf step leaves ``μ, σ`` untouched.
* No host sync: the state lives on the gradients' device (a fixed-size warm-up
  buffer with a count of valid entries), and the flag and threshold are chosen with
  ``torch.where``. zclip calls ``.item()`` every step. Statistics are kept in
  float32 (zclip: Python floats, float64), which the tests tolerate.
* The norms of large CPU gradients come from gradclip's blocked kernel
  (``norm_kernel="blocked"``, see :mod:`gradclip.norms`), not torch's, which zclip
  uses: the same bits below 65536 elements, far more accurate above (torch's is off
  by 2.7e-3 on GPT-2's embedding). ``norm_kernel="torch"`` gives torch's norms bit
  for bit.
* The scale is torch's ``min(1, threshold / (g + 1e-6))`` like every gradclip
  strategy; zclip scales only when ``g > threshold``. They differ only for ``g``
  within 1e-6 of the threshold. One scale per group, so a one-group ZClip can hand
  its scale to a fused optimizer step instead of writing the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradclip._params import ParamsLike
from gradclip.clippers.base import GlobalNormClipper, ParamGroup, State
from gradclip.clippers.schedule import Schedule

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")
CLIP_FACTOR_SCOPES = ("deviation", "threshold")
STATE_DTYPE = torch.float32
"""The dtype of the running statistics (float64 is slow or missing on some accelerators)."""


class ZClip(GlobalNormClipper):
    """Adaptive clipping of gradient-norm spikes by a running z-score (ZClip).

    For each parameter group, keeps an exponential moving average of the global
    gradient norm and of its variance; a step whose norm is an outlier (z-score above
    ``z_thresh``) is clipped to a threshold derived from the statistics. See the
    module docstring for the formulas and for where this follows zclip 1.0.0.

    State per group (on the gradients' device): ``buffer`` (``warmup_steps``,
    float32; the warm-up norms), ``count`` (int64; finite norms recorded, at most
    ``warmup_steps``), ``mean`` and ``var`` (float32; valid once ``count`` reaches
    ``warmup_steps``), and ``calls`` (a Python int; steps this group took part in,
    the only value branched on).

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups (each group
            keeps its own statistics and may set its own options).
        z_thresh: the z-score above which a norm is a spike, > 0 (in ``"percentile"``
            mode, the multiple of ``σ`` above ``μ`` to clip to).
        alpha: the EMA's smoothing factor, in (0, 1).
        eps: added to ``σ`` in the z-score, >= 0.
        warmup_steps: finite norms collected before the first clip, >= 1.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: in ``"zscore"`` mode, ``"adaptive_scaling"`` (reciprocal
            clipping, the paper's) or ``"mean"`` (clip spikes to ``μ``).
        max_grad_norm: an absolute cap on the threshold, applied on every step
            including the warm-up; ``None`` or ``inf`` (default): no cap.
        clip_factor: multiplies the adaptive-scaling threshold's deviation term (see
            ``clip_factor_scope``), in (0, 1]; other than 1 only with
            ``mode="zscore"`` and ``clip_option="adaptive_scaling"``.
        clip_factor_scope: ``"deviation"`` (default: ``μ + clip_factor · z_thresh² σ
            / z``, as zclip's docstring describes) or ``"threshold"`` (zclip 1.0.0's
            code: ``clip_factor · (μ + z_thresh² σ / z)``).
        skip_update_on_spike: leave the statistics unchanged on a clipped step (as
            zclip's option of the same name).
        schedule: a threshold schedule (a :class:`~gradclip.clippers.schedule.Schedule`
            or a string such as ``"cosine:1000"``) that scales the threshold applied
            each step; the strategy's own statistics never see the scheduled value.
        norm_type: the p of the norms, p > 0 or ``inf``.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``; whatever the policy, a
            non-finite norm changes no statistic.
        norm_kernel: how the norms are computed (see :func:`gradclip.tensor_norms`).
            ``"blocked"`` (default): faster and more accurate on large CPU tensors;
            norms differ from ``torch.nn.utils`` in the last bits (more on very large
            tensors, where torch's CPU kernel loses precision). ``"torch"``:
            bit-identical to ``torch.nn.utils``.

    Raises:
        ValueError: an option out of its range (the message names the value).
        TypeError: an option of the wrong type.

    References:
        Kumar, Owen, Roy Chowdhury, Güra. ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training. 2025, arXiv:2504.02507.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> clipper = ZClip([w], warmup_steps=4)
        >>> for norm in [1.0, 1.2, 0.8, 1.0]:  # warm-up: μ = 1, σ ≈ 0.141
        ...     w.grad = torch.tensor([norm])
        ...     _ = clipper.clip_()
        >>> w.grad = torch.tensor([10.0])  # z ≈ 63.6: a spike
        >>> stats = clipper.clip_()
        >>> round(stats.threshold.item(), 4), stats.clipped.item()
        (1.0139, True)
    """

    spec_name = "zclip"
    spec_positional = "z_thresh"
    spec_aliases: ClassVar[Mapping[str, str]] = {
        "z": "z_thresh",
        "warmup": "warmup_steps",
        "max_norm": "max_grad_norm",
    }
    default_norm_kernel: ClassVar[str] = "blocked"

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
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
        schedule: Schedule | str | None = None,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
        norm_kernel: str | None = None,
    ) -> None:
        defaults = {
            "z_thresh": z_thresh,
            "alpha": alpha,
            "eps": eps,
            "warmup_steps": warmup_steps,
            "mode": mode,
            "clip_option": clip_option,
            "max_grad_norm": max_grad_norm,
            "clip_factor": clip_factor,
            "clip_factor_scope": clip_factor_scope,
            "skip_update_on_spike": skip_update_on_spike,
            "schedule": schedule,
        }
        self._decision: tuple[Tensor, Tensor, Tensor] | None = None
        """This step's (warmed up, spike, spike threshold), from ``_threshold`` to ``_update``."""
        super().__init__(
            params, defaults, norm_type=norm_type, nonfinite=nonfinite, norm_kernel=norm_kernel
        )

    # -- options and state ---------------------------------------------------------

    def _check_options(self, group: ParamGroup) -> None:
        alpha = _real(group["alpha"], "alpha")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {alpha}")
        z_thresh = _real(group["z_thresh"], "z_thresh")
        if not 0.0 < z_thresh < math.inf:
            raise ValueError(f"z_thresh must be a finite number > 0; got {z_thresh}")
        eps = _real(group["eps"], "eps")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"eps must be a finite number >= 0; got {eps}")
        warmup = group["warmup_steps"]
        if isinstance(warmup, bool) or not isinstance(warmup, int):
            raise TypeError(f"warmup_steps must be an int >= 1; got {warmup!r}")
        if warmup < 1:
            raise ValueError(f"warmup_steps must be >= 1; got {warmup}")
        mode = _choice(group["mode"], "mode", MODES)
        clip_option = _choice(group["clip_option"], "clip_option", CLIP_OPTIONS)
        if mode == "percentile" and clip_option != "adaptive_scaling":
            raise ValueError(
                f"clip_option={clip_option!r} has no effect with mode='percentile' (it "
                "always clips to μ + z_thresh·σ); use mode='zscore' or drop clip_option"
            )
        cap = group["max_grad_norm"]
        if cap is not None:
            cap = _real(cap, "max_grad_norm")
            if math.isnan(cap) or cap <= 0.0:
                raise ValueError(f"max_grad_norm must be > 0, inf or None (no cap); got {cap}")
            cap = None if math.isinf(cap) else cap
        factor = _real(group["clip_factor"], "clip_factor")
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"clip_factor must be in (0, 1]; got {factor}")
        if factor != 1.0 and (mode, clip_option) != ("zscore", "adaptive_scaling"):
            raise ValueError(
                f"clip_factor={factor} only applies to mode='zscore' with "
                f"clip_option='adaptive_scaling'; got mode={mode!r}, clip_option={clip_option!r}"
            )
        scope = _choice(group["clip_factor_scope"], "clip_factor_scope", CLIP_FACTOR_SCOPES)
        skip = group["skip_update_on_spike"]
        if not isinstance(skip, bool):
            raise TypeError(f"skip_update_on_spike must be a bool; got {skip!r}")
        group.update(
            alpha=alpha,
            z_thresh=z_thresh,
            eps=eps,
            mode=mode,
            clip_option=clip_option,
            max_grad_norm=cap,
            clip_factor=factor,
            clip_factor_scope=scope,
        )

    def _init_state(self, group: ParamGroup) -> State:
        return {
            "calls": 0,
            "buffer": torch.zeros(group["warmup_steps"], dtype=STATE_DTYPE),
            "count": torch.zeros((), dtype=torch.int64),
            "mean": torch.zeros((), dtype=STATE_DTYPE),
            "var": torch.zeros((), dtype=STATE_DTYPE),
        }

    # -- the strategy --------------------------------------------------------------

    def _threshold(self, group: ParamGroup, state: State, total_norm: Tensor) -> Tensor:
        g = total_norm.to(STATE_DTYPE)
        if state["calls"] < group["warmup_steps"]:
            # At most `calls` norms are recorded: certainly still warming up.
            self._decision = None
            threshold = torch.full_like(g, math.inf)
        else:
            # Warmed up unless earlier warm-up norms were non-finite: decide on device.
            ready = state["count"] >= group["warmup_steps"]
            target, spike = self._spike_threshold(group, state, g)
            spike = spike & ready
            self._decision = (ready, spike, target)
            threshold = torch.where(spike, target, math.inf)
        if group["max_grad_norm"] is not None:
            threshold = threshold.clamp(max=group["max_grad_norm"])
        return threshold

    def _update(
        self, group: ParamGroup, state: State, total_norm: Tensor, clipped_norm: Tensor
    ) -> None:
        # The statistics see the adaptive threshold (not the capped, clipped norm), as
        # in zclip: `_threshold` of this same step left its decision in `_decision`.
        decision, self._decision = self._decision, None
        g = total_norm.to(STATE_DTYPE)
        finite = torch.isfinite(g)
        warmup = group["warmup_steps"]
        calls = state["calls"]
        state["calls"] = calls + 1
        if calls < warmup:
            self._record(state, g, finite, warmup, may_fill=calls + 1 == warmup)
            return
        if decision is None:  # not called right after `_threshold`: decide again
            ready = state["count"] >= warmup
            target, spike = self._spike_threshold(group, state, g)
            decision = ready, spike & ready, target
        ready, spike, target = decision
        update = finite & ready
        if group["skip_update_on_spike"]:
            update = update & ~spike
        self._update_ema(group, state, torch.where(spike, target, g), update)
        self._record(state, g, finite & ~ready, warmup, may_fill=True)

    @staticmethod
    def _spike_threshold(group: ParamGroup, state: State, g: Tensor) -> tuple[Tensor, Tensor]:
        """The threshold a spike is clipped to, and whether ``g`` is a spike (from μ, σ)."""
        mean, std = state["mean"], state["var"].sqrt()
        z_thresh = group["z_thresh"]
        if group["mode"] == "percentile":
            target = mean + z_thresh * std
            return target, g > target
        z = (g - mean) / (std + group["eps"])
        spike = z > z_thresh
        if group["clip_option"] == "mean":
            return mean, spike
        deviation = (z_thresh * z_thresh) * std / z
        factor = group["clip_factor"]
        if group["clip_factor_scope"] == "threshold":
            return (mean + deviation) * factor, spike
        return mean + factor * deviation, spike

    @staticmethod
    def _update_ema(group: ParamGroup, state: State, value: Tensor, mask: Tensor) -> None:
        """``μ ← αμ + (1−α)v``, then ``σ² ← ασ² + (1−α)(v − μ)²``, where ``mask``."""
        alpha = group["alpha"]
        mean = alpha * state["mean"] + (1.0 - alpha) * value
        var = alpha * state["var"] + (1.0 - alpha) * (value - mean).square()
        state["mean"] = torch.where(mask, mean, state["mean"])
        state["var"] = torch.where(mask, var, state["var"])

    @staticmethod
    def _record(state: State, g: Tensor, mask: Tensor, warmup: int, *, may_fill: bool) -> None:
        """Append ``g`` to the warm-up buffer where ``mask``; on filling it, set μ and σ²."""
        count = state["count"]
        slot = (torch.arange(warmup, device=g.device) == count) & mask
        buffer = torch.where(slot, g, state["buffer"])
        new_count = count + mask.to(count.dtype)
        state["buffer"], state["count"] = buffer, new_count
        if may_fill:
            filled = mask & (new_count == warmup)
            mean = buffer.mean()
            var = (buffer - mean).square().mean()
            state["mean"] = torch.where(filled, mean, state["mean"])
            state["var"] = torch.where(filled, var, state["var"])


def _real(value: object, name: str) -> float:
    """``float(value)`` for a real number (bool excluded); else ``TypeError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    return float(value)


def _choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` lower-cased if it is one of ``choices``; else ``ValueError`` listing them."""
    if not isinstance(value, str) or value.lower() not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{name} must be one of {valid}; got {value!r}")
    return value.lower()
