"""The unit-wise kernel of AGC: per-unit clip factors from weight and gradient norms.

A unit is a slice along dim 0 (a Linear row, a Conv output filter); tensors of
dimension ≤ 1 are one unit. Same-shaped small tensors are stacked so that a model of
many small layers costs a handful of kernel launches instead of a Python loop of
several passes per parameter. Reference: Brock et al. 2021, arXiv:2102.06171.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradclip.norms import accumulation_dtype

STACK_MAX_NUMEL = 1 << 16
"""Same-shaped tensors up to this many elements are stacked and processed together."""

GRAD_NORM_FLOOR = 1e-6
"""The floor on ‖G_i‖ in the division, as in the paper's reference code."""


@dataclass(frozen=True)
class UnitFactors:
    """AGC's factors for a group of same-shaped gradients.

    Attributes:
        index: positions of the group's gradients in the caller's list.
        factors: shape ``(len(index), units, 1, ...)``; ``factors[j]`` broadcasts
            against gradient ``index[j]`` and is 1 for units within the bound.
        squares: shape ``(len(index),)``, each gradient's squared L2 norm before
            clipping, in the accumulation dtype.
        unit_norms: ‖G_i‖ per unit before clipping, the shape of ``factors``.
        bounds: λ·max(‖W_i‖, eps) per unit, the shape of ``factors`` (the clipped
            unit norm is ``unit_norms * factors``; both serve stateful AGC's stats).
    """

    index: list[int]
    factors: Tensor
    squares: Tensor
    unit_norms: Tensor
    bounds: Tensor


def unit_clip_factors(
    params: Sequence[Tensor], grads: Sequence[Tensor], clip_factor: float, eps: float
) -> list[UnitFactors]:
    """AGC's per-unit factors for local (plain) tensors, one entry per group of same shape.

    Args:
        params: the weights W, one per gradient.
        grads: the gradients G, same shapes as ``params``.
        clip_factor: λ, the largest allowed ‖G_i‖ / max(‖W_i‖, eps).
        eps: the floor on weight norms.
    """
    groups: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], list[int]] = {}
    for k, g in enumerate(grads):
        groups.setdefault((g.device, g.dtype, tuple(g.shape)), []).append(k)
    out: list[UnitFactors] = []
    for (_, dtype, shape), index in groups.items():
        accum = accumulation_dtype(dtype)
        if len(index) > 1 and torch.Size(shape).numel() <= STACK_MAX_NUMEL:
            w = torch.stack([params[k] for k in index])
            g = torch.stack([grads[k] for k in index])
            # Dim 0 stacks the tensors; units are rows of matrices, whole vectors, and
            # for 0-d tensors each stacked element.
            dims = tuple(range(2, g.ndim)) if len(shape) > 1 else (1,) if shape else None
            factors, g_norm, bounds = _factor(
                w, g, dims, clip_factor, eps, accum, elementwise=not shape
            )
            squares = g_norm.square().reshape(len(index), -1).sum(1)
            out.append(UnitFactors(index, factors, squares, g_norm, bounds))
        else:
            for k in index:
                g = grads[k]
                unit_dims = tuple(range(1, g.ndim)) if g.ndim > 1 else None
                factors, g_norm, bounds = _factor(params[k], g, unit_dims, clip_factor, eps, accum)
                squares = g_norm.square().sum().reshape(1)
                out.append(
                    UnitFactors(
                        [k], factors.unsqueeze(0), squares, g_norm.unsqueeze(0), bounds.unsqueeze(0)
                    )
                )
    return out


def _factor(
    w: Tensor,
    g: Tensor,
    dims: tuple[int, ...] | None,
    clip_factor: float,
    eps: float,
    accum: torch.dtype,
    *,
    elementwise: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Branch-free: ``λ·max(‖W_i‖, eps) / max(‖G_i‖, 1e-6)`` where over the bound, else 1.

    Returns the factor, ``‖G_i‖`` and the bound ``λ·max(‖W_i‖, eps)`` (all keepdim,
    broadcastable to ``g``).
    """
    if elementwise:  # a stack of 0-d tensors: each element is its own unit
        w_norm, g_norm = w.abs().to(accum), g.abs().to(accum)
    else:
        w_norm = torch.linalg.vector_norm(w, 2, dim=dims, keepdim=True, dtype=accum)
        g_norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=True, dtype=accum)
    max_norm = w_norm.clamp_min(eps).mul_(clip_factor)
    factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)
    return factor, g_norm, max_norm
