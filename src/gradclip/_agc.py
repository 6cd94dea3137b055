"""The unit-wise kernel of AGC: per-unit clip factors from weight and gradient norms.

A unit is a slice along dim 0 (a Linear row, a Conv output filter); tensors of
dimension ≤ 1 are one unit. Same-shaped small tensors are stacked so that a model of
many small layers costs a handful of kernel launches instead of a Python loop of
several passes per parameter. Reference: Brock et al. 2021, arXiv:2102.06171.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradclip import _sync
from gradclip._foreach import Groups, group_tensors, use_foreach
from gradclip.norms import accumulation_dtype, is_dtensor, local_tensor, tensor_norms

STACK_MAX_NUMEL = 1 << 16
"""Same-shaped tensors up to this many elements are stacked and processed together."""

STACK_CHUNK_NUMEL = (1 << 15) - 1
"""Tensors up to half this size are stacked and reduced in chunks of at most this many
elements: below torch's parallel grain size (32768) the kernels run serially. A parallel
region wakes a second thread for microseconds of work, and on a busy machine waiting
for it costs milliseconds. Each unit's norm is reduced serially either way, so the
chunking does not change any result."""

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
    views: list[Tensor] | None = None
    """``factors.unbind(0)``, when a :class:`Workspace` keeps it from step to step."""

    def factor_views(self) -> list[Tensor]:
        """One factor per gradient of the group (``factors[j]`` for ``index[j]``)."""
        return self.views if self.views is not None else list(self.factors.unbind(0))


class Workspace:
    """Buffers a stateful caller keeps from one step to the next, so steps allocate less.

    A stacked group's factors are written into a buffer made once per (device, dtype,
    shape, count) whose per-gradient views are made once too: ``unbind`` of a
    500-tensor stack costs about as much as scaling the 500 gradients. Not for shared
    use: the next step overwrites the buffers, so a step's :class:`UnitFactors` are
    valid until the next call with the same workspace.
    """

    MAX_BUFFERS = 64
    """Buffers kept at most; past it all are dropped (gradients present vary a lot)."""

    def __init__(self) -> None:
        self._factors: dict[tuple[torch.device, torch.dtype, torch.Size], list[Tensor]] = {}

    def factors(self, values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``values`` copied into the buffer of its shape, and that buffer's views."""
        key = (values.device, values.dtype, values.shape)
        entry = self._factors.get(key)
        if entry is None:
            if len(self._factors) >= self.MAX_BUFFERS:
                self._factors.clear()
            buffer = torch.empty_like(values, memory_format=torch.contiguous_format)
            entry = self._factors[key] = [buffer, *buffer.unbind(0)]
        entry[0].copy_(values)
        return entry[0], entry[1:]


def unit_clip_factors(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    clip_factor: float,
    eps: float,
    *,
    groups: Groups | None = None,
    workspace: Workspace | None = None,
) -> list[UnitFactors]:
    """AGC's per-unit factors for local (plain) tensors, one entry per group of same shape.

    Args:
        params: the weights W, one per gradient.
        grads: the gradients G, same shapes as ``params``.
        clip_factor: λ, the largest allowed ‖G_i‖ / max(‖W_i‖, eps).
        eps: the floor on weight norms.
        groups: :func:`gradclip._foreach.group_tensors` of ``grads``, if already known.
        workspace: buffers kept by the caller between steps (see :class:`Workspace`).
    """
    by_shape: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
    if groups is None:
        groups = group_tensors(grads)
    for (device, dtype), (members, index) in groups.items():
        shapes = list(map(_SHAPE, members))
        if shapes.count(shapes[0]) == len(shapes):  # one shape: no Python loop
            by_shape[(device, dtype, shapes[0])] = index
            continue
        for k, shape in zip(index, shapes):
            by_shape.setdefault((device, dtype, shape), []).append(k)
    out: list[UnitFactors] = []
    for (_, dtype, shape), index in by_shape.items():
        accum = accumulation_dtype(dtype)
        if len(index) > 1 and torch.Size(shape).numel() <= STACK_MAX_NUMEL:
            ws = [params[k] for k in index]
            gs = [grads[k] for k in index]
            # Dim 0 stacks the tensors; units are rows of matrices, whole vectors, and
            # for 0-d tensors each stacked element.
            if shape:
                dims = tuple(range(2, len(shape) + 1)) if len(shape) > 1 else (1,)
                w_norm = _stacked_unit_norms(ws, dims, accum).to(accum)
                g_norm = _stacked_unit_norms(gs, dims, accum)
            else:
                w_norm = torch.stack(ws).abs().to(accum)
                g_norm = torch.stack(gs).abs().to(accum)
            factors, g_norm, bounds = _factor_from_norms(w_norm, g_norm, clip_factor, eps)
            squares = g_norm.square().reshape(len(index), -1).sum(1)
            views = None
            if workspace is not None:
                factors, views = workspace.factors(factors)
            out.append(UnitFactors(index, factors, squares, g_norm, bounds, views))
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


