"""Turning what users pass as ``parameters`` into gradients, names and clear errors.

Every public entry point accepts what ``torch.nn.utils`` accepts (a tensor or an
iterable of tensors) and also ``named_parameters()`` pairs, whose names make error
messages useful. Validation happens here, before anything is modified.
"""

from __future__ import annotations

import math
import operator
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

from gradclip._sync import branch_on_host

ParamsLike: TypeAlias = Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]
"""A tensor, an iterable of tensors, or ``(name, tensor)`` pairs."""


@dataclass(frozen=True)
class GradList:
    """The parameters that have gradients, their gradients and where they came from.

    Attributes:
        params: parameters whose ``.grad`` is not ``None``, in the order given.
        grads: ``[p.grad for p in params]``.
        positions: each entry's position in the caller's iterable.
        given_names: names of ``(name, tensor)`` pairs, by entry; empty otherwise.
        grad_types: the distinct types of ``grads``, so that later checks (fused kernel
            support, DTensors) need no pass of their own.
    """

    params: list[Tensor]
    grads: list[Tensor]
    positions: list[int]
    given_names: dict[int, str]
    grad_types: frozenset[type] = frozenset()

    def __len__(self) -> int:
        return len(self.grads)

    def name(self, k: int) -> str:
        """Entry ``k``'s display name: its given name, or ``"parameters[i]"``."""
        return self.given_names.get(k, f"parameters[{self.positions[k]}]")


def collect_grads(parameters: ParamsLike, *, empty_generator_ok: bool = False) -> GradList:
    """Collect parameters with gradients from any accepted ``parameters`` form.

    Args:
        parameters: a tensor, an iterable of tensors, or ``(name, tensor)`` pairs.
        empty_generator_ok: accept an exhausted generator silently (clippers that
            re-read their own lists use this; users get an error).

    Returns:
        The parameters that have gradients, with names.

    Raises:
        TypeError: an item is neither a tensor nor a ``(str, tensor)`` pair, or a
            gradient is sparse.
        ValueError: ``parameters`` is an empty generator, which is almost always a
            ``model.parameters()`` generator that was already consumed.
    """
    items: list[Tensor | tuple[str, Tensor]]
    if isinstance(parameters, Tensor):
        items = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        try:
            items = list(parameters)
        except TypeError:
            raise TypeError(
                "parameters must be a Tensor, an iterable of Tensors or of (name, Tensor) "
                f"pairs; got {type(parameters).__name__}"
            ) from None
        if is_generator and not items and not empty_generator_ok:
            raise ValueError(
                "parameters is an empty generator, so there is nothing to clip; was "
                "model.parameters() already consumed? Pass list(model.parameters()) to "
                "reuse it"
            )
    params: list[Tensor] = []
    positions: list[int] = []
    given_names: dict[int, str] = {}
    grads: list[Tensor]
    # The common case, kept fast: C-level passes (map) instead of per-item Python code,
    # which with hundreds of small gradients would cost as much as the clipping kernels.
    if all(issubclass(t, Tensor) for t in set(map(type, items))):
        found: list[Tensor | None] = list(map(_GRAD, items))
        # One pass tells both whether a gradient is missing and the gradients' types.
        grad_types = set(map(type, found))
        if _NONE_TYPE in grad_types:
            grad_types.discard(_NONE_TYPE)
            positions = [i for i, g in enumerate(found) if g is not None]
            params = [items[i] for i in positions]  # type: ignore[misc]
            grads = [found[i] for i in positions]  # type: ignore[misc]
        else:
            positions = list(range(len(items)))
            params = items  # type: ignore[assignment]
            grads = found  # type: ignore[assignment]
    else:
        for index, item in enumerate(items):
            name, param = split_named(item, index)
            if param.grad is not None:
                given_names[len(params)] = name
                params.append(param)
                positions.append(index)
        grads = [p.grad for p in params]  # type: ignore[misc]
        grad_types = set(map(type, grads))
    result = GradList(params, grads, positions, given_names, frozenset(grad_types))
    _check_dense(grads, lambda k: f"gradient of {result.name(k)}", "gradients", "grad")
    return result


