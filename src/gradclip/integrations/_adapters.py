"""What the framework adapters share: strategy building, AMP unscaling, error texts.

Framework-free (imports torch and gradclip only), so every adapter can use it
without pulling in another adapter's framework.

* :func:`build_clipper`: a strategy given as a spec string, a factory, or a ready
  clipper, turned into a clipper bound to an optimizer's parameters.
* :func:`unscale_once_`: unscale an optimizer's gradients through its
  ``torch.amp.GradScaler`` unless that was done since the scaler's last ``update()``
  (``GradScaler.unscale_`` raises when called twice; frameworks call it at different
  points, or not at all, before the hook where the adapters clip).
* :func:`missing_framework`: the ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from gradclip.clippers.base import Clipper, registry
from gradclip.clippers.compose import Chain
from gradclip.spec import from_spec, parse_spec

__all__ = [
    "ClipperLike",
    "Strategy",
    "bound_params",
    "build_clipper",
    "check_strategy",
    "describe",
    "has_grads",
    "missing_framework",
    "named_optimizer_params",
    "unscale_once_",
    "unscaled_since_update",
]

ClipperLike: TypeAlias = "Clipper | Chain"
"""What the adapters drive: anything with ``clip_()``, ``state_dict()``, ``load_state_dict()``."""

Factory: TypeAlias = "Callable[[list[tuple[str, Tensor]]], Clipper | Chain]"
"""Builds a clipper bound to the ``(name, parameter)`` pairs it is given."""

Strategy: TypeAlias = "str | Clipper | Chain | Factory"
"""A spec string (``"zclip:z=2.5"``), a clipper bound already, or a factory.

A factory is called with the ``(name, parameter)`` pairs to clip and returns a
clipper bound to them, e.g. ``functools.partial(ZClip, z_thresh=2.5)`` or
``lambda params: chain(AGC(params), NormClip(params, max_norm=1.0))``.
"""


def describe(strategy: object) -> str:
    """A short name for messages and state keys: the spec, the clipper's class, or the factory."""
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, Clipper | Chain):
        return type(strategy).__name__
    return getattr(strategy, "__qualname__", None) or type(strategy).__name__


_NAME_DEPENDENT_OPTIONS = ("exclude",)
"""Spec options checked against the parameters' names (AGC's ``exclude`` patterns must
match one): left out of the construction-time check, which has no real names."""


def check_strategy(strategy: object, owner: str) -> None:
    """Raise unless ``strategy`` is a valid spec string, a clipper or a callable.

    A spec string is checked in full at once, so a mistake fails where the adapter is
    built rather than inside training: the strategy name, then its options, by
    building the clipper once against a one-element stand-in parameter (options
    that name parameters, such as AGC's ``exclude``, are checked when the real
    clipper is built).

    Raises:
        ValueError: an unknown strategy, a malformed spec, or an option out of range.
        TypeError: an option of the wrong type, or a ``strategy`` of none of the kinds.
    """
    if isinstance(strategy, str):
        name, _ = parse_spec(strategy)
        valid = registry()
        if name not in valid:
            raise ValueError(
                f"unknown clipping strategy {name!r} in spec {strategy!r} given to {owner}; "
                f"valid: {', '.join(sorted(valid))}"
            )
        accepted = inspect.signature(valid[name]).parameters
        overrides = {key: None for key in _NAME_DEPENDENT_OPTIONS if key in accepted}
        stand_in = [("stand_in", torch.nn.Parameter(torch.zeros(1)))]
        try:
            from_spec(strategy, stand_in, **overrides)
        except ValueError as error:
            raise ValueError(f"bad spec {strategy!r} given to {owner}: {error}") from error
        except TypeError as error:
            raise TypeError(f"bad spec {strategy!r} given to {owner}: {error}") from error
        return
    if isinstance(strategy, Clipper | Chain) or callable(strategy):
        return
    raise TypeError(
        f"{owner} takes a spec string like 'zclip:z=2.5', a clipper, or a factory "
        f"called with (name, parameter) pairs; got {type(strategy).__name__}"
    )


def named_optimizer_params(
    optimizer: torch.optim.Optimizer, named: Iterable[tuple[str, Tensor]]
) -> list[tuple[str, Tensor]]:
    """The optimizer's parameters, in its order, named after the module's names.

    A parameter the module does not name is called ``param_groups[g][k]``.
    """
    names = {id(p): n for n, p in named}
    pairs: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for g, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            pairs.append((names.get(id(p), f"param_groups[{g}][{k}]"), p))
    return pairs


def build_clipper(strategy: Strategy, params: list[tuple[str, Tensor]]) -> ClipperLike:
    """A clipper bound to ``params`` from a spec string or factory (a clipper is returned as is).

    Raises:
        TypeError: the factory returned something that is not a clipper.
        ValueError: a bad spec (from :func:`gradclip.from_spec`).
    """
    if isinstance(strategy, Clipper | Chain):
        return strategy
    if isinstance(strategy, str):
        return from_spec(strategy, params)
    clipper = strategy(params)
    if not isinstance(clipper, Clipper | Chain):
        raise TypeError(
            f"the clipping factory {describe(strategy)} returned {type(clipper).__name__}, "
            "not a gradclip clipper (a Clipper or a chain)"
        )
    return clipper


def bound_params(clipper: ClipperLike) -> list[Tensor]:
    """The parameters a clipper (or chain) is bound to, each once."""
    if isinstance(clipper, Chain):
        return clipper.params
    seen: set[int] = set()
    out: list[Tensor] = []
    for group in clipper.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def unscaled_since_update(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler`` unscaled ``optimizer``'s gradients since its last ``update()``.

    Reads torch's per-optimizer record (``GradScaler._per_optimizer_states``); a scaler
    without one counts as not having unscaled.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    return state is not None and state.get("stage") is not OptState.READY


def unscale_once_(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale ``optimizer``'s gradients through ``scaler`` unless already done this step.

    "This step" is since the scaler's last ``update()``: ``GradScaler.unscale_`` raises
    if called twice in that span, and ``scaler.step`` does not unscale again after it
    (for a fused optimizer it then passes no ``grad_scale``, so the kernel does not
    divide a second time). A disabled or absent scaler does nothing.

    Args:
        scaler: a ``torch.amp.GradScaler`` (or subclass), or None.
        optimizer: the (unwrapped) torch optimizer whose gradients it scaled.

    Returns:
        Whether this call unscaled the gradients.
    """
    if scaler is None or not scaler.is_enabled() or unscaled_since_update(scaler, optimizer):
        return False
    scaler.unscale_(optimizer)
    return True


def has_grads(params: Iterable[Tensor]) -> bool:
    """Whether any parameter has a gradient (a host-side check: no device read)."""
    return any(p.grad is not None for p in params)


def missing_framework(module: str, framework: str, extra: str) -> ImportError:
    """The error an adapter raises when its framework is not installed."""
    return ImportError(
        f"{module} needs {framework}, which is not installed; install it with "
        f"pip install 'gradclip[{extra}]'"
    )
