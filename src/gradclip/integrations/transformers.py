"""Hugging Face ``transformers``: :class:`GradClipCallback` clips before every optimizer step.

::

    from gradclip.integrations.transformers import GradClipCallback

    args = TrainingArguments(..., max_grad_norm=0)        # the Trainer must not clip too
    trainer = Trainer(model, args, ..., callbacks=[GradClipCallback("zclip:z=2.5")])

**Where it clips.** In the ``on_pre_optimizer_step`` event (transformers >= 4.45),
which the Trainer fires right before ``optimizer.step()``, once per optimizer step
(after all gradient-accumulation micro-batches), after its own ``max_grad_norm``
clip. That is why ``max_grad_norm`` must be 0: the Trainer would clip first and
gradclip would see gradients already clipped to 1.0 (the default). The callback
refuses a non-zero ``max_grad_norm`` when the Trainer is built and when training
begins.

**AMP.** With ``fp16`` the Trainer's accelerator scales the loss; the callback
unscales the gradients through the optimizer's scaler (the ``AcceleratedOptimizer``
holds it) unless that was already done this step, so they are unscaled exactly once.
(transformers 5 unscales before the event anyway, when it measures ``grad_norm``;
4.x does not when ``max_grad_norm`` is 0.) ``bf16`` needs no unscaling.

**The strategy** is a spec string (``"norm:1.0"``, ``"zclip:z=2.5"``), a factory
called with the optimizer's ``(name, parameter)`` pairs (names from the model), or a
clipper bound already; spec and factory are built when training begins, bound to the
optimizer's parameters in the model's order (``model.parameters()``, the order the
Trainer's own clip sums in), so ``GradClipCallback("norm:1.0")`` with
``max_grad_norm=0`` trains bit-identically to ``max_grad_norm=1.0``. (The Trainer's
default optimizer holds them in another order: weights that decay, then the rest.)

**Logging.** When the Trainer logs its training metrics (every ``logging_steps``),
the callback adds ``grad_norm_pre`` and ``grad_norm_post`` (the global norm before
and after clipping, last step), ``grad_clip_threshold`` and ``grad_clip_rate`` (the
fraction of optimizer steps since the previous log that were clipped) to the logs
dict, which is what later callbacks and ``trainer.state.log_history`` see. The
Trainer's own ``grad_norm`` is the pre-clip norm too. Reporting integrations
(``report_to``: TensorBoard, W&B, ...) are called *before* user callbacks; for them
to record these values, put the callback first:
``trainer.callback_handler.callbacks.insert(0, callback)``.

**Checkpoints.** At each checkpoint save the callback writes its clipper's state to
``gradclip_state.pt`` in the checkpoint folder (``output_dir/checkpoint-<step>``);
when training resumes at that step (``trainer.train(resume_from_checkpoint=...)``
with a checkpoint of ``output_dir``) it loads it back before the first step.

DeepSpeed is refused (it clips inside its engine: set ``gradient_clipping`` in its
config).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradclip.clippers.base import Clipper
from gradclip.clippers.compose import Chain
from gradclip.clippers.stats import ClipStats
from gradclip.integrations._adapters import (
    ClipperLike,
    Strategy,
    bound_params,
    build_clipper,
    check_strategy,
    describe,
    has_grads,
    missing_framework,
    named_optimizer_params,
    unscale_once_,
)

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - exercised by a test that hides transformers
    raise missing_framework(
        "gradclip.integrations.transformers", "Hugging Face transformers", "hf"
    ) from error

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover
    raise ImportError(
        "gradclip.integrations.transformers needs transformers >= 4.45 (the "
        "on_pre_optimizer_step callback event); install it with pip install 'gradclip[hf]'"
    )

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["STATE_FILE", "GradClipCallback"]

STATE_FILE = "gradclip_state.pt"
"""The file in each checkpoint folder that holds the clipper's state."""

_NAMES = ("grad_norm_pre", "grad_norm_post", "grad_clip_threshold", "grad_clip_rate")