def check_tensors(tensors: Iterable[object], label: str = "tensors") -> list[Tensor]:
    """Check that every item is a dense tensor; return them as a list.

    Args:
        tensors: the items.
        label: the argument's name; item ``i`` is called ``label[i]`` in errors.

    Raises:
        TypeError: an item is not a tensor, or is a sparse tensor.

    >>> check_tensors([torch.zeros(2), 1.0])
    Traceback (most recent call last):
    ...
    TypeError: tensors[1] is a float; expected a Tensor
    """
    items = list(tensors)
    if not all(issubclass(t, Tensor) for t in set(map(type, items))):
        for index, item in enumerate(items):
            if not isinstance(item, Tensor):
                raise TypeError(f"{label}[{index}] is a {type(item).__name__}; expected a Tensor")
    checked: list[Tensor] = items  # type: ignore[assignment]
    _check_dense(checked, lambda k: f"{label}[{k}]", "tensors", "tensor")
    return checked


def _check_dense(tensors: list[Tensor], name: Callable[[int], str], what: str, var: str) -> None:
    """Raise ``TypeError`` naming the first sparse (non-strided) tensor, if any.

    ``name(k)`` describes entry ``k``; ``what`` the kind of tensors; ``var`` the
    variable name used in the suggested fix.
    """
    if all(layout is torch.strided for layout in set(map(_LAYOUT, tensors))):
        return
    for k, tensor in enumerate(tensors):
        if tensor.layout is not torch.strided:
            embedding = " or use a dense embedding (sparse=False)" if var == "grad" else ""
            raise TypeError(
                f"{name(k)} has layout {tensor.layout}; gradclip supports dense "
                f"(torch.strided) {what} only. Densify it with {var}.to_dense(){embedding}"
            )


_GRAD = operator.attrgetter("grad")
_LAYOUT = operator.attrgetter("layout")
_NONE_TYPE = type(None)


def split_named(item: object, index: int, label: str = "parameters") -> tuple[str, Tensor]:
    """``(name, tensor)`` of an item of a ``parameters`` iterable; ``label[i]`` names a bare tensor.

    Raises:
        TypeError: neither a tensor nor a ``(str, Tensor)`` pair.
    """
    if isinstance(item, Tensor):
        return f"{label}[{index}]", item
    if (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], Tensor)
    ):
        return item[0], item[1]
    raise TypeError(
        f"{label}[{index}] is a {type(item).__name__}; expected a Tensor or a "
        "(name, Tensor) pair such as those of model.named_parameters()"
    )


def check_threshold(value: object, name: str, *, allow_zero: bool = True) -> float:
    """Validate a clipping threshold and return it as a float.

    Args:
        value: the user's value.
        name: the argument's name, used in the message.
        allow_zero: whether 0 is accepted (it zeroes every gradient).

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number (bool included).
        ValueError: ``value`` is negative, NaN or infinite (or 0 when not allowed).
    """
    _check_threshold_type(value, name)
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be a finite number; got {number}")
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}; got {number}")
    return number


def check_tensor_threshold(value: object, name: str) -> float | Tensor:
    """:func:`check_threshold`, except that a tensor stays a tensor, as in ``torch.nn.utils``.

    A one-element tensor is returned as a 0-d view, never read on the host where
    that would wait for a device: its value is range-checked only where reading it
    is free (a CPU tensor, see :func:`gradclip._sync.branch_on_host`). A negative or
    NaN threshold tensor on an accelerator is not caught; it gives what torch gives.

    >>> check_tensor_threshold(torch.tensor([0.5]), "max_norm")
    tensor(0.5000)

    Raises:
        TypeError: not a real number or a one-element real tensor.
        ValueError: a number, or a CPU tensor, that is negative, NaN or infinite.
    """
    if not isinstance(value, Tensor):
        return check_threshold(value, name)
    _check_threshold_type(value, name)
    if branch_on_host([value]):
        check_threshold(value, name)
    return value.reshape(())


def _check_threshold_type(value: object, name: str) -> None:
    """TypeError unless ``value`` is a real number or a one-element real tensor."""
    if isinstance(value, bool) or not isinstance(value, int | float | Tensor):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"{name} must be a number or a one-element tensor; got shape {tuple(value.shape)}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number; got a {value.dtype} tensor")


def check_norm_type(norm_type: object) -> float:
    """Validate a p-norm order: any p > 0, or ``inf`` (``"inf"`` accepted).

    Raises:
        TypeError: not a number or ``"inf"``.
        ValueError: p ≤ 0 or NaN.
    """
    if isinstance(norm_type, str) and norm_type.lower() in ("inf", "+inf"):
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float):
        raise TypeError(f"norm_type must be a number > 0 or 'inf'; got {norm_type!r}")
    p = float(norm_type)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"norm_type must be > 0 or inf; got {p}")
    return p
