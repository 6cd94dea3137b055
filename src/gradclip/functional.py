"""Stateless clipping: drop-in replacements for ``torch.nn.utils`` and unit-wise AGC.

``clip_grad_norm_``, ``clip_grads_with_norm_`` and ``clip_grad_value_`` take the
same arguments and give the same results as their ``torch.nn.utils`` namesakes,
with these documented differences:

* ``parameters`` may also be ``named_parameters()`` pairs (names appear in errors).
* Norms of half-precision gradients are accumulated and returned in fp32, and
  DTensor gradients give the global norm as a plain tensor (see :mod:`gradclip.norms`).
* Bad arguments raise ``ValueError``/``TypeError`` before anything is modified: a
  negative, NaN or infinite threshold, ``norm_type <= 0``, a non-tensor item, a
  sparse gradient, a ``total_norm`` that is not a one-element tensor, or an empty
  generator (torch warns and returns 0; an empty generator is almost always an
  exhausted ``model.parameters()``). A ``max_norm`` tensor stays a tensor, as in
  torch; its value is checked only on the CPU, since reading it from an
  accelerator would wait for the device.
* A ``nonfinite`` policy (``"ignore"``, ``"raise"``, ``"zero"``; see
  :mod:`gradclip.nonfinite`); torch's ``error_if_nonfinite=True`` means ``"raise"``.

Complex gradients are clipped by the norm of their moduli, as torch clips them
(bit-identical to it); AGC uses the moduli too. ``clip_grad_value_`` refuses them
as torch does (clamping a complex number is undefined): the kernel raises
``NotImplementedError``, as torch's does, possibly after clamping the gradients
before the complex one (checking every dtype first would cost the common case).

Speed: on CPU, when nothing needs clipping the scaling pass is skipped (scaling by
exactly 1 changes nothing, and a CPU value can be read without waiting for a
device), so an inactive clip reads the gradients once instead of reading them twice
and writing them once. On accelerators the code stays branch-free, as torch's does.
``clip_grad_value_`` clamps in one pass where torch makes two.
"""

from __future__ import annotations

import operator
from collections.abc import Collection

import torch
from torch import Tensor

from gradclip import _sync
from gradclip._agc import (
    caller_order,
    norms_from_units,
    scale_units_,
    sharded_unit_clip_factors,
    unit_clip_factors,
)
from gradclip._foreach import Groups, group_tensors, use_foreach
from gradclip._foreach import mul_ as foreach_mul_
from gradclip._params import (
    ParamsLike,
    check_norm_type,
    check_tensor_threshold,
    check_threshold,
    collect_grads,
)
from gradclip.nonfinite import (
    NonFinitePolicy,
    check_policy,
    raise_if_nonfinite,
    zero_if_nonfinite_,
)
from gradclip.norms import (
    any_dtensor,
    globalize_norms,
    grouped_total_norm,
    is_dtensor,
    local_tensor,
    local_views,
    tensor_norms,
    total_norm_of,
)

__all__ = ["clip_grad_agc_", "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_"]

NORM_EPS = 1e-6
"""Added to the total norm before dividing, as torch does."""


