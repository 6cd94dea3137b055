"""A reusable guard that fails on host synchronisation.

Reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``if t > x:``) waits for the device to finish; so do ops whose output shape depends on
the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``) and
device-to-host copies. On a CPU-only machine nothing actually waits, but every one of
these still dispatches to a recognisable aten op, so the guard can catch them here::

    from sync_guard import no_host_sync

    with no_host_sync():
        gradclip.clip_grad_norm_(params, 1.0)  # raises HostSyncError on a sync

Run the code under test with ``gradclip._sync.branch_on_cpu = False`` (the
``no_cpu_branch`` fixture) so it takes the path it takes on accelerators.

Violations raise :class:`HostSyncError` at the offending op, and are also recorded and
re-raised when the block exits, so code that swallows exceptions cannot hide them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar
from unittest.mock import patch

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

T = TypeVar("T")

# Ops that return a host value computed from tensor data.
VALUE_READ_OPS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t), t.tolist()
    aten.is_nonzero,  # bool(t) (normally decomposed into _local_scalar_dense)
    aten.item,
    aten.equal,  # torch.equal returns a Python bool
    aten.allclose,
}

# Tensor methods that read CPU memory directly without dispatching an aten op.
UNDISPATCHED_READS = ("tolist", "numpy")

# Ops whose output shape depends on the values of their input.
DATA_DEPENDENT_SHAPE_OPS = {
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}

# Ops that become data-dependent when given boolean-mask indices (t[mask], t[mask] = v).
MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostSyncError(AssertionError):
    """Code under :func:`no_host_sync` read a tensor on the host or made a data-dependent shape.

    An ``AssertionError`` rather than a ``RuntimeError`` so that code catching
    ``RuntimeError`` does not swallow it by accident.
    """


def _is_bool_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


class NoHostSyncMode(TorchDispatchMode):
    """Dispatch mode raising :class:`HostSyncError` on host syncs; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def _fail(self, message: str) -> None:
        self.violations.append(message)
        raise HostSyncError(message)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in VALUE_READ_OPS:
            self._fail(f"host read of a tensor value: aten.{func.__name__}")
        if packet in DATA_DEPENDENT_SHAPE_OPS:
            self._fail(f"data-dependent output shape: aten.{func.__name__}")
        if func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._fail("data-dependent output shape: aten.repeat_interleave with tensor repeats")
        if packet in MASK_INDEX_OPS and len(args) > 1:
            indices = args[1] if isinstance(args[1], list | tuple) else [args[1]]
            if any(_is_bool_tensor(i) for i in indices):
                self._fail(f"boolean-mask indexing (data-dependent shape): aten.{func.__name__}")
        if packet in (aten._to_copy, aten.copy_):
            self._check_device_to_host(func, args, kwargs)
        return func(*args, **kwargs)

    def _check_device_to_host(self, func: Any, args: tuple[Any, ...], kwargs: dict) -> None:
        """A copy from an accelerator to the CPU waits for the device (no-op on CPU-only runs)."""
        if func.overloadpacket == aten._to_copy:
            src, device = args[0], kwargs.get("device")
            dst_is_cpu = device is not None and torch.device(device).type == "cpu"
        else:
            dst, src = args[0], args[1]
            dst_is_cpu = isinstance(dst, torch.Tensor) and dst.device.type == "cpu"
        src_on_device = isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
        if dst_is_cpu and src_on_device:
            self._fail(f"device-to-host copy: aten.{func.__name__}")


def _raising_method(mode: NoHostSyncMode, method: str) -> Callable[..., Any]:
    def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mode._fail(f"host read of a tensor value: Tensor.{method}()")

    return read


@contextmanager
def no_host_sync() -> Iterator[NoHostSyncMode]:
    """Fail on any host sync inside the block (also if the code under test swallowed it)."""
    mode = NoHostSyncMode()
    with ExitStack() as stack:
        for method in UNDISPATCHED_READS:
            stack.enter_context(
                patch.object(torch.Tensor, method, _raising_method(mode, method), create=False)
            )
        stack.enter_context(mode)
        yield mode
    if mode.violations:
        raise HostSyncError("; ".join(mode.violations))


def assert_no_host_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` under :func:`no_host_sync` and return its result."""
    with no_host_sync():
        return fn(*args, **kwargs)
