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

Two kernels compute L2 norms (``kernel=`` of :func:`tensor_norms`, ``norm_kernel=`` of
a clipper):

* ``"torch"`` (the default here, and of the clippers that stand in for torch's
  functions, such as :class:`~gradclip.NormClip`): torch's own norm kernels. Per-tensor
  norms and totals are bit-identical to ``torch.nn.utils.get_total_norm`` and
  ``clip_grad_norm_`` (same-shaped small tensors are stacked for one reduction, which
  gives the same bits).
* ``"blocked"`` (the default of the adaptive strategies: ZClip, AutoClip, EMARatio,
  AdaGC, whose thresholds come from norm statistics). On the CPU, torch's L2 kernel
  accumulates a whole float32 tensor in float32, without cascade summation, and is
  no faster with 2 threads than with 1. Its relative error against a float64
  reference, for ``randn(n) * 1e-3``: -1.1e-5 at n = 1M, -2.5e-4 at 8M, -2.7e-3 at
  38.6M (GPT-2's token embedding, 50257 x 768). The blocked kernel views each
  contiguous float32/float64 CPU tensor of at least
  :data:`~gradclip.norms.BLOCKED_MIN_NUMEL` elements as rows of
  :data:`~gradclip.norms.BLOCKED_ROW_NUMEL`, reduces every row (in float32, over one
  row only, rows in parallel) and sums the squared row norms in float64: its
  relative error is the float32 rounding of the result (at most 6e-8; 1.7e-8 on the
  38.6M tensor). It is faster too: on GPT-2-small gradients (148 float32 tensors,
  124M elements; torch 2.13, 2 CPU threads, median of 41 calls) the norm pass takes
  11.6 ms instead of 15.8 ms, about what a per-tensor ``torch.dot`` takes (11.5 ms,
  with a relative error of 3e-4 on the embedding) and near a plain sum of every
  tensor (10.4 ms, the memory-bandwidth floor). With 1 thread it takes 17.0 ms,
  torch's kernel 16.4 ms. On 500 tensors of 32 x 32 nothing changes (0.23 ms): all
  take torch's kernel. Every other norm (smaller tensors, other dtypes or devices,
  non-contiguous tensors, p other than 2) is torch's, bit-identical. A DTensor has
  its local shard reduced by the blocked kernel, then the reduction across ranks of
  ``"torch"``.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradclip._foreach import Groups, group_tensors, use_foreach
from gradclip._params import ParamsLike, check_norm_type, check_tensors, collect_grads
from gradclip._sync import index_on

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "NORM_KERNELS",
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


NORM_KERNELS = ("torch", "blocked")
"""The kernels :func:`tensor_norms` computes L2 norms with (see the module docstring)."""


def check_norm_kernel(kernel: object, name: str = "kernel") -> str:
    """``kernel`` if it is one of :data:`~gradclip.norms.NORM_KERNELS`.

    Raises:
        ValueError: any other value; the message names it (as ``name``) and the choices.
    """
    if not isinstance(kernel, str) or kernel not in NORM_KERNELS:
        choices = ", ".join(map(repr, NORM_KERNELS))
        raise ValueError(f"{name} must be one of {choices}; got {kernel!r}")
    return kernel


