"""Grouping tensors for fused ``torch._foreach_*`` kernels, as ``torch.nn.utils`` does."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

GroupKey = tuple[torch.device, torch.dtype]


def use_foreach(tensors: Sequence[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Torch's rule: ``None`` picks the fused kernels where supported; ``True`` insists.

    Raises:
        RuntimeError: ``foreach=True`` on a device without fused kernels (torch's message).
    """
    if foreach is None:
        return _has_foreach_support(list(tensors), device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return foreach


def group_indices(tensors: Sequence[Tensor]) -> dict[GroupKey, list[int]]:
    """Positions of ``tensors`` grouped by (device, dtype), in first-seen order."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    return {key: index for key, (_, index) in grouped.items()}  # type: ignore[misc]


def mul_(
    tensors: Sequence[Tensor], factors: Sequence[Tensor] | Tensor, foreach: bool | None
) -> None:
    """``tensors[i] *= factors[i]`` (or a single 0-d ``factors``), one fused call per group.

    Factors may broadcast (a ``(rows, 1)`` factor scales the rows of a matrix).
    """
    for (device, _), index in group_indices(tensors).items():
        group = [tensors[i] for i in index]
        if isinstance(factors, Tensor):
            scale: Tensor | list[Tensor] = factors.to(device)
        else:
            scale = [factors[i].to(device) for i in index]
        if use_foreach(group, device, foreach):
            torch._foreach_mul_(group, scale)
        else:
            for k, t in enumerate(group):
                t.mul_(scale if isinstance(scale, Tensor) else scale[k])
