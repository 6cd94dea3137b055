"""``AdaGC``: per-tensor adaptive clipping against an EMA of each tensor's clipped norms.

Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen. AdaGC: Enhancing LLM Pretraining Stability
via Adaptive Gradient Clipping. ICML 2026, arXiv:2502.11034 (v1 title: "AdaGC:
Improving Training Stability for Large Language Model Pretraining").

For each tensor i of a parameter group, with γ_i its EMA of clipped norms::

    warm-up (steps 1..T):  g ← min(1, λ_abs / (‖g‖ + eps)) · g    (global clipping)
                           γ_i ← min(γ_i, ‖ĝ_i‖)
    afterwards:            h_i = min(1, λ_rel · γ_{t−1,i} / (‖g_i‖ + eps));  g_i ← h_i · g_i
                           γ_i ← β · γ_i + (1 − β) · ‖ĝ_i‖

Where this follows the paper and the authors' released code (the Megatron-LM patch
linked from PaddlePaddle/PaddleFleet ``Research/AdaGC``):

* The first ``warmup_steps`` calls (steps 1..T inclusive, as the authors' code counts)
  clip the group's global norm at λ_abs, and γ_i is the running minimum of tensor i's
  clipped norm. γ starts at ``+inf``, so the first warm-up step sets γ_i to that
  step's clipped norm, as the authors' code does; ``min`` with an uninitialised γ is
  otherwise undefined.
* After the warm-up, each tensor is clipped to λ_rel times its own γ from before this
  step, and γ is updated with the clipped norm.

Where it deliberately differs, and why:

* **No host sync.** The authors' code branches on ``norm > λ_rel·γ`` on the host; here
  the factor ``clamp(λ_rel·γ / (‖g‖ + eps), max=1)`` is always applied (as torch's
  ``clip_grad_norm_`` does), and γ is updated with ``‖g‖·h`` rather than exactly
  λ_rel·γ. The two differ by a factor ``‖g‖ / (‖g‖ + eps)``, i.e. by eps.
* **Zero norms do not freeze a tensor.** A threshold can grow by at most a factor
  ``β + (1 − β)·λ_rel`` per step (1.001 with the defaults), and not at all from 0. So a
  warm-up step where a tensor's gradient is exactly zero does not lower its γ, and a
  tensor that has no γ when the warm-up ends (no gradient, or only zero gradients,
  during it) is left unclipped on its first nonzero gradient, which initialises γ.
  The authors' code would set γ to 0 and zero that tensor's gradient for good.
* **Non-finite steps leave γ untouched** (whatever the ``nonfinite`` policy): a NaN or
  inf anywhere in the group skips the update of every γ in it, so one bad batch
  cannot poison the thresholds. Such steps still count towards the warm-up.
* Any p-norm (the paper uses L2); param groups each have their own options, and the
  warm-up clips each group by its own norm, as :class:`~gradclip.NormClip` does.
* **An optional threshold schedule** (not in the paper; ``schedule=``, see
  :mod:`gradclip.clippers.schedule`): a factor ``f_t`` of the step multiplies the
  thresholds applied, ``f_t · λ_abs`` in the warm-up and ``f_t · λ_rel · γ_i`` after
  it. γ is updated as without a schedule, from the norms clipped at ``λ_abs`` and
  ``λ_rel · γ_i``: fed the scheduled clipped norms, any ``f_t < 1 / λ_rel`` (0.95
  with the defaults) would shrink every γ geometrically, step after step.

Defaults: λ_abs = 1.0, λ_rel = 1.05, β = 0.98, T = 100, eps = 1e-6. λ_rel, β and T are
those of the public ``pytorch_optimizer`` port; the paper's text was not available to
check them. The authors' released code agrees on T = 100, eps = 1e-6 and a warm-up
threshold of 1.0 (its ``--clip-grad``), but defaults to λ_rel = 1.04 and β = 0.99.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradclip._params import ParamsLike, check_threshold
from gradclip.clippers._ema import (
    check_above_one,
    check_steps,
    check_unit_interval,
    gather,
    present,
    scale_each_,
    scatter,
)
from gradclip.clippers.base import GroupResult, ParamGroup, ScheduledClipper, State
from gradclip.clippers.schedule import Schedule
from gradclip.functional import scale_grads_
from gradclip.norms import total_norm_of


class AdaGC(ScheduledClipper):
    """Adaptive per-tensor gradient clipping (AdaGC, Wang et al., 2025).

    Each tensor is clipped to ``lambda_rel`` times an exponential moving average of its
    own past clipped norms, after a warm-up of global clipping at ``lambda_abs`` that
    sets each average to the smallest clipped norm seen. See the module docstring for
    the exact rule and where it differs from the paper.

    State, per parameter group: ``gamma``, a 1-D tensor with one entry per parameter of
    the group (``inf`` until the tensor has been seen with a nonzero gradient), on the
    gradients' device, in the norms' dtype (float32, float64 for float64 gradients).

    ``ClipStats.threshold`` is ``lambda_abs`` during the warm-up and afterwards the
    p-norm of the per-tensor bounds ``lambda_rel · γ_i`` (``inf`` while a tensor has no
    γ); ``clipped_norm`` is the p-norm of the per-tensor clipped norms.

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups (each may
            set any of the options below).
        lambda_abs: the global threshold of the warm-up, > 0. Default 1.0.
        lambda_rel: the relative threshold after the warm-up, > 1. Default 1.05.
        beta: the EMA coefficient, in (0, 1). Default 0.98.
        warmup_steps: the number of initial steps with global clipping, ≥ 0. Default 100.
        eps: added to norms before dividing, ≥ 0. Default 1e-6.
        schedule: a threshold schedule (a :class:`~gradclip.clippers.schedule.Schedule`
            or a string such as ``"cosine:1000"``) that multiplies the thresholds
            applied: ``λ_abs`` during the warm-up, every ``λ_rel · γ_i`` after it
            (:class:`~gradclip.clippers.schedule.RelaxOnCalm` watches the group's
            norm). γ never sees the scheduled value: it is updated with the norms
            clipped at the unscheduled thresholds, as without a schedule, so a factor
            below ``1 / λ_rel`` cannot drive it to zero.
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
        Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen. AdaGC: Enhancing LLM Pretraining
        Stability via Adaptive Gradient Clipping. ICML 2026, arXiv:2502.11034.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); b = torch.nn.Parameter(torch.zeros(1))
        >>> clipper = AdaGC([w, b], lambda_abs=1.0, warmup_steps=1)
        >>> w.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0])
        >>> clipper.clip_().threshold  # warm-up: global clipping at lambda_abs
        tensor(1.)
        >>> w.grad
        tensor([0.6000, 0.8000])
        >>> w.grad, b.grad = torch.tensor([30.0, 40.0]), torch.tensor([2.0])
        >>> stats = clipper.clip_()  # w is clipped to 1.05 × 1.0; b has no γ yet
        >>> w.grad, b.grad
        (tensor([0.6300, 0.8400]), tensor([2.]))
    """

    spec_name = "adagc"
    default_norm_kernel: ClassVar[str] = "blocked"
    warmup_counts_calls: ClassVar[bool] = True

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        eps: float = 1e-6,
        *,
        schedule: Schedule | str | None = None,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
        norm_kernel: str | None = None,
    ) -> None:
        defaults = {
            "lambda_abs": lambda_abs,
            "lambda_rel": lambda_rel,
            "beta": beta,
            "warmup_steps": warmup_steps,
            "eps": eps,
            "schedule": schedule,
        }
        super().__init__(
            params, defaults, norm_type=norm_type, nonfinite=nonfinite, norm_kernel=norm_kernel
        )

    def _check_options(self, group: ParamGroup) -> None:
        group["lambda_abs"] = check_threshold(group["lambda_abs"], "lambda_abs", allow_zero=False)
        group["lambda_rel"] = check_above_one(group["lambda_rel"], "lambda_rel")
        group["beta"] = check_unit_interval(group["beta"], "beta")
        group["warmup_steps"] = check_steps(group["warmup_steps"], "warmup_steps")
        group["eps"] = check_threshold(group["eps"], "eps")

    def _init_state(self, group: ParamGroup) -> State:
        return {"gamma": torch.full((len(group["params"]),), math.inf)}

    def _clip_group(
        self, group: ParamGroup, state: State, grads: list[Tensor], norms: Tensor
    ) -> GroupResult:
        p, eps = self.norm_type, group["eps"]
        index = present(group)
        gamma_all = state["gamma"].to(norms.dtype)
        gamma = gather(gamma_all, index)
        total_norm = total_norm_of(norms, p)
        # γ sees the norms clipped at the unscheduled thresholds (`seen`); the gradients
        # are clipped at the scheduled ones (the same tensors without a schedule).
        if self.step <= group["warmup_steps"]:
            unscheduled = torch.full_like(total_norm, group["lambda_abs"])
            threshold = self._scheduled(group, unscheduled, total_norm)
            scale = torch.clamp(threshold / (total_norm + eps), max=1.0)
            scale_grads_(grads, scale)
            seen = norms * (
                scale
                if threshold is unscheduled
                else torch.clamp(unscheduled / (total_norm + eps), max=1.0)
            )
            # The running minimum of the clipped norms; a zero norm carries no scale.
            new_gamma = torch.where(seen > 0, torch.minimum(gamma, seen), gamma)
            clipped_norm, was_clipped, applied = total_norm * scale, scale < 1.0, scale
        else:
            unset = torch.isinf(gamma)  # no γ yet: left unclipped (inf bound)
            bounds = group["lambda_rel"] * gamma
            scheduled = self._scheduled(group, bounds, total_norm)
            factors = torch.clamp(scheduled / (norms + eps), max=1.0)
            scale_each_(grads, factors)
            clipped = norms * factors
            seen = (
                clipped
                if scheduled is bounds
                else norms * torch.clamp(bounds / (norms + eps), max=1.0)
            )
            beta = group["beta"]
            ema = beta * gamma + (1.0 - beta) * seen
            # A tensor without γ takes its first nonzero norm as γ.
            first = torch.where(seen > 0, seen, gamma)
            new_gamma = torch.where(unset, first, ema)
            threshold = total_norm_of(scheduled, p)
            clipped_norm = total_norm_of(clipped, p)
            was_clipped, applied = (factors < 1.0).any(), None
        finite = torch.isfinite(total_norm)
        state["gamma"] = scatter(gamma_all, index, self.keep_if_finite(finite, new_gamma, gamma))
        return GroupResult(threshold, clipped_norm, was_clipped, applied)
