"""Hugging Face Accelerate: :func:`clip_` unscales through the accelerator, then clips.

::

    from gradclip.integrations.accelerate import clip_

    clipper = ZClip(model.parameters())           # after accelerator.prepare(...)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(batch)))
            stats = clip_(accelerator, clipper)   # None on accumulation micro-steps
            optimizer.step()
            optimizer.zero_grad()

It stands where ``accelerator.clip_grad_norm_(model.parameters(), max_norm)`` does
and handles what that call handles:

* **AMP.** Under ``mixed_precision="fp16"`` (native AMP) the gradients carry the
  loss scale after ``accelerator.backward``. ``clip_`` unscales them with
  ``accelerator.unscale_gradients(optimizer)`` first, for each prepared optimizer that
  holds a bound parameter, unless they were already unscaled since the scaler's last
  update (``accelerator.unscale_gradients`` itself raises when called twice in a
  step, e.g. after an ``accelerator.clip_grad_norm_``). The optimizer's step then does
  not unscale again. ``bf16`` and full precision have nothing to unscale
  (``unscale_gradients`` is a no-op there).
* **Gradient accumulation.** Inside ``accelerator.accumulate``, only the last
  micro-batch of an optimizer step has gradients to clip
  (``accelerator.sync_gradients``); on the others ``clip_`` does nothing and returns
  None, as the prepared optimizer's ``step()`` does nothing there. So a stateful
  strategy sees one norm per optimizer step.
* **Distributed.** Under DDP the gradients are all-reduced by then, so every process
  clips identically. FSDP2 (DTensor gradients) works: gradclip's norms reduce across
  the mesh. Refused: DeepSpeed (it clips inside its engine: set ``gradient_clipping``
  in its config), FSDP1 (flat sharded gradients: per-rank norms), Megatron-LM, and
  XLA (gradients are reduced inside ``clip_grad_norm_``/``step``, after ``clip_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradclip.clippers.base import Clipper
from gradclip.clippers.compose import Chain
from gradclip.clippers.stats import ClipStats
from gradclip.integrations._adapters import (
    ClipperLike,
    bound_params,
    has_grads,
    missing_framework,
    unscaled_since_update,
)

try:
    import accelerate  # type: ignore[import-untyped]
except ImportError as error:  # pragma: no cover - a test hides accelerate to check the message
    raise missing_framework(
        "gradclip.integrations.accelerate", "Hugging Face Accelerate", "hf"
    ) from error

if TYPE_CHECKING:
    from accelerate import Accelerator  # type: ignore[import-untyped]

__all__ = ["clip_"]

_REFUSED = {
    "DEEPSPEED": "DeepSpeed clips inside its engine (set 'gradient_clipping' in its config)",
    "MEGATRON_LM": "Megatron-LM clips inside its own optimizer step",
    "XLA": "XLA gradients are reduced only inside accelerator.clip_grad_norm_/step, after this",
}


def clip_(
    accelerator: Accelerator,
    clipper: ClipperLike,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> ClipStats | None:
    """Unscale the gradients through ``accelerator`` (once), then ``clipper.clip_()``.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared the model and optimizer.
        clipper: a gradclip clipper (or chain) bound to the prepared model's parameters.
        optimizer: the prepared optimizer(s) whose gradients to unscale; by default
            every optimizer the accelerator prepared that holds a parameter the
            clipper is bound to.

    Returns:
        The step's :class:`~gradclip.ClipStats`, or None on a gradient-accumulation
        micro-step (``accelerator.sync_gradients`` is False), where nothing is clipped.

    Raises:
        TypeError: ``accelerator`` is not an ``accelerate.Accelerator``; ``clipper`` is
            not a gradclip clipper or chain (a spec string included: ``clip_`` runs
            every step, and a strategy must keep its state across steps, so build the
            clipper once with :func:`gradclip.from_spec`); ``optimizer`` is not an
            optimizer, a sequence of them, or None.
        ValueError: a refused distributed setup (DeepSpeed, FSDP1, Megatron-LM, XLA),
            or gradients still scaled by fp16 AMP that no optimizer prepared by the
            accelerator holds (they cannot be unscaled through it).

    Example:
        >>> from accelerate import Accelerator
        >>> from gradclip.clippers.fixed import NormClip
        >>> accelerator = Accelerator(cpu=True)
        >>> model = torch.nn.Linear(3, 1)
        >>> model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters()))
        >>> accelerator.backward(model(torch.ones(4, 3)).sum() * 10)
        >>> stats = clip_(accelerator, NormClip(model.parameters(), max_norm=1.0))
        >>> round(float(stats.total_norm), 2), round(float(stats.clipped_norm), 2)  # 4 grads of 40
        (80.0, 1.0)
    """
    _check_arguments(accelerator, clipper, optimizer)
    _check_distributed(accelerator)
    if not accelerator.sync_gradients:
        return None
    params = bound_params(clipper)
    if _scaling(accelerator) and has_grads(params):
        optimizers = _optimizers_of(accelerator, params, optimizer)
        if not optimizers:
            raise ValueError(
                "the gradients are scaled by fp16 AMP, but no optimizer prepared by this "
                "accelerator holds the clipper's parameters, so they cannot be unscaled "
                "through it; prepare the optimizer with accelerator.prepare, or pass it"
            )
        for opt in optimizers:
            if not unscaled_since_update(accelerator.scaler, _unwrap(opt)):
                accelerator.unscale_gradients(optimizer=opt)
    return clipper.clip_()


def _check_arguments(accelerator: object, clipper: object, optimizer: object) -> None:
    """Raise ``TypeError`` naming an argument of the wrong type (before anything else runs)."""
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(
            "clip_(accelerator, clipper): accelerator must be an accelerate.Accelerator; "
            f"got {type(accelerator).__name__}"
        )
    if isinstance(clipper, str):
        raise TypeError(
            f"clip_(accelerator, clipper) got the spec string {clipper!r}; clip_ runs every "
            "step and a strategy keeps its state across steps, so build the clipper once, "
            f"e.g. clipper = gradclip.from_spec({clipper!r}, model.named_parameters()), "
            "and pass it"
        )
    if not isinstance(clipper, Clipper | Chain):
        raise TypeError(
            "clip_(accelerator, clipper): clipper must be a gradclip Clipper (e.g. "
            f"NormClip(model.parameters(), max_norm=1.0)) or a chain; got {type(clipper).__name__}"
        )
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return
    if not isinstance(optimizer, list | tuple) or not all(
        isinstance(o, torch.optim.Optimizer) for o in optimizer
    ):
        raise TypeError(
            "clip_(accelerator, clipper, optimizer): optimizer must be a torch optimizer "
            "(a prepared one, e.g.), a list or tuple of them, or None; got "
            f"{type(optimizer).__name__}"
        )


def _check_distributed(accelerator: Accelerator) -> None:
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in _REFUSED:
        raise ValueError(f"gradclip cannot clip under {kind}: {_REFUSED[kind]}")
    if kind == "FSDP" and not getattr(accelerator, "is_fsdp2", False):
        raise ValueError(
            "gradclip cannot clip under FSDP1: its flat sharded gradients give per-rank "
            "norms; use FSDP2 (fsdp_version=2), whose DTensor gradients gradclip reduces"
        )


def _scaling(accelerator: Accelerator) -> bool:
    """Whether ``accelerator.unscale_gradients`` unscales anything (fp16 native AMP)."""
    scaler = getattr(accelerator, "scaler", None)
    return (
        scaler is not None
        and scaler.is_enabled()
        and bool(getattr(accelerator, "native_amp", False))
        and str(getattr(accelerator, "mixed_precision", "no")) == "fp16"
    )


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    while isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer  # type: ignore[no-any-return]


def _optimizers_of(
    accelerator: Accelerator,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
) -> list[Any]:
    if optimizer is not None:
        return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    ids = {id(p) for p in params}
    return [
        opt
        for opt in getattr(accelerator, "_optimizers", [])  # what unscale_gradients() uses
        if any(id(p) in ids for g in opt.param_groups for p in g["params"])
    ]
