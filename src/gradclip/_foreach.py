"""Grouping tensors for fused ``torch._foreach_*`` kernels, as ``torch.nn.utils`` does.

These helpers run on every clipping call, once per tensor, so they avoid per-tensor
Python work where a C-level pass does the same (``map`` over a type or attribute):
with hundreds of small gradients the bookkeeping otherwise costs as much as the kernels.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence

import torch
import torch.utils._foreach_utils as _foreach_utils
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
)

GroupKey = tuple[torch.device, torch.dtype]
Groups = dict[GroupKey, tuple[list[Tensor], list[int]]]
"""(device, dtype) -> (the group's tensors, their positions in the caller's list)."""


def use_foreach(
    tensors: Sequence[Tensor],
    device: torch.device,
    foreach: bool | None,
    *,
    types: Collection[type] = (),
) -> bool:
    """Torch's rule: ``None`` picks the fused kernels where supported; ``True`` insists.

    ``types``, if the caller already has them, are the distinct types of ``tensors``.

    Raises:
        RuntimeError: ``foreach=True`` on a device without fused kernels (torch's message).
    """
    if foreach is None:
        # torch's _has_foreach_support, with the type test done once per distinct type.
        supported = _foreach_utils._foreach_supported_types
        return _device_has_foreach_support(device) and all(
            t is type(None) or t in supported for t in (types or set(map(type, tensors)))
        )
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return foreach


def group_tensors(tensors: Sequence[Tensor]) -> Groups:
    """``tensors`` grouped by (device, dtype), in first-seen order, with their positions.

    One C++ pass (torch's own grouping); compute it once per call and pass it on.
    """
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    return {key: (lists[0], index) for key, (lists, index) in grouped.items()}  # type: ignore[misc]


def group_indices(tensors: Sequence[Tensor]) -> dict[GroupKey, list[int]]:
    """Positions of ``tensors`` grouped by (device, dtype), in first-seen order."""
    return {key: index for key, (_, index) in group_tensors(tensors).items()}


def mul_(
    tensors: Sequence[Tensor],
    factors: Sequence[Tensor] | Tensor,
    foreach: bool | None,
    *,
    groups: Groups | None = None,
) -> None:
    """``tensors[i] *= factors[i]`` (or a single 0-d ``factors``), one fused call per group.

    Factors may broadcast (a ``(rows, 1)`` factor scales the rows of a matrix).
    ``groups`` is :func:`group_tensors` of ``tensors``, if the caller already has it.
    """
    if groups is None:
        groups = group_tensors(tensors)
    for (device, _), (group, index) in groups.items():
        scale: Tensor | list[Tensor]
        if isinstance(factors, Tensor):
            scale = factors.to(device)
        else:
            scale = [factors[i] for i in index]
            if set(map(_DEVICE, scale)) != {device}:
                scale = [f.to(device) for f in scale]
        if use_foreach(group, device, foreach):
            torch._foreach_mul_(group, scale)
        else:
            for k, t in enumerate(group):
                t.mul_(scale if isinstance(scale, Tensor) else scale[k])


_DEVICE = operator.attrgetter("device")
