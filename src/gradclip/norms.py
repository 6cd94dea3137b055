"""Gradient norms: per tensor, in total, and per unit, in one pass and without host sync.

The norms are computed once per step and shared by every consumer (the clipping
strategy, the monitor, the non-finite check). Two differences from
``torch.nn.utils.get_total_norm``, both deliberate:

* **fp32 accumulation.** Norms of ``float16``/``bfloat16`` tensors are accumulated and
  returned in ``float32`` (``float64`` tensors stay ``float64``). torch returns a
  ``bfloat16`` norm for ``bfloat16`` gradients, which carries 3 significant digits.
* **Global norms for DTensors.** For DTensor gradients (FSDP2, tensor parallel) the
  result is the norm of the whole, unsharded tensor as a plain tensor, identical on
  every rank: the local p-th powers are summed over the sharded mesh dimensions (the
  maximum for ``inf``) with one all-reduce per mesh and sharding pattern. A NaN on
  any rank's shard makes that norm NaN on every rank. DTensor and plain gradients
  may be mixed, and DTensors may live on different meshes; torch raises in both
  cases. An empty shard (fewer rows than ranks) counts as 0, for ``inf`` too.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradclip._foreach import Groups, group_tensors, use_foreach
from gradclip._params import ParamsLike, check_norm_type, check_tensors, collect_grads
from gradclip._sync import index_on

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "get_total_norm",
    "globalize_norms",
    "grad_norm",
    "tensor_norms",
    "total_norm_of",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The (real) dtype norms of ``dtype`` tensors are accumulated and returned in.

    >>> accumulation_dtype(torch.bfloat16)
    torch.float32
    >>> accumulation_dtype(torch.float64), accumulation_dtype(torch.complex128)
    (torch.float64, torch.float64)
    """
    return torch.float64 if dtype in _DOUBLE else torch.float32


def norm_cast(dtype: torch.dtype) -> torch.dtype | None:
    """The ``dtype`` argument of a norm of ``dtype`` tensors: None where no cast is needed.

    Complex tensors take none: their norm (of the moduli) is already real, in the
    precision of their parts, and torch refuses a real ``dtype`` for them.

    >>> norm_cast(torch.float16), norm_cast(torch.float32), norm_cast(torch.complex64)
    (torch.float32, None, None)
    """
    accum = accumulation_dtype(dtype)
    return None if accum == dtype or dtype.is_complex else accum


_DOUBLE = (torch.float64, torch.complex128)


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``.

    Never imports torch.distributed: if its tensor module was not imported, no
    DTensor can exist.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def any_dtensor(tensors: Iterable[Tensor], *, types: Collection[type] = ()) -> bool:
    """Whether any of ``tensors`` is a DTensor (one test per distinct type).

    ``types``, if the caller already has them, are the distinct types of ``tensors``.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(
        issubclass(t, module.DTensor) for t in (types or set(map(type, tensors)))
    )


def tensor_norms(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    groups: Groups | None = None,
) -> Tensor:
    """The p-norm of each tensor, as one 1-D tensor.

    Tensors are grouped by device and dtype and each group takes one fused
    ``torch._foreach_norm`` call (one read of the memory). The result lives on the
    device of the first tensor, in ``float32`` (``float64`` if any tensor is
    ``float64`` or ``complex128``). A complex tensor's norm is that of its moduli.

    Args:
        tensors: the tensors; plain tensors and DTensors may be mixed.
        norm_type: p > 0, or ``inf``.
        foreach: as in ``torch.nn.utils``: ``None`` uses the fused kernels where the
            device has them, ``True`` requires them, ``False`` loops.
        groups: :func:`gradclip._foreach.group_tensors` of ``tensors``, if the caller
            already has it (ignored when there are DTensors).

    Returns:
        A tensor of shape ``(len(tensors),)``; entry ``i`` is ``‖tensors[i]‖_p``,
        the global norm for a DTensor.

    Raises:
        RuntimeError: ``foreach=True`` on a device without fused kernels.

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.ones(4)])
        tensor([5., 2.])
    """
    p = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0)
    if not any_dtensor(tensors):
        return _local_norm_vector(tensors, p, foreach, groups)
    local, reductions = _layout(tensors)
    if math.isinf(p):
        # A shard can be empty (fewer rows than ranks), and torch's inf-norm has no
        # identity for it: the largest of no absolute values is 0 here.
        local = [t if t.numel() else t.new_zeros(1) for t in local]
    norms = _local_norm_vector(local, p, foreach, None)
    return _reduce(norms, reductions, p)


def stack_norms(norms: Sequence[Tensor], like: Sequence[Tensor]) -> Tensor:
    """Stack 0-d norms on the device of ``like[0]``, in the accumulation dtype of ``like``."""
    device = like[0].device
    dtype = torch.float64 if any(t.dtype in _DOUBLE for t in like) else torch.float32
    moved = [n if n.device == device else n.to(device) for n in norms]
    return torch.stack(moved).to(dtype)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a pending Partial sum is reduced first), else ``tensor``."""
    if not is_dtensor(tensor):
        return tensor
    dt: DTensor = tensor  # type: ignore[assignment]
    if any(pl.is_partial() for pl in dt.placements):
        from torch.distributed.tensor import Replicate

        replicated = [Replicate() if pl.is_partial() else pl for pl in dt.placements]
        dt = dt.redistribute(dt.device_mesh, replicated)
    return dt.to_local()