def tensor_norms(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    groups: Groups | None = None,
    kernel: str = "torch",
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
        kernel: ``"torch"`` (default): torch's norm kernels, bit-identical to
            ``torch.nn.utils``. ``"blocked"``: L2 norms of contiguous ``float32`` and
            ``float64`` CPU tensors (DTensors: their local shards) of at least
            :data:`~gradclip.norms.BLOCKED_MIN_NUMEL` elements are computed by rows,
            summed in ``float64``: faster, and far more accurate than torch's CPU
            kernel on large tensors (see the module docstring); these norms are not
            differentiable. Every other norm is torch's, whatever ``foreach`` says.

    Returns:
        A tensor of shape ``(len(tensors),)``; entry ``i`` is ``‖tensors[i]‖_p``,
        the global norm for a DTensor.

    Raises:
        RuntimeError: ``foreach=True`` on a device without fused kernels.
        ValueError: ``kernel`` is not one of :data:`~gradclip.norms.NORM_KERNELS`.

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.ones(4)])
        tensor([5., 2.])
        >>> tensor_norms([torch.full((1 << 16,), 0.5)], kernel="blocked")
        tensor([128.])
    """
    p = check_norm_type(norm_type)
    blocked = check_norm_kernel(kernel) == "blocked" and p == 2.0
    if not tensors:
        return torch.zeros(0)
    if not any_dtensor(tensors):
        return _local_norm_vector(tensors, p, foreach, groups, blocked)
    local, reductions = _layout(tensors)
    if math.isinf(p):
        # A shard can be empty (fewer rows than ranks), and torch's inf-norm has no
        # identity for it: the largest of no absolute values is 0 here.
        local = [t if t.numel() else t.new_zeros(1) for t in local]
    norms = _local_norm_vector(local, p, foreach, None, blocked)
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
    tensors: Sequence[Tensor],
    p: float,
    foreach: bool | None,
    groups: Groups | None,
    blocked: bool = False,
) -> Tensor:
    """Per-tensor norms of plain (local) tensors, in order, as one 1-D tensor.

    On the first tensor's device, in the accumulation dtype (``float64`` if any tensor
    is ``float64`` or ``complex128``, else ``float32``). ``blocked``: the blocked
    kernel for the L2 norms it applies to (the caller checked that p is 2).
    """
    if groups is None:
        groups = group_tensors(tensors)
    if len(groups) == 1:  # the common case: one call, results already in order
        (((device, dtype), (group, _)),) = groups.items()
        return _group_norms(group, device, dtype, p, foreach, blocked)
    norms: list[Tensor] = [torch.empty(0)] * len(tensors)
    for (device, dtype), (group, index) in groups.items():
        group_norms = _group_norms(group, device, dtype, p, foreach, blocked)
        for i, norm in zip(index, group_norms.unbind(0)):
            norms[i] = norm
    return stack_norms(norms, tensors)


def _group_norms(
    group: list[Tensor],
    device: torch.device,
    dtype: torch.dtype,
    p: float,
    foreach: bool | None,
    blocked: bool,
) -> Tensor:
    """Norms of one (device, dtype) group, as a 1-D tensor in the accumulation dtype."""
    cast = norm_cast(dtype)
    blocked = blocked and device.type == "cpu" and dtype in _BLOCKED_DTYPES
    if not use_foreach(group, device, foreach):

        def looped(tensors: list[Tensor]) -> Tensor:
            return torch.stack([torch.linalg.vector_norm(t, p, dtype=cast) for t in tensors])

        return _split_blocked(group, looped) if blocked else looped(group)
    if device.type == "cpu" and len(group) >= STACK_NORM_MIN_COUNT:
        return _cpu_group_norms(group, p, cast, blocked)

    def fused(tensors: list[Tensor]) -> Tensor:
        return torch.stack(torch._foreach_norm(tensors, p, dtype=cast))

    return _split_blocked(group, fused) if blocked else fused(group)


def _cpu_group_norms(
    group: list[Tensor], p: float, cast: torch.dtype | None, blocked: bool = False
) -> Tensor:
    """CPU norms: small same-shaped tensors stacked, the others by ``torch._foreach_norm``.

    On CPU a fused norm still costs one reduction call (about a microsecond) per
    tensor; for hundreds of small tensors a stacked reduction is several times faster.
    With ``blocked``, tensors of :data:`~gradclip.norms.BLOCKED_MIN_NUMEL` elements or more take the
    blocked kernel (decided once per shape: no per-tensor work for small tensors).
    """

    def fused(tensors: list[Tensor]) -> Tensor:
        return torch.stack(torch._foreach_norm(tensors, p, dtype=cast))

    shapes = list(map(_SHAPE, group))
    first = shapes[0]
    if shapes.count(first) == len(shapes):  # one shape: no reordering
        if _stackable(first, len(group)) and all(map(Tensor.is_contiguous, group)):
            return _stacked_norms(group, p, cast)
        if blocked and first.numel() >= BLOCKED_MIN_NUMEL:
            return _split_blocked(group, fused)
        return fused(group)
    by_shape: dict[torch.Size, list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    parts: list[tuple[list[int], Tensor]] = []
    large: list[int] = []
    rest: list[int] = []
    for shape, index in by_shape.items():
        members = [group[i] for i in index]
        if _stackable(shape, len(index)) and all(map(Tensor.is_contiguous, members)):
            parts.append((index, _stacked_norms(members, p, cast)))
        elif blocked and shape.numel() >= BLOCKED_MIN_NUMEL:
            for i, member in zip(index, members):
                (large if member.is_contiguous() else rest).append(i)
        else:
            rest += index
    if large:
        parts.append((large, _blocked_norms([group[i] for i in large])))
    if not parts:
        return fused(group)
    if rest:
        rest.sort()
        parts.append((rest, fused([group[i] for i in rest])))
    return _merged(len(group), parts)


def _merged(count: int, parts: list[tuple[list[int], Tensor]]) -> Tensor:
    """One 1-D tensor of ``count`` norms from parts of (positions, norms at them)."""
    out = torch.empty(count, dtype=parts[0][1].dtype)
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


# -- the blocked L2 kernel --------------------------------------------------------------

BLOCKED_MIN_NUMEL = 1 << 16
"""The blocked kernel's smallest tensor; smaller ones take torch's kernel (same bits).

