"""The one place that decides whether a value may be read on the host.

gradclip never reads a device tensor on the host in the hot path (``.item()``,
``bool()``, ``float()`` wait for the device to finish). CPU tensors are the
exception: there is no device to wait for, so the functional API may branch on a
CPU value to skip a pass over memory that would change nothing (scaling by 1).

``branch_on_host`` is a module attribute so the sync tests can turn the CPU
shortcut off and check that the accelerator path never reads a tensor.

The other direction matters too: ``torch.tensor(values, device=cuda)`` copies from
host memory, and a blocking host-to-device copy waits for the device's stream.
:func:`index_on` and :func:`values_on` build small constant tensors on the device
itself (no copy) and cache them, so a step that needs the same indices as the last
one (a permutation by shape, positions of sharded tensors) only looks them up.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import Tensor

branch_on_cpu: bool = True
"""Allow host branches on CPU tensors. Tests set it to False to exercise the sync-free path."""

CACHE_SIZE = 256
"""Distinct (device, values) constants kept by :func:`index_on` and :func:`values_on`."""


def branch_on_host(tensors: Iterable[Tensor]) -> bool:
    """Whether a host branch is free: every tensor is on the CPU (and the shortcut is on)."""
    return branch_on_cpu and all(t.device.type == "cpu" for t in tensors)


@functools.lru_cache(maxsize=CACHE_SIZE)
def index_on(device: torch.device, index: tuple[int, ...]) -> Tensor:
    """``torch.tensor(index, device=device)`` (int64), without a host-to-device copy.

    Off the CPU the tensor is gathered on the device from 0-d views of an
    ``arange``, and the result is cached: callers must not modify it in place.

    >>> index_on(torch.device("cpu"), (2, 0, 1))
    tensor([2, 0, 1])
    """
    if device.type == "cpu":
        return torch.tensor(index, dtype=torch.int64)
    return _gather_index(device, index)


@functools.lru_cache(maxsize=CACHE_SIZE)
def values_on(device: torch.device, dtype: torch.dtype, values: tuple[float, ...]) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, without a host-to-device copy.

    Off the CPU each value is a fill on the device (a kernel argument, not a copy);
    the result is cached: callers must not modify it in place.

    >>> values_on(torch.device("cpu"), torch.float64, (0.5, 2.0))
    tensor([0.5000, 2.0000], dtype=torch.float64)
    """
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return _fill_values(device, dtype, values)


def _gather_index(device: torch.device, index: tuple[int, ...]) -> Tensor:
    """:func:`index_on`'s device-side construction (any device, uncached)."""
    if not index:
        return torch.empty(0, dtype=torch.int64, device=device)
    positions = torch.arange(max(index) + 1, device=device).unbind(0)
    return torch.stack([positions[i] for i in index])


def _fill_values(device: torch.device, dtype: torch.dtype, values: tuple[float, ...]) -> Tensor:
    """:func:`values_on`'s device-side construction (any device, uncached)."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.stack([torch.full((), v, dtype=dtype, device=device) for v in values])
