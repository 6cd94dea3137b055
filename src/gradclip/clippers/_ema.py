"""Shared pieces of the EMA-threshold strategies (:mod:`.adagc`, :mod:`.emaratio`).

* Per-tensor state: a 1-D tensor with one entry per parameter of a group. On a step
  where some parameters have no gradient, the entries of those that do are gathered
  and scattered back (the positions are known on the host, so no sync).
* Per-tensor scaling: each gradient times its own 0-d factor, one fused
  ``torch._foreach_mul_`` call per (device, dtype).
* Option checks shared by both strategies, with messages naming the value and range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradclip import _sync
from gradclip._foreach import mul_ as foreach_mul_
from gradclip.clippers.base import ParamGroup
from gradclip.norms import is_dtensor


def present(group: ParamGroup) -> list[int] | None:
    """Positions in ``group["params"]`` of the parameters with a gradient; None if all have one.

    The order matches the ``grads`` list the base passes to ``_clip_group``.
    """
    params = group["params"]
    index = [i for i, p in enumerate(params) if p.grad is not None]
    return None if len(index) == len(params) else index


def gather(values: Tensor, index: list[int] | None) -> Tensor:
    """The entries of a per-parameter state vector at ``index`` (all of it for None)."""
    if index is None:
        return values
    return values.index_select(0, torch.tensor(index, device=values.device))


def scatter(values: Tensor, index: list[int] | None, new: Tensor) -> Tensor:
    """``values`` with the entries at ``index`` replaced by ``new`` (``new`` itself for None)."""
    if index is None:
        return new
    return values.index_copy(0, torch.tensor(index, device=values.device), new)


def scale_each_(grads: list[Tensor], factors: Tensor) -> None:
    """``grads[i] *= factors[i]`` in place, in fused calls, without host sync.

    On CPU, factors that are all exactly 1 skip the pass (bit-identical). DTensor
    gradients are scaled through their local shards, which share their storage: a
    factor is a property of the whole tensor (its norm is global), so every shard
    takes the same one, and scaling is linear, so the summands of a Partial DTensor
    may be scaled too.
    """
    if _sync.branch_on_host([factors, *grads]) and bool((factors == 1.0).all()):
        return
    targets = [g.to_local() if is_dtensor(g) else g for g in grads]  # type: ignore[attr-defined]
    foreach_mul_(targets, list(factors.unbind(0)), foreach=None)


def check_unit_interval(value: object, name: str) -> float:
    """A coefficient strictly between 0 and 1 (an EMA's β).

    Raises:
        TypeError: not a real number.
        ValueError: outside (0, 1).
    """
    number = _real(value, name)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must be in (0, 1); got {number}")
    return number


def check_above_one(value: object, name: str) -> float:
    """A finite ratio > 1 (at ≤ 1 an EMA of clipped norms can never grow, only decay).

    Raises:
        TypeError: not a real number.
        ValueError: ≤ 1, NaN or infinite.
    """
    number = _real(value, name)
    if not (math.isfinite(number) and number > 1.0):
        raise ValueError(
            f"{name} must be a finite number > 1 (at <= 1 the threshold can never grow "
            f"and decays towards 0); got {number}"
        )
    return number


def check_steps(value: object, name: str) -> int:
    """A number of steps: an int ≥ 0 (bool rejected).

    Raises:
        TypeError: not an int.
        ValueError: negative.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value}")
    return value


def check_flag(value: object, name: str) -> bool:
    """A bool option.

    Raises:
        TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must be a number; got {number}")
    return number
