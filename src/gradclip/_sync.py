"""The one place that decides whether a value may be read on the host.

gradclip never reads a device tensor on the host in the hot path (``.item()``,
``bool()``, ``float()`` wait for the device to finish). CPU tensors are the
exception: there is no device to wait for, so the functional API may branch on a
CPU value to skip a pass over memory that would change nothing (scaling by 1).

``branch_on_host`` is a module attribute so the sync tests can turn the CPU
shortcut off and check that the accelerator path never reads a tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

branch_on_cpu: bool = True
"""Allow host branches on CPU tensors. Tests set it to False to exercise the sync-free path."""


def branch_on_host(tensors: Iterable[Tensor]) -> bool:
    """Whether a host branch is free: every tensor is on the CPU (and the shortcut is on)."""
    return branch_on_cpu and all(t.device.type == "cpu" for t in tensors)
