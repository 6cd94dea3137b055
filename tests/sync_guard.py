"""A reusable guard that fails on host synchronisation.

Reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``,
``if t > x:``) waits for the device to finish; so do ops whose output shape depends on
the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``) and
device-to-host copies. On a CPU-only machine nothing actually waits, but every one of
these still dispatches to a recognisable aten op, so the guard can catch them here.

Host-to-device copies count too: torch makes a blocking copy wait for the device's
stream, and a per-step copy is a per-step wait. The guard fails on a copy from the
CPU to any other device (``meta`` included, which stands in for an accelerator in
CPU-only tests) and on ``torch.tensor(data, device=...)``/``torch.as_tensor`` off the
CPU, unless the copied value is a 0-d tensor made from a Python number
(``torch.tensor(0.5)``, ``torch.scalar_tensor(2)``): a constant rather than data, which
code commonly builds this way; a 0-d tensor computed on the CPU and a tensor of
several values (an index, a permutation) are caught::

    from sync_guard import no_host_sync

    with no_host_sync():
        gradclip.clip_grad_norm_(params, 1.0)  # raises HostSyncError on a sync

Run the code under test with ``gradclip._sync.branch_on_cpu = False`` (the
``no_cpu_branch`` fixture) so it takes the path it takes on accelerators.

Violations raise :class:`HostSyncError` at the offending op, and are also recorded and
re-raised when the block exits, so code that swallows exceptions cannot hide them.
"""

from __future__ import annotations

import weakref
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

# Ops whose 0-d CPU outputs hold a Python number (torch.tensor(0.5), torch.scalar_tensor(2)):
# copying those to a device is tolerated.
FROM_PYTHON_NUMBER_OPS = {aten.lift_fresh, aten.lift_fresh_copy, aten.scalar_tensor}

# Tensor factories that copy Python data to the requested device without a visible copy op.
FACTORIES = ("tensor", "as_tensor")

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
        # id -> weak reference of 0-d CPU tensors made from Python numbers.
        self._numbers: dict[int, weakref.ref[torch.Tensor]] = {}

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
            self._check_host_to_device(func, args, kwargs)
        out = func(*args, **kwargs)
        if packet in FROM_PYTHON_NUMBER_OPS and _is_cpu_scalar(out):
            self._numbers[id(out)] = weakref.ref(out)
        return out

    def _check_device_to_host(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """A copy from an accelerator to the CPU waits for the device (no-op on CPU-only runs)."""
        if func.overloadpacket == aten._to_copy:
            src, device = args[0], kwargs.get("device")
            dst_is_cpu = device is not None and torch.device(device).type == "cpu"
        else:
            dst, src = args[0], args[1]
            dst_is_cpu = isinstance(dst, torch.Tensor) and dst.device.type == "cpu"
        src_on_device = isinstance(src, torch.Tensor) and src.device.type != "cpu"
        if dst_is_cpu and src_on_device:
            self._fail(f"device-to-host copy: aten.{func.__name__}")

    def _check_host_to_device(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """A blocking copy from the CPU to a device waits for the device's stream.

        Tolerated for a 0-d tensor made from a Python number (see the module docstring).
        """
        if func.overloadpacket == aten._to_copy:
            src, device = args[0], kwargs.get("device")
            dst_on_device = device is not None and torch.device(device).type != "cpu"
        else:
            dst, src = args[0], args[1]
            dst_on_device = isinstance(dst, torch.Tensor) and dst.device.type != "cpu"
        src_is_cpu = isinstance(src, torch.Tensor) and src.device.type == "cpu"
        if dst_on_device and src_is_cpu and not self._is_python_number(src):
            shape = tuple(src.shape)
            self._fail(f"host-to-device copy of a tensor of shape {shape}: aten.{func.__name__}")

    def _is_python_number(self, tensor: torch.Tensor) -> bool:
        ref = self._numbers.get(id(tensor))
        return ref is not None and ref() is tensor


def _is_cpu_scalar(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 0 and x.device.type == "cpu"


def _is_number(x: object) -> bool:
    return isinstance(x, bool | int | float | complex)


def _checked_factory(mode: NoHostSyncMode, name: str) -> Callable[..., Any]:
    """``torch.tensor``/``torch.as_tensor`` that fail when they copy host data to a device.

    Off the CPU they copy without dispatching a copy op the mode could see (on
    ``meta`` nothing at all is dispatched), so the check is made on the arguments.
    """
    factory = getattr(torch, name)

    def checked(data: Any, *args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device", args[1] if name == "as_tensor" and len(args) > 1 else None)
        if device is None and not isinstance(data, torch.Tensor):
            device = torch.get_default_device()
        on_device = device is not None and torch.device(device).type != "cpu"
        if on_device and not isinstance(data, torch.Tensor) and not _is_number(data):
            mode._fail(
                f"host-to-device copy: torch.{name}(<{type(data).__name__}>, device={device})"
            )
        return factory(data, *args, **kwargs)

    return checked


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
        for name in FACTORIES:
            stack.enter_context(patch.object(torch, name, _checked_factory(mode, name)))
        stack.enter_context(mode)
        yield mode
    if mode.violations:
        raise HostSyncError("; ".join(mode.violations))


def assert_no_host_sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` under :func:`no_host_sync` and return its result."""
    with no_host_sync():
        return fn(*args, **kwargs)