The largest power of two below which torch's float32 CPU kernel is accurate enough
that ``"blocked"`` norms stay within 1e-6 of a float64 reference at every size:
measured on ``randn`` tensors, torch's relative error is at most 5e-7 up to 2^16
elements (median 1.8e-7 at 2^16), but 1.1e-6 at 2^17 and 1.3e-5 at 2^20; the
blocked kernel's stays below 1.3e-7 from 2^13 up. The price is speed just above
the threshold: the blocked kernel costs about two ops more per tensor, which torch's
single reduction outweighs only from about 2^17 (in cache) to 2^18 (from memory)
elements. Per tensor, 2 threads, torch vs blocked: 5.3 vs 6.8 us at 2^16 and 9.2 vs
8.9 us at 2^17 in cache; from memory, 11.0 vs 15.3 us at 2^16 and 35.1 vs 30.5 us at
2^18. Small tensors (biases, normalisation weights) never pay it: the check is made
once per shape."""

BLOCKED_ROW_NUMEL = 4096
"""The length of the rows the blocked kernel reduces in float32, each on its own.

Chosen by measurement on GPT-2-small gradients (2 threads, median of 41 calls of
:func:`tensor_norms`): rows of 2048, 4096, 8192 and 16384 elements took 9.05, 8.89,
8.85 and 8.83 ms, equal within the noise (the pass is bound by memory bandwidth), so
the row is the shortest that costs nothing: float32 rounding grows with the number of
terms summed in float32 (on constant data the blocked kernel's error is 2e-6 at 4096,
against 7e-3 for torch's kernel over 8M elements). 16 KiB: a row stays in the
first-level cache."""

_BLOCKED_DTYPES = (torch.float32, torch.float64)


def _split_blocked(group: list[Tensor], torch_norms: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """Norms of a CPU float32/float64 group: the blocked kernel where it applies.

    ``torch_norms`` computes the norms of the other tensors (in the accumulation dtype).
    """
    large = [i for i, t in enumerate(group) if t.numel() >= BLOCKED_MIN_NUMEL and t.is_contiguous()]
    if not large:
        return torch_norms(group)
    if len(large) == len(group):
        return _blocked_norms(group)
    chosen = set(large)
    rest = [i for i in range(len(group)) if i not in chosen]
    return _merged(
        len(group),
        [
            (large, _blocked_norms([group[i] for i in large])),
            (rest, torch_norms([group[i] for i in rest])),
        ],
    )


@torch.no_grad()
def _blocked_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norms of contiguous CPU tensors of one float dtype, each of at least one row.

    Each tensor is viewed as rows of :data:`~gradclip.norms.BLOCKED_ROW_NUMEL` elements and one
    reduction over the rows gives every row's norm (float accumulation over one row
    only, rows split between threads); the elements after the last full row make one
    more, shorter row. One ``index_add_`` sums each tensor's squared row norms in
    ``float64``; the square roots are returned in the tensors' dtype. Two small ops
    per tensor (four with a shorter row), no copy of the data.

    A ``bmm`` of ``(rows, 1, n)`` by ``(rows, n, 1)`` views (a BLAS dot per row) is as
    accurate, and was measured too: on GPT-2-small's 50 large gradients it is faster
    or slower than the row reduction depending on the machine's memory load (10.9 vs
    11.2 ms, then 9.0 vs 8.5 ms, 2 threads), slower with one thread (16.9 vs 16.1 ms)
    and slower in cache (110 vs 82 us for a 768 x 3072 tensor), where MKL's
    per-row setup shows.
    """
    row = BLOCKED_ROW_NUMEL
    layout, owner = _blocked_layout(tuple(map(Tensor.numel, tensors)), row)
    row_norms: list[Tensor] = []
    for t, (rows, tail) in zip(tensors, layout):
        row_norms.append(torch.linalg.vector_norm(t.as_strided((rows, row), (row, 1)), dim=1))
        if tail:
            end = t.as_strided((1, tail), (tail, 1), t.storage_offset() + rows * row)
            row_norms.append(torch.linalg.vector_norm(end, dim=1))
    squares = torch.cat(row_norms).to(torch.float64).square_()
    sums = torch.zeros(len(tensors), dtype=torch.float64).index_add_(0, owner, squares)
    return sums.sqrt_().to(tensors[0].dtype)


BlockedLayout = tuple[tuple[tuple[int, int], ...], Tensor]
"""Per tensor ``(full rows, elements after them)``, and the tensor each row norm is of."""


@functools.lru_cache(maxsize=64)
def _blocked_layout(numels: tuple[int, ...], row: int) -> BlockedLayout:
    """How :func:`_blocked_norms` splits tensors of these sizes into rows of ``row`` elements.

    A tensor has its full rows and, if elements are left, one shorter row; the owner
    tensor gives, for each row in that order, the position of its tensor. Cached: the
    sizes are the same at every step. The owner tensor is shared; callers must not
    modify it.
    """
    layout: list[tuple[int, int]] = []
    owner: list[int] = []
    for position, numel in enumerate(numels):
        rows, tail = divmod(numel, row)
        layout.append((rows, tail))
        owner += [position] * (rows + (tail > 0))
    return tuple(layout), torch.tensor(owner, dtype=torch.int64)