def caller_order(units: Sequence[UnitFactors]) -> Tensor | None:
    """The permutation back to the caller's tensor order, or None if no reordering is needed.

    Per-tensor values come concatenated unit group by unit group (by shape);
    ``values.index_select(0, caller_order(units))`` puts them in the caller's order.
    The permutation lives on the device of ``units[0]``; it is built there (no
    host-to-device copy) once per device and order, then cached, so do not modify it.
    """
    order = [k for u in units for k in u.index]
    if order == sorted(order):
        return None
    return _inverse_permutation(units[0].squares.device, tuple(order))


@functools.lru_cache(maxsize=_sync.CACHE_SIZE)
def _inverse_permutation(device: torch.device, order: tuple[int, ...]) -> Tensor:
    """``torch.tensor(order).argsort()`` on ``device``, for a permutation ``order``."""
    inverse = [0] * len(order)
    for position, k in enumerate(order):
        inverse[k] = position
    return _sync.index_on(device, tuple(inverse))


def norms_from_units(
    units: Sequence[UnitFactors],
    inverse: Tensor | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Each tensor's L2 norm (of its local piece), ``sqrt(Σ_i ‖G_i‖²)``, in caller order.

    ``inverse`` is :func:`caller_order` of ``units``; ``dtype``, if given, is the
    dtype the squares are summed into before the root.
    """
    squares = torch.cat([u.squares.to(device) for u in units])
    if inverse is not None:
        squares = squares.index_select(0, inverse.to(device))
    return (squares if dtype is None else squares.to(dtype)).sqrt()


def scale_units_(grads: Sequence[Tensor], units: Sequence[UnitFactors]) -> None:
    """Multiply each gradient's units by their factors, in place (``units`` index ``grads``).

    On CPU, gradients whose factors are all exactly 1 are skipped (``x * 1 == x``);
    elsewhere every gradient is multiplied, without reading the factors on the host.
    A unit group's gradients share a device and dtype, so the fused calls need no
    second grouping pass.
    """
    calls: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    on_host = _sync.branch_on_host([u.factors for u in units])
    for group in units:
        positions = group.index
        needed: list[bool] | None = None
        if on_host:
            needed = group.factors.reshape(len(positions), -1).ne(1.0).any(1).tolist()
            if not any(needed):
                continue
        views = group.factor_views()
        if needed is not None and not all(needed):
            positions = [k for k, need in zip(positions, needed) if need]
            views = [v for v, need in zip(views, needed) if need]
        first = grads[group.index[0]]
        if group.factors.device != first.device:
            views = [v.to(first.device) for v in views]
        targets, factors = calls.setdefault((first.device, first.dtype), ([], []))
        targets += [grads[k] for k in positions]
        factors += views
    for (device, _), (targets, factors) in calls.items():
        if use_foreach(targets, device, None):
            torch._foreach_mul_(targets, factors)
        else:
            for target, factor in zip(targets, factors):
                target.mul_(factor)


def sharded_unit_clip_factors(
    params: Sequence[Tensor], grads: Sequence[Tensor], clip_factor: float, eps: float
) -> list[UnitFactors]:
    """:func:`unit_clip_factors` for DTensors (plain tensors may be mixed in).

    The rows of a matrix sharded on dim 0 (FSDP2's ``Shard(0)``) or replicated lie
    whole in the local shard: their factors are computed locally. A vector is one
    unit, and a sharded vector (a bias, a norm layer's weight) is split across ranks:
    its weight and gradient norms are reduced globally (one all-reduce per mesh and
    sharding pattern), and every rank applies the same factor to its piece. For such
    a vector, ``squares``, ``unit_norms`` and ``bounds`` are the local piece's share
    (``bounds`` apportioned by element count), so that summing their squares over
    the ranks, as :func:`gradclip.norms.globalize_norms` does, gives the global value.
    The caller has checked that no unit is split otherwise (``Shard(d)``, d > 0, or
    ``Partial`` weights). Every rank must call this with the same tensors.
    """
    local_params = [local_tensor(p) for p in params]
    local_grads = [local_tensor(g) for g in grads]
    split = [k for k, g in enumerate(grads) if g.ndim == 1 and _is_sharded(g)]
    if not split:
        return unit_clip_factors(local_params, local_grads, clip_factor, eps)
    chosen = set(split)
    whole = [k for k in range(len(grads)) if k not in chosen]
    out = [
        dataclasses.replace(u, index=[whole[j] for j in u.index])
        for u in unit_clip_factors(
            [local_params[k] for k in whole], [local_grads[k] for k in whole], clip_factor, eps
        )
    ]
    count = len(split)
    global_norms = tensor_norms([*(params[k] for k in split), *(grads[k] for k in split)])
    w_norm, g_norm = global_norms[:count], global_norms[count:]
    factors, _, bounds = _factor_from_norms(w_norm, g_norm, clip_factor, eps)
    local_norms = tensor_norms([local_grads[k] for k in split]).to(g_norm.dtype)
    fractions = tuple(local_grads[k].numel() / max(1, grads[k].numel()) for k in split)
    share = _sync.values_on(g_norm.device, g_norm.dtype, fractions).sqrt()
    out.append(
        UnitFactors(
            split,
            factors.unsqueeze(1),
            local_norms.square(),
            local_norms.unsqueeze(1),
            (bounds * share).unsqueeze(1),
        )
    )
    return out


def _is_sharded(tensor: Tensor) -> bool:
    return is_dtensor(tensor) and any(pl.is_shard() for pl in tensor.placements)  # type: ignore[attr-defined]


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
        w_norm = torch.linalg.vector_norm(w, 2, dim=dims, keepdim=True, dtype=_cast(w, accum))
        w_norm = w_norm.to(accum)
        g_norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=True, dtype=_cast(g, accum))
    return _factor_from_norms(w_norm, g_norm, clip_factor, eps)


def _factor_from_norms(
    w_norm: Tensor, g_norm: Tensor, clip_factor: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_factor` given the unit norms of W and G."""
    max_norm = w_norm.clamp_min(eps).mul_(clip_factor)
    factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)
    return factor, g_norm, max_norm


def _stacked_unit_norms(tensors: list[Tensor], dims: tuple[int, ...], accum: torch.dtype) -> Tensor:
    """Unit norms of same-shaped tensors, stacked along a new dim 0 (keepdim), in ``accum``.

    Complex tensors give the norms of their moduli, in the precision of their parts.
    """
    cast = _cast(tensors[0], accum)
    per_chunk = STACK_CHUNK_NUMEL // max(1, tensors[0].numel())
    if per_chunk < 2:  # large tensors: one stack (its rows still reduce serially)
        per_chunk = len(tensors)
    norms = [
        torch.linalg.vector_norm(
            torch.stack(tensors[start : start + per_chunk]), 2, dim=dims, keepdim=True, dtype=cast
        )
        for start in range(0, len(tensors), per_chunk)
    ]
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _cast(tensor: Tensor, accum: torch.dtype) -> torch.dtype | None:
    """The ``dtype`` argument of a norm in ``accum``: None for a complex tensor (already real)."""
    return None if tensor.is_complex() else accum


_SHAPE = operator.attrgetter("shape")