class GradClipCallback(TrainerCallback):  # type: ignore[misc]
    """Clip gradients with a gradclip strategy before every optimizer step of a ``Trainer``.

    See the module docstring for when it clips, AMP, logging and checkpoints.

    Args:
        strategy: a spec string (``"zclip:z=2.5"``), a factory called with the
            optimizer's ``(name, parameter)`` pairs (in the model's order), or a
            clipper bound already.

    Raises:
        TypeError: ``strategy`` is none of those.
        ValueError: a malformed spec; later, ``TrainingArguments(max_grad_norm)`` not 0.

    Attributes:
        clipper: the clipper (built when training begins for a spec or factory).
        last_stats: the :class:`~gradclip.ClipStats` of the latest step, or None.

    Example:
        >>> GradClipCallback("zclip:z=2.5")
        GradClipCallback('zclip:z=2.5')
    """

    def __init__(self, strategy: Strategy) -> None:
        check_strategy(strategy, "GradClipCallback")
        self.strategy = strategy
        self.clipper: ClipperLike | None = (
            strategy if isinstance(strategy, Clipper | Chain) else None
        )
        self.last_stats: ClipStats | None = None
        self._clipped: Tensor | None = None  # clipped steps since the last log
        self._since_log = 0

    def __repr__(self) -> str:
        strategy = self.strategy if isinstance(self.strategy, str) else describe(self.strategy)
        return f"GradClipCallback({strategy!r})"

    # -- events ----------------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse ``max_grad_norm`` when the Trainer is built."""
        self._check_args(args)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Check the arguments again, build the clipper, restore its state on resume."""
        self._check_args(args)
        if not isinstance(self.strategy, Clipper | Chain):
            if model is None or optimizer is None:
                raise ValueError(
                    f"{self!r} needs the model and optimizer at on_train_begin to build its "
                    "clipper; the Trainer passes them, a custom loop must too"
                )
            params = _in_model_order(
                named_optimizer_params(optimizer, model.named_parameters()), model
            )
            self.clipper = build_clipper(self.strategy, params)
        if state.global_step > 0:
            path = _checkpoint_file(args, state)
            if os.path.isfile(path):
                self.load_state_dict(torch.load(path, weights_only=True))
            else:
                warnings.warn(
                    f"{self!r}: training resumes at step {state.global_step} but {path} "
                    "does not exist; the clipper starts afresh (load its state with "
                    "load_state_dict to continue it)",
                    stacklevel=2,
                )
        self.last_stats = None
        self._clipped = None
        self._since_log = 0

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Unscale (once) if the gradients are still scaled, then clip."""
        clipper = self._require_clipper()
        scaler = getattr(optimizer, "scaler", None)  # an AcceleratedOptimizer's GradScaler
        if scaler is not None and has_grads(bound_params(clipper)):
            inner: Any = getattr(optimizer, "optimizer", optimizer)
            unscale_once_(scaler, inner)
        stats = clipper.clip_()
        self.last_stats = stats
        self._clipped = (
            stats.clipped.long() if self._clipped is None else self._clipped + stats.clipped
        )
        self._since_log += 1

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the clipping metrics to a training log (one with ``"loss"``), once per window."""
        stats = self.last_stats
        if logs is None or "loss" not in logs or stats is None or not self._since_log:
            return
        count = stats.clipped.long() if self._clipped is None else self._clipped
        rate = count.double() / self._since_log
        values = torch.stack(
            [stats.total_norm.double(), stats.clipped_norm.double(), stats.threshold.double(), rate]
        ).tolist()  # one host sync per log
        metrics = dict(
            zip(
                ("grad_norm_pre", "grad_norm_post", "grad_clip_threshold", "grad_clip_rate"), values
            )
        )
        logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(metrics)  # the Trainer stored a copy before calling on_log
        self._clipped = None
        self._since_log = 0

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the clipper's state into the checkpoint folder just saved (main process)."""
        if self.clipper is None or not state.is_world_process_zero:
            return
        path = _checkpoint_file(args, state)
        if os.path.isdir(os.path.dirname(path)):
            torch.save(self.state_dict(), path)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"clipper": the clipper's state}`` (tensors and numbers only)."""
        return {"clipper": self._require_clipper().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the clipper (build it first: ``on_train_begin``)."""
        self._require_clipper().load_state_dict(state_dict["clipper"])

    def _require_clipper(self) -> ClipperLike:
        if self.clipper is None:
            raise RuntimeError(
                f"{self!r} has no clipper yet: it is built when training begins (on_train_begin)"
            )
        return self.clipper

    def _check_args(self, args: TrainingArguments) -> None:
        max_grad_norm = getattr(args, "max_grad_norm", None)
        if max_grad_norm is not None and max_grad_norm > 0:
            raise ValueError(
                f"{self!r} clips the gradients, and TrainingArguments(max_grad_norm="
                f"{max_grad_norm}) makes the Trainer clip them too, before the callback "
                "sees them. max_grad_norm defaults to 1.0: set TrainingArguments("
                "max_grad_norm=0) to clip with GradClipCallback alone."
            )
        if getattr(args, "deepspeed", None):
            raise ValueError(
                f"{self!r} cannot clip under DeepSpeed: it clips inside its engine (set "
                "'gradient_clipping' in the DeepSpeed config)"
            )


def _in_model_order(
    pairs: list[tuple[str, Tensor]], model: torch.nn.Module
) -> list[tuple[str, Tensor]]:
    """The optimizer's ``(name, parameter)`` pairs sorted into ``model.parameters()`` order.

    The Trainer's own clip (``max_grad_norm``) sums the per-parameter norms in the
    model's order, while its default optimizer groups the parameters (decay, then no
    decay); binding in the model's order makes ``"norm:c"`` bit-identical to
    ``max_grad_norm=c``. Parameters the model does not hold keep their optimizer
    order, after the model's.
    """
    position: dict[int, int] = {}
    for index, p in enumerate(model.parameters()):
        position.setdefault(id(p), index)
    return sorted(pairs, key=lambda pair: position.get(id(pair[1]), len(position)))


def _checkpoint_file(args: TrainingArguments, state: TrainerState) -> str:
    folder = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    return os.path.join(str(args.output_dir), folder, STATE_FILE)