@torch.no_grad()
def clip_grad_norm_(
    parameters: ParamsLike,
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    nonfinite: NonFinitePolicy = "ignore",
) -> Tensor:
    """Clip the gradients' global norm to ``max_norm``, in place (Pascanu et al., 2013).

    Each gradient is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``, where
    ``total_norm`` is the p-norm of all gradients viewed as one vector.

    Args:
        parameters: a tensor, an iterable of tensors, or ``named_parameters()`` pairs.
            Parameters without gradients are skipped.
        max_norm: the largest allowed total norm, ``>= 0``: a number or a one-element
            tensor (kept a tensor, as torch does; see
            :func:`gradclip._params.check_tensor_threshold`).
        norm_type: p > 0, or ``inf``.
        error_if_nonfinite: as in torch; the same as ``nonfinite="raise"``.
        foreach: ``None`` uses fused kernels where the device has them.
        nonfinite: ``"ignore"`` (torch's behaviour), ``"raise"`` or ``"zero"``.

    Returns:
        The total norm before clipping, a 0-d tensor (``tensor(0.)`` with no gradients).

    Raises:
        TypeError, ValueError: bad arguments, before any gradient is touched.
        NonFiniteGradientError: ``"raise"`` and a gradient is NaN or infinite.

    References:
        Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural
        networks. ICML 2013, arXiv:1211.5063.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> clip_grad_norm_([w], max_norm=1.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    p = check_norm_type(norm_type)
    max_norm = check_tensor_threshold(max_norm, "max_norm")
    policy = check_policy(nonfinite, error_if_nonfinite=error_if_nonfinite)
    grads = collect_grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    groups = group_tensors(grads.grads)  # once, for both passes
    norms = tensor_norms(grads.grads, p, foreach=foreach, groups=groups)
    total_norm = grouped_total_norm(norms, p, groups)
    if policy == "raise":
        raise_if_nonfinite(grads, norms, total_norm, norm_type=p)
    coefficient = clip_coefficient(max_norm, total_norm)
    scale_grads_(grads.grads, coefficient, foreach=foreach, groups=groups)
    if policy == "zero":
        zero_if_nonfinite_(grads.grads, total_norm)
    return total_norm


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: ParamsLike,
    max_norm: float | Tensor,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale gradients given a precomputed total norm, in place (``torch.nn.utils`` drop-in).

    Use it with :func:`gradclip.get_total_norm` to compute the norm once and reuse
    it (for logging, or for a global norm computed across pipeline stages).

    Args:
        parameters: as for :func:`clip_grad_norm_`.
        max_norm: as for :func:`clip_grad_norm_`.
        total_norm: the total norm, a one-element tensor (not read on the host).
        foreach: ``None`` uses fused kernels where the device has them.

    Raises:
        TypeError: ``total_norm`` is not a one-element real tensor; other bad
            arguments as for :func:`clip_grad_norm_`. Before any gradient is touched.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> clip_grads_with_norm_([w], 2.5, torch.tensor(5.0))
        >>> w.grad
        tensor([1.5000, 2.0000])
    """
    max_norm = check_tensor_threshold(max_norm, "max_norm")
    total_norm = _check_total_norm(total_norm)
    grads = collect_grads(parameters)
    if grads:
        scale_grads_(grads.grads, clip_coefficient(max_norm, total_norm), foreach=foreach)


def _check_total_norm(total_norm: object) -> Tensor:
    """``total_norm`` as a 0-d view, or TypeError naming it (shape and dtype only: no sync)."""
    if not isinstance(total_norm, Tensor):
        raise TypeError(
            "total_norm must be a one-element Tensor (as get_total_norm returns); got "
            f"{type(total_norm).__name__}"
        )
    if total_norm.numel() != 1:
        raise TypeError(
            f"total_norm must be a one-element Tensor; got shape {tuple(total_norm.shape)}"
        )
    if total_norm.dtype == torch.bool or total_norm.is_complex():
        raise TypeError(f"total_norm must be a real Tensor; got dtype {total_norm.dtype}")
    return total_norm.reshape(())