def local_views(tensors: list[Tensor], *, linear: bool = True) -> list[Tensor]:
    """``tensors`` with DTensors replaced by their local shards, for in-place elementwise ops.

    A shard shares its DTensor's storage, so in-place changes reach the DTensor. Fused
    in-place ops reject a list mixing DTensors and plain tensors (or a plain scale).
    ``linear`` ops (scaling, zeroing) may run on the summands of a Partial DTensor;
    otherwise (clamping) Partial DTensors are left as they are.
    """
    if not any_dtensor(tensors):
        return tensors
    module = sys.modules["torch.distributed.tensor"]

    def local(t: Tensor) -> Tensor:
        if isinstance(t, module.DTensor) and (
            linear or not any(pl.is_partial() for pl in t.placements)
        ):
            shard: Tensor = t.to_local()
            return shard
        return t

    return [local(t) for t in tensors]


def globalize_norms(tensors: Sequence[Tensor], local_norms: Tensor, norm_type: float) -> Tensor:
    """Turn norms of local shards into global norms, for the DTensors among ``tensors``.

    One all-reduce per (mesh, sharded mesh dims) group: the local norms' p-th powers
    are summed (maxed for inf) over the mesh dimensions a tensor is sharded on;
    replicated dimensions hold full copies and are not reduced. Entries of plain
    tensors are returned unchanged. Every rank must call this with the same tensors.
    """
    return _reduce(local_norms, _layout(tensors, local=False)[1], check_norm_type(norm_type))


Reductions = list[tuple[Any, tuple[int, ...], list[int]]]
"""``(mesh, sharded mesh dims, positions)``: the DTensors whose norms one all-reduce sums."""


def _layout(tensors: Sequence[Tensor], *, local: bool = True) -> tuple[list[Tensor], Reductions]:
    """One pass over ``tensors``: their local tensors (if ``local``) and their reductions.

    Per-tensor Python work is what a first call with thousands of DTensor gradients
    costs, so placements are inspected once per distinct placements tuple.
    """
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return list(tensors) if local else [], []
    dtensor = module.DTensor
    seen: dict[Any, tuple[tuple[int, ...], bool]] = {}  # placements -> (shard dims, partial)
    groups: dict[tuple[int, tuple[int, ...]], tuple[Any, list[int]]] = {}
    shards: list[Tensor] = []
    for i, t in enumerate(tensors):
        if not isinstance(t, dtensor):
            if local:
                shards.append(t)
            continue
        placements = t.placements
        layout = seen.get(placements)
        if layout is None:
            dims = tuple(d for d, pl in enumerate(placements) if pl.is_shard())
            layout = seen[placements] = dims, any(pl.is_partial() for pl in placements)
        dims, partial = layout
        if local:
            shards.append(local_tensor(t) if partial else t.to_local())
        if dims:
            mesh = t.device_mesh
            entry = groups.get((id(mesh), dims))
            if entry is None:
                entry = groups[id(mesh), dims] = (mesh, [])
            entry[1].append(i)
    return shards, [(mesh, dims, index) for (_, dims), (mesh, index) in groups.items()]


