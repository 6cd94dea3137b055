"""``EMARatio``: clip to a multiple of an EMA of past clipped norms, as OLMo's adaptive clipping.

OLMo's training code (allenai/OLMo, ``olmo/optim.py``, the ``max_grad_norm_ratio``
option; the model is described in Groeneveld et al. 2024, arXiv:2402.00838) clips each
parameter's gradient to ``r`` times an exponential moving average of that parameter's
gradient norm, the average taken from before the step and then moved towards the
clipped norm. There is no paper on the rule itself; this follows the code. With ``m``
the average and ``n`` the norm (of one tensor, or of the whole group with
``per_tensor=False``)::

    threshold = r · m̂_{t−1}           (m̂: the bias-corrected average, below)
    h = min(1, threshold / (n + 1e-6));  g ← h · g
    m_t = β · m_{t−1} + (1 − β) · h·n

The factor is always applied (a clamped multiply, as torch's ``clip_grad_norm_`` and
OLMo do), so there is no host sync. A threshold schedule (``schedule=``, see
:mod:`gradclip.clippers.schedule`) multiplies the threshold applied, ``f_t · r · m̂``;
the average is still updated with ``n · min(1, r · m̂ / (n + 1e-6))``, the norm
clipped at the unscheduled threshold, so a schedule never feeds back into ``m``.

Where this follows OLMo: the threshold rule, the EMA of clipped norms from before the
step, the per-tensor mode, the ``1e-6`` in the division, and the update itself: OLMo
lerps the average towards ``grad_norm * clip_coef_clamped`` (its
``_do_adaptive_clipping``), i.e. ``h·n``, the norm times the factor actually applied,
as here. On a clipped step that is ``r·m · n / (n + 1e-6)``, a hair below ``r·m``.

Where it deliberately differs, and why:

* **Bias-corrected average instead of initialising from the first norm.** OLMo sets
  the average to the first norm it sees and then updates it as above, so the first
  norm keeps a weight β^k after k steps. Here ``m`` starts at 0 with a weight ``w``
  (``w ← β·w + (1 − β)``, so ``w = 1 − β^k`` after k updates) and the threshold uses
  ``m̂ = m / w``, the properly weighted average of all norms seen (as Adam's moments
  are corrected). After one step both give the first norm.
* **A warm-up.** No clipping during the first ``warmup_steps`` steps, while the average
  fills (their norms are still averaged). OLMo starts clipping on its second step
  (``warmup_steps=1`` here); the default of 10 waits for an average of several norms
  before trusting it. A tensor with no average yet (no gradient so far) is not
  clipped.
* **Non-finite steps leave the averages untouched** (whatever the ``nonfinite``
  policy), and still count towards the warm-up.
* **β is an option** (default 0.99); OLMo uses ``max(β1, β2)`` of its Adam optimizer.
* A global mode (``per_tensor=False``, the default): one average of the group's norm,
  and one factor for the whole group, like :class:`~gradclip.NormClip`. Any p-norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradclip._params import ParamsLike
from gradclip.clippers._ema import (
    check_above_one,
    check_flag,
    check_steps,
    check_unit_interval,
    gather,
    present,
    scale_each_,
    scatter,
)
from gradclip.clippers.base import GroupResult, ParamGroup, ScheduledClipper, State
from gradclip.clippers.schedule import Schedule
from gradclip.functional import NORM_EPS, scale_grads_
from gradclip.norms import total_norm_of


class EMARatio(ScheduledClipper):
    """Clip to ``ratio`` times an EMA of past clipped gradient norms (OLMo's adaptive clipping).

    See the module docstring for the exact rule and where it differs from OLMo.

    State, per parameter group: ``ema`` (the EMA, not bias-corrected) and ``weight``
    (its total weight ``1 − β^k`` after k updates; 0 means no history), both 0-d with
    ``per_tensor=False`` and 1-D with one entry per parameter of the group otherwise;
    on the gradients' device, in the norms' dtype.

    ``ClipStats.threshold`` is ``inf`` during the warm-up; afterwards ``ratio`` times
    the bias-corrected EMA (global mode) or the p-norm of the per-tensor thresholds.

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups (each may
            set any of the options below).
        ratio: the threshold as a multiple of the EMA (r), > 1. Default 2.0.
        beta: the EMA coefficient, in (0, 1). Default 0.99.
        per_tensor: one EMA and one factor per tensor (OLMo) instead of per group.
        warmup_steps: the number of initial steps that are never clipped, ≥ 0.
            Default 10.
        schedule: a threshold schedule (a :class:`~gradclip.clippers.schedule.Schedule`
            or a string such as ``"cosine:1000"``) that multiplies the threshold
            ``r · m̂`` applied each step (every per-tensor threshold alike with
            ``per_tensor=True``; :class:`~gradclip.clippers.schedule.RelaxOnCalm`
            watches the group's norm). The average never sees the scheduled value: it
            is updated with the norm clipped at ``r · m̂``, as without a schedule, so a
            factor below ``1 / r`` cannot drive it to zero.
        norm_type: p > 0 or ``inf``.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``.
        norm_kernel: how the norms are computed (see :func:`gradclip.tensor_norms`).
            ``"blocked"`` (default): faster and more accurate on large CPU tensors;
            norms differ from ``torch.nn.utils`` in the last bits (more on very large
            tensors, where torch's CPU kernel loses precision). ``"torch"``:
            bit-identical to ``torch.nn.utils``.

    Raises:
        TypeError, ValueError: a bad option (the message names it and its valid range).

    References:
        Groeneveld et al. OLMo: Accelerating the Science of Language Models.
        ACL 2024, arXiv:2402.00838; the rule is that of the ``max_grad_norm_ratio``
        option in its training code (allenai/OLMo, ``olmo/optim.py``).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> clipper = EMARatio([w], ratio=2.0, beta=0.5, warmup_steps=1)
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> clipper.clip_().threshold  # warm-up: the norm 5 only feeds the EMA
        tensor(inf)
        >>> w.grad = torch.tensor([30.0, 40.0])
        >>> stats = clipper.clip_()  # clipped to 2 × 5
        >>> stats.threshold, w.grad
        (tensor(10.), tensor([6., 8.]))
    """

    spec_name = "emaratio"
    spec_positional = "ratio"
    spec_aliases: ClassVar[Mapping[str, str]] = {"r": "ratio"}
    default_norm_kernel: ClassVar[str] = "blocked"
    warmup_counts_calls: ClassVar[bool] = True

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        ratio: float = 2.0,
        beta: float = 0.99,
        per_tensor: bool = False,
        warmup_steps: int = 10,
        *,
        schedule: Schedule | str | None = None,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
        norm_kernel: str | None = None,
    ) -> None:
        defaults = {
            "ratio": ratio,
            "beta": beta,
            "per_tensor": per_tensor,
            "warmup_steps": warmup_steps,
            "schedule": schedule,
        }
        super().__init__(
            params, defaults, norm_type=norm_type, nonfinite=nonfinite, norm_kernel=norm_kernel
        )

    def _check_options(self, group: ParamGroup) -> None:
        group["ratio"] = check_above_one(group["ratio"], "ratio")
        group["beta"] = check_unit_interval(group["beta"], "beta")
        group["per_tensor"] = check_flag(group["per_tensor"], "per_tensor")
        group["warmup_steps"] = check_steps(group["warmup_steps"], "warmup_steps")

    def _init_state(self, group: ParamGroup) -> State:
        shape = (len(group["params"]),) if group["per_tensor"] else ()
        return {"ema": torch.zeros(shape), "weight": torch.zeros(shape)}

    def _clip_group(
        self, group: ParamGroup, state: State, grads: list[Tensor], norms: Tensor
    ) -> GroupResult:
        p, beta = self.norm_type, group["beta"]
        total_norm = total_norm_of(norms, p)
        index = present(group) if group["per_tensor"] else None
        ema_all, weight_all = state["ema"].to(norms.dtype), state["weight"].to(norms.dtype)
        ema, weight = gather(ema_all, index), gather(weight_all, index)
        norm = norms if group["per_tensor"] else total_norm
        if self.step <= group["warmup_steps"]:
            bound = torch.full_like(norm, math.inf)
        else:
            bound = torch.where(weight > 0, group["ratio"] * ema / weight, math.inf)
        applied = self._scheduled(group, bound, total_norm)
        factor = torch.clamp(applied / (norm + NORM_EPS), max=1.0)
        if group["per_tensor"]:
            scale_each_(grads, factor)
        else:
            scale_grads_(grads, factor)
        clipped = norm * factor
        # The average sees the norm clipped at the strategy's own bound, not the schedule's.
        seen = (
            clipped if applied is bound else norm * torch.clamp(bound / (norm + NORM_EPS), max=1.0)
        )
        finite = torch.isfinite(total_norm)
        new_ema = self.keep_if_finite(finite, beta * ema + (1.0 - beta) * seen, ema)
        new_weight = self.keep_if_finite(finite, beta * weight + (1.0 - beta), weight)
        state["ema"] = scatter(ema_all, index, new_ema)
        state["weight"] = scatter(weight_all, index, new_weight)
        if group["per_tensor"]:
            return GroupResult(
                total_norm_of(applied, p), total_norm_of(clipped, p), (factor < 1.0).any()
            )
        return GroupResult(applied, clipped, factor < 1.0, factor)