def clip_coefficient(max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))`` as a tensor, exactly as torch computes it.

    A NaN norm gives a NaN coefficient (torch's ``"ignore"`` behaviour). torch
    evaluates ``float / tensor`` as ``reciprocal(tensor) * float``; so does this, for
    a float or a tensor ``max_norm`` alike, so strategies whose threshold is a tensor
    stay bit-identical to ``torch.nn.utils.clip_grad_norm_`` (a true division can
    differ by one ulp).

    >>> clip_coefficient(1.0, torch.tensor(4.0))
    tensor(0.2500)
    """
    return torch.clamp((total_norm + NORM_EPS).reciprocal() * max_norm, max=1.0)


def scale_grads_(
    grads: list[Tensor],
    scale: Tensor,
    *,
    foreach: bool | None = None,
    groups: Groups | None = None,
) -> None:
    """Multiply every gradient by the 0-d tensor ``scale``, in place, one fused call per group.

    On CPU a scale of exactly 1 is skipped (bit-identical: ``x * 1.0 == x``).
    ``groups`` is :func:`gradclip._foreach.group_tensors` of ``grads``, if the caller
    already has it.
    """
    local = local_views(grads)
    if local is not grads:  # DTensors were replaced by their shards: group those
        groups = None
        on_host = _sync.branch_on_host([scale, *local])
    else:
        if groups is None:
            groups = group_tensors(grads)
        # A group shares one device: one tensor per group tells where they all are.
        on_host = _sync.branch_on_host([scale, *(group[0] for group, _ in groups.values())])
    if on_host and float(scale) == 1.0:
        return
    foreach_mul_(local, scale, foreach=foreach, groups=groups)


@torch.no_grad()
def clip_grad_value_(
    parameters: ParamsLike,
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, in place, in one pass.

    torch's version calls ``clamp_min_`` and then ``clamp_max_`` (two passes over
    memory); this one clamps each large gradient once. NaN elements stay NaN.

    Args:
        parameters: as for :func:`clip_grad_norm_`.
        clip_value: the bound, ``>= 0``.
        foreach: accepted for drop-in compatibility; ``foreach=True`` on a device
            without fused kernels raises as in torch.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> w.grad = torch.tensor([-2.0, 0.5, 3.0])
        >>> clip_grad_value_([w], 1.0)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    clip_value = check_threshold(clip_value, "clip_value")
    grads = collect_grads(parameters)
    clamp_grads_(grads.grads, clip_value, foreach=foreach, types=grads.grad_types)


def clamp_grads_(
    grads: list[Tensor],
    clip_value: float,
    *,
    foreach: bool | None = None,
    types: Collection[type] = (),
) -> None:
    """Clamp tensors to ``[-clip_value, clip_value]`` in place: the kernel of value clipping.

    DTensors are clamped through their local shards (plain and DTensor gradients may
    be mixed). A Partial DTensor (a pending sum) cannot be clamped piece by piece:
    its summands are multiplied by ``clamp(x) / x`` of the reduced value ``x``, a
    factor in [0, 1] that commutes with the pending reduction. ``types``, if known,
    are the distinct types of ``grads`` (:attr:`gradclip._params.GradList.grad_types`).
    """
    if any_dtensor(grads, types=types):
        types = ()
        grads = local_views(grads, linear=False)
        pending = [g for g in grads if is_dtensor(g)]
        if pending:
            for g in pending:
                whole = local_tensor(g)
                factor = torch.where(whole != 0, whole.clamp(-clip_value, clip_value) / whole, 1.0)
                local_views([g])[0].mul_(factor)
            grads = [g for g in grads if not is_dtensor(g)]
    buckets: list[tuple[torch.device, list[Tensor]]]
    if grads and all(map(_IS_CPU, grads)):
        # One device, and CPU kernels take lists mixing dtypes: no grouping pass needed.
        buckets = [(grads[0].device, grads)]
    else:
        buckets = [(device, group) for (device, _), (group, _) in group_tensors(grads).items()]
    for device, group in buckets:
        if max(map(Tensor.numel, group)) < VALUE_ONE_PASS_MIN_NUMEL:  # all small: no split
            small, large = group, []
            known = types if len(buckets) == 1 else ()  # the types of every gradient
        else:
            numels = list(map(Tensor.numel, group))
            small = [g for g, n in zip(group, numels) if n < VALUE_ONE_PASS_MIN_NUMEL]
            large = [g for g, n in zip(group, numels) if n >= VALUE_ONE_PASS_MIN_NUMEL]
            known = ()
        if small and use_foreach(small, device, foreach, types=known):
            # Cache-resident: two fused calls beat a Python loop of one-pass clamps.
            torch._foreach_clamp_min_(small, -clip_value)
            torch._foreach_clamp_max_(small, clip_value)
        else:
            use_foreach(group, device, foreach)  # validates foreach=True as torch does
            large = group
        for g in large:
            g.clamp_(-clip_value, clip_value)


_IS_CPU = operator.attrgetter("is_cpu")

VALUE_ONE_PASS_MIN_NUMEL = 1 << 16
"""Tensors this large are clamped in one pass each; smaller ones are cache-resident and
take torch's two fused passes, which cost less than a Python loop of kernel calls."""


@torch.no_grad()
def clip_grad_agc_(
    parameters: ParamsLike,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    nonfinite: NonFinitePolicy = "ignore",
) -> Tensor:
    """Unit-wise adaptive gradient clipping (AGC), in place (Brock et al., 2021).

    For each unit ``i`` of a parameter ``W`` with gradient ``G`` (a row of a Linear
    weight, an output filter of a Conv weight: PyTorch puts the output dimension
    first, so the unit norm reduces over dims 1..n; vectors and scalars are one unit)::

        ‖W_i‖* = max(‖W_i‖, eps)
        if ‖G_i‖ / ‖W_i‖* > λ:  G_i ← λ · ‖W_i‖* / max(‖G_i‖, 1e-6) · G_i

    The test is branch-free (a multiply by 1 for units under the bound). Parameters
    of the same shape are processed together, so many small tensors cost a few
    kernel launches rather than a Python loop of many passes.

    The paper does not clip the final classifier layer; pass only the parameters to
    clip (see :class:`gradclip.AGC` for exclusion by name or module).

    Args:
        parameters: as for :func:`clip_grad_norm_`; each parameter's own values are
            read, so pass parameters, not bare gradients.
        clip_factor: λ > 0, the largest allowed ratio ‖G_i‖ / ‖W_i‖*. Default 0.01.
        eps: the floor on weight norms, so zero-initialised units can still move.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``.

    Returns:
        The global L2 norm of the gradients before clipping, a 0-d tensor (computed
        from the unit norms at no extra cost).

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
        Without Normalization. ICML 2021, arXiv:2102.06171.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> clip_grad_agc_([w], clip_factor=0.1)
        tensor(1.4142)
        >>> w.grad  # row 0 capped at 0.1 * 5; row 1 at 0.1 * eps
        tensor([[5.0000e-01, 0.0000e+00],
                [0.0000e+00, 1.0000e-04]])
    """
    clip_factor = check_threshold(clip_factor, "clip_factor", allow_zero=False)
    eps = check_threshold(eps, "eps")
    policy = check_policy(nonfinite)
    grads = collect_grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    has_dtensor = any_dtensor(grads.params) or any_dtensor(grads.grads)
    local_grads = grads.grads
    if has_dtensor:
        for k, param in enumerate(grads.params):
            _check_units_whole(grads.name(k), param)
        # Scaling is linear: the summands of a Partial gradient may be scaled.
        local_grads = local_views(grads.grads)
        groups = sharded_unit_clip_factors(grads.params, grads.grads, clip_factor, eps)
    else:
        groups = unit_clip_factors(grads.params, grads.grads, clip_factor, eps)
    norms = norms_from_units(groups, caller_order(groups), groups[0].squares.device)
    if has_dtensor and any_dtensor(grads.grads):
        norms = globalize_norms(grads.grads, norms, 2.0)
    total_norm = total_norm_of(norms, 2.0)
    if policy == "raise":
        raise_if_nonfinite(grads, norms, total_norm, norm_type=2.0)
    scale_units_(local_grads, groups)
    if policy == "zero":
        zero_if_nonfinite_(grads.grads, total_norm)
    return total_norm


def _check_units_whole(name: str, param: Tensor) -> None:
    """AGC's units are dim-0 slices: only Shard(0) and Replicate keep each on one rank."""
    if not is_dtensor(param):
        return
    placements = param.placements  # type: ignore[attr-defined]
    for placement in placements:
        if placement.is_partial() or (placement.is_shard() and placement.dim != 0):
            raise NotImplementedError(
                f"AGC on {name} sharded as {placements}: only Shard(0) and Replicate keep "
                "each unit (a dim-0 slice) whole on one rank"
            )