def _reduce(local_norms: Tensor, reductions: Reductions, p: float) -> Tensor:
    """:func:`globalize_norms` given the reductions of :func:`_layout`."""
    import torch.distributed as dist

    out = local_norms
    for mesh, shard_dims, index in reductions:
        where = index_on(local_norms.device, tuple(index))
        values = local_norms.index_select(0, where)
        if math.isinf(p):
            # gloo's MAX keeps or drops a NaN depending on which rank holds it, so
            # NaN travels as a separate flag (max of 0/1) in the same all-reduce.
            values = torch.cat([values, values.isnan().to(values.dtype)])
            for mesh_dim in shard_dims:
                dist.all_reduce(values, dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
            values, nan = values.chunk(2)
            values = torch.where(nan > 0, math.nan, values)
        else:
            values = values.pow(p)
            for mesh_dim in shard_dims:
                dist.all_reduce(values, dist.ReduceOp.SUM, group=mesh.get_group(mesh_dim))
            values = values.pow(1.0 / p)
        out = out.index_copy(0, where, values)
    return out


def total_norm_of(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors viewed as one vector.

    >>> total_norm_of(torch.tensor([3.0, 4.0]))
    tensor(5.)
    """
    total: Tensor = torch.linalg.vector_norm(norms, check_norm_type(norm_type))
    return total


def grouped_total_norm(norms: Tensor, norm_type: float, groups: Groups) -> Tensor:
    """:func:`total_norm_of` summed in torch's order: group by group (device, dtype).

    ``norms`` are in the caller's order and ``groups`` is
    :func:`gradclip._foreach.group_tensors` of the tensors. ``torch.nn.utils``
    concatenates the norms group by group before its final reduction; when dtypes or
    devices interleave, summing in the caller's order can differ from it in the last
    bit. The permutation is built on the device once and cached (no host copy).

    >>> a, b = torch.ones(1), torch.ones(1, dtype=torch.float64)
    >>> grouped_total_norm(torch.tensor([3.0, 4.0, 0.0]), 2.0, group_tensors([a, b, a]))
    tensor(5.)
    """
    if len(groups) > 1:
        order = [i for _, index in groups.values() for i in index]
        if order != sorted(order):
            norms = norms.index_select(0, index_on(norms.device, tuple(order)))
    return total_norm_of(norms, norm_type)


@torch.no_grad()
def get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.utils.get_total_norm``: the norm of all tensors as one vector.

    Differences from torch (see the module docstring): fp32 accumulation and result
    for half-precision tensors, and the global norm for DTensors as a plain tensor.

    Args:
        tensors: a tensor or an iterable of tensors (typically gradients).
        norm_type: p > 0, or ``inf``.
        error_if_nonfinite: raise if the norm is NaN or infinite (one host sync).
        foreach: see :func:`tensor_norms`.

    Returns:
        A 0-d tensor on the first tensor's device; ``tensor(0.)`` for no tensors.

    Raises:
        TypeError: an item is not a tensor or is sparse (naming ``tensors[i]``), or
            ``norm_type`` is not a number.
        ValueError: ``norm_type`` is not > 0.
        RuntimeError: ``error_if_nonfinite`` and the norm is not finite.

    Example:
        >>> get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    p = check_norm_type(norm_type)
    tensors = [tensors] if isinstance(tensors, Tensor) else check_tensors(tensors)
    if not tensors:
        return torch.tensor(0.0)
    if any_dtensor(tensors):  # torch has no order to match: it refuses these
        total = total_norm_of(tensor_norms(tensors, p, foreach=foreach), p)
    else:
        groups = group_tensors(tensors)
        total = grouped_total_norm(
            tensor_norms(tensors, p, foreach=foreach, groups=groups), p, groups
        )
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {p} of the tensors is non-finite ({total.item()}), "
            "so it cannot be clipped. To scale by the non-finite norm anyway, set "
            "error_if_nonfinite=False"
        )
    return total


@torch.no_grad()
def grad_norm(parameters: ParamsLike | torch.nn.Module, norm_type: float = 2.0) -> Tensor:
    """The total gradient norm of a model or of parameters, as a 0-d tensor.

    One call instead of the usual loop of ``p.grad.norm().item()`` (a host sync per
    parameter). Parameters without gradients are skipped.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> grad_norm(model)  # weight grad (1, 1), bias grad 1
        tensor(1.7321)
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = list(parameters.parameters())
    grads = collect_grads(parameters).grads
    return get_total_norm(grads, norm_type)


STACK_NORM_MAX_NUMEL = 1 << 12
"""CPU tensors up to this size that share a shape are stacked for one norm kernel.

Bit-identical to ``torch._foreach_norm`` (which on CPU is a loop of one reduction per
tensor): a reduction over fewer than ``at::internal::GRAIN_SIZE`` (32768) contiguous
elements runs serially, in the same order, whether it is a whole tensor or one row of
the stack. Above a few thousand elements the stacking copy costs more than it saves."""

STACK_NORM_MIN_COUNT = 4
"""Stack a shape only when this many tensors share it; fewer save too little."""

STACK_NORM_CHUNK_NUMEL = (1 << 15) - 1
"""Stack at most this many elements at a time: below torch's parallel grain size (32768)
the stack and the reduction run serially. A parallel region would wake a second thread
for a few microseconds of work, and on a busy machine waiting for it costs milliseconds."""

_SHAPE = operator.attrgetter("shape")


def _local_norm_vector(
    tensors: Sequence[Tensor], p: float, foreach: bool | None, groups: Groups | None
) -> Tensor:
    """Per-tensor norms of plain (local) tensors, in order, as one 1-D tensor.

    On the first tensor's device, in the accumulation dtype (``float64`` if any tensor
    is ``float64`` or ``complex128``, else ``float32``).
    """
    if groups is None:
        groups = group_tensors(tensors)
    if len(groups) == 1:  # the common case: one call, results already in order
        (((device, dtype), (group, _)),) = groups.items()
        return _group_norms(group, device, dtype, p, foreach)
    norms: list[Tensor] = [torch.empty(0)] * len(tensors)
    for (device, dtype), (group, index) in groups.items():
        for i, norm in zip(index, _group_norms(group, device, dtype, p, foreach).unbind(0)):
            norms[i] = norm
    return stack_norms(norms, tensors)


def _group_norms(
    group: list[Tensor], device: torch.device, dtype: torch.dtype, p: float, foreach: bool | None
) -> Tensor:
    """Norms of one (device, dtype) group, as a 1-D tensor in the accumulation dtype."""
    cast = norm_cast(dtype)
    if not use_foreach(group, device, foreach):
        return torch.stack([torch.linalg.vector_norm(t, p, dtype=cast) for t in group])
    if device.type == "cpu" and len(group) >= STACK_NORM_MIN_COUNT:
        return _cpu_group_norms(group, p, cast)
    return torch.stack(torch._foreach_norm(group, p, dtype=cast))


def _cpu_group_norms(group: list[Tensor], p: float, cast: torch.dtype | None) -> Tensor:
    """CPU norms: small same-shaped tensors stacked, the others by ``torch._foreach_norm``.

    On CPU a fused norm still costs one reduction call (about a microsecond) per
    tensor; for hundreds of small tensors a stacked reduction is several times faster.
    """
    shapes = list(map(_SHAPE, group))
    first = shapes[0]
    if shapes.count(first) == len(shapes):  # one shape: no reordering
        if _stackable(first, len(group)) and all(map(Tensor.is_contiguous, group)):
            return _stacked_norms(group, p, cast)
        return torch.stack(torch._foreach_norm(group, p, dtype=cast))
    by_shape: dict[torch.Size, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    parts: list[tuple[list[int], Tensor]] = []
    rest: list[int] = []
    for shape, index in by_shape.items():
        members = [group[i] for i in index]
        if _stackable(shape, len(index)) and all(map(Tensor.is_contiguous, members)):
            parts.append((index, _stacked_norms(members, p, cast)))
        else:
            rest += index
    if not parts:
        return torch.stack(torch._foreach_norm(group, p, dtype=cast))
    if rest:
        rest.sort()
        others = [group[i] for i in rest]
        parts.append((rest, torch.stack(torch._foreach_norm(others, p, dtype=cast))))
    out = torch.empty(len(group), dtype=parts[0][1].dtype)
    for index, norms in parts:
        out.index_copy_(0, torch.tensor(index), norms)
    return out


def _stackable(shape: torch.Size, count: int) -> bool:
    small = 0 < shape.numel() <= STACK_NORM_MAX_NUMEL
    return count >= STACK_NORM_MIN_COUNT and len(shape) > 0 and small


def _stacked_norms(tensors: list[Tensor], p: float, cast: torch.dtype | None) -> Tensor:
    """Norms of same-shaped, contiguous, small tensors: one stack and one reduction per chunk."""
    per_chunk = max(1, STACK_NORM_CHUNK_NUMEL // tensors[0].numel())  # >= 7 tensors
    chunks = []
    for start in range(0, len(tensors), per_chunk):
        stacked = torch.stack(tensors[start : start + per_chunk])
        dims = tuple(range(1, stacked.ndim))
        chunks.append(torch.linalg.vector_norm(stacked, p, dim=dims, dtype=cast))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
