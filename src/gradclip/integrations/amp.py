"""``torch.amp.GradScaler`` support for :func:`gradclip.integrations.optim.attach`.

With AMP the gradients after ``backward()`` are multiplied by the scaler's loss scale
``S``. Clipping must see them divided by ``S`` exactly once, and ``scaler.step`` /
``scaler.update`` must keep working as PyTorch documents them. What the clip hook
sees when the optimizer's step begins depends on the optimizer:

* **Unfused optimizers**: ``scaler.step(optimizer)`` unscales the gradients in place
  (unless ``scaler.unscale_(optimizer)`` already did), checks them for inf/NaN and
  calls ``optimizer.step()`` only if they are finite. The hook sees unscaled
  gradients; a step the scaler skips never reaches the clipper.
* **Fused optimizers** (``fused=True``): ``scaler.step`` does not unscale. It sets
  ``optimizer.grad_scale = S`` (None if ``unscale_`` was called) and
  ``optimizer.found_inf``, and the fused kernel divides by ``grad_scale`` and skips
  the update where ``found_inf`` is 1. The hook sees gradients still multiplied by
  ``optimizer.grad_scale``: a foldable clipper divides its norms by it
  (:meth:`~gradclip.clippers.base.Clipper.measure_`), so nothing is unscaled twice and
  nothing extra is read; other clippers get the gradients unscaled in place first
  (:func:`unscale_grads_`, the pass ``scaler.unscale_`` would have made).

Calling ``optimizer.step()`` directly while gradients are still scaled is the one
misuse this module can see (with the scaler passed to ``attach``); it raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from gradclip._foreach import mul_ as foreach_mul_

__all__ = ["check_scaler", "grads_scaled_by", "unscale_grads_"]


def check_scaler(scaler: object) -> torch.amp.GradScaler | None:
    """Validate ``attach``'s ``scaler`` argument: a ``torch.amp.GradScaler`` or None.

    Raises:
        TypeError: anything else, naming its type.
    """
    if scaler is None or isinstance(scaler, torch.amp.GradScaler):
        return scaler
    raise TypeError(f"scaler must be a torch.amp.GradScaler or None; got {type(scaler).__name__}")


def grads_scaled_by(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> Tensor | None:
    """The factor the optimizer's gradients carry when its step begins (None: unscaled).

    That is ``optimizer.grad_scale``, which a ``GradScaler`` sets for fused optimizers
    (torch's contract: the kernel divides the gradients by it). No host sync.

    Raises:
        RuntimeError: ``scaler`` is enabled and the gradients are still scaled with no
            ``grad_scale`` to say so: ``optimizer.step()`` was called instead of
            ``scaler.step(optimizer)``.
    """
    scale: Tensor | None = getattr(optimizer, "grad_scale", None)
    if scaler is None or not scaler.is_enabled():
        return scale
    states = getattr(scaler, "_per_optimizer_states", None)  # torch's per-optimizer record
    if not isinstance(states, dict):
        return scale
    state = states.get(id(optimizer))
    stage = None if state is None else state.get("stage")
    unscaled = stage is OptState.UNSCALED
    if not unscaled and not hasattr(optimizer, "found_inf"):
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() was called with gradients the GradScaler "
            "has not unscaled; with a scaler, step through scaler.step(optimizer) (it "
            "unscales once, and the clip sees unscaled gradients), then scaler.update()"
        )
    return scale


def unscale_grads_(grads: Sequence[Tensor], scale: Tensor) -> None:
    """Divide gradients by ``scale`` in place, in one pass, as ``GradScaler.unscale_`` does.

    The reciprocal is taken in float64 and rounded to float32, as torch does, so the
    result is bit-identical to ``scaler.unscale_(optimizer)``.

    >>> g = torch.tensor([2.0, 4.0]); unscale_grads_([g], torch.tensor(4.0)); g
    tensor([0.5000, 1.0000])
    """
    if grads:
        inv = scale.double().reciprocal().float()
        foreach_mul_(grads, inv, foreach=None)
