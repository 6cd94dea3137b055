"""PyTorch Lightning: the :class:`GradClip` callback clips before every optimizer step.

::

    from gradclip.integrations.lightning import GradClip

    trainer = Trainer(callbacks=[GradClip("zclip:z=2.5")])   # no gradient_clip_val

**Where it clips.** In Lightning's ``on_before_optimizer_step`` hook, which runs
inside the optimizer step, after the backward pass(es) of the step (gradient
accumulation included) and after the AMP scaler's ``unscale_``: the gradients it
clips are the ones the optimizer applies. Callbacks run in list order, before the
LightningModule's own ``on_before_optimizer_step``.

**Automatic and manual optimization.** The same hook runs in both: in manual
optimization ``opt.step()`` (the ``LightningOptimizer``) goes through the precision
plugin, which unscales and then calls the hook. The usual manual-optimization
recipe, ``self.clip_gradients(opt, ...)`` between ``manual_backward`` and
``opt.step()``, clips gradients that ``16-mixed`` has *not* unscaled yet (Lightning
unscales inside ``opt.step()``), so its threshold is applied to ``loss_scale ×``
the gradient. ``GradClip`` does not have that problem.

**Unscaled exactly once.** With ``16-mixed``, Lightning's precision plugin calls
``scaler.unscale_(optimizer)`` before the hook, and ``scaler.step`` then does not
unscale again. The exception is a fused optimizer (``fused=True``): Lightning leaves
its gradients scaled for the kernel to divide. There ``GradClip`` unscales them
itself through the same scaler before clipping; ``scaler.step`` then hands the
kernel no ``grad_scale``, so nothing is divided twice. With ``32`` and
``bf16-mixed`` there is no scaler and nothing to unscale.

**The strategy** is one of:

* a spec string (``"norm:1.0"``, ``"agc:0.01"``, ``"zclip:z=2.5"``; see
  :func:`gradclip.from_spec`): a clipper is built in ``on_fit_start`` (when the
  optimizers exist) for each optimizer, bound to that optimizer's parameters under
  their names in the LightningModule;
* a factory: called the same way, with the optimizer's ``(name, parameter)`` pairs,
  returning a clipper (``functools.partial(ZClip, z_thresh=2.5)``, or
  ``lambda params: chain(AGC(params), NormClip(params, max_norm=1.0))``);
* a clipper (or chain) bound already, e.g. to ``model.parameters()``: used as it
  is, which only makes sense with one optimizer (several raise).

With several optimizers (e.g. a GAN in manual optimization) each gets its own
clipper, so a step clips only the gradients that optimizer applies.

**Logging** (through ``pl_module.log``, ``on_step=True``), every ``log_every``
optimizer steps, by default ``Trainer(log_every_n_steps=...)``, the steps at which
Lightning writes to its loggers: ``grad_norm_pre`` and ``grad_norm_post`` (the global
norm before and after clipping, this step), ``grad_clip_threshold`` (``inf`` while a
strategy warms up) and ``grad_clip_rate`` (the fraction of the optimizer steps since
the previous log that were clipped). With several optimizers each name gets the
suffix ``/opt{index}``. The values are handed over as tensors (no host sync);
Lightning reads them when it writes. A ``log_every`` that is not Lightning's
``log_every_n_steps`` works, but Lightning keeps a step metric until the epoch
ends: at its write steps in between, loggers get the last logged value again.

**Checkpoints.** The clippers' states are saved in the checkpoint under the
callback's ``state_key`` and restored when fitting resumes from it
(``trainer.fit(..., ckpt_path=...)``), before the first step. Lightning restores
callbacks before ``on_fit_start``, so the state is held until the clippers are built.

**Refused.** ``Trainer(gradient_clip_val=...)`` alongside ``GradClip`` (Lightning
would clip a second time after it; a LightningModule that overrides
``configure_gradient_clipping`` gets a warning for the same reason); DeepSpeed (it
clips inside its engine: set ``gradient_clipping`` in its config) and Lightning's
``FSDPStrategy`` (FSDP1 keeps flat sharded gradients whose norms would be per-rank;
``ModelParallelStrategy``, FSDP2 with DTensor gradients, works).

Lightning 2.x is supported, from the ``lightning`` package or the standalone
``pytorch_lightning`` one (with both installed, ``GradClip`` is a callback of both).
"""

from __future__ import annotations

import importlib
import importlib.util
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

__all__ = ["GradClip"]


def _callback_base() -> type:
    """Lightning's ``Callback`` (both packages' when both are installed)."""
    bases: list[type] = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        root = package.partition(".")[0]
        if importlib.util.find_spec(root) is None:
            continue
        try:
            bases.append(importlib.import_module(package).Callback)
        except ImportError:  # e.g. a `lightning` install without its pytorch part
            continue
    if not bases:
        raise missing_framework("gradclip.integrations.lightning", "PyTorch Lightning", "lightning")
    if len(bases) == 1:
        return bases[0]
    return type("_LightningCallbacks", tuple(bases), {"__module__": __name__})


if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as _CallbackBase
else:
    _CallbackBase = _callback_base()

_NAMES = ("grad_norm_pre", "grad_norm_post", "grad_clip_threshold", "grad_clip_rate")


class GradClip(_CallbackBase):
    """Clip gradients with a gradclip strategy before every optimizer step (a Lightning callback).

    See the module docstring for when it clips, how AMP is handled, and what it logs.

    Args:
        strategy: a spec string (``"zclip:z=2.5"``), a factory called with each
            optimizer's ``(name, parameter)`` pairs, or a clipper bound already.
        log_every: log through ``pl_module.log`` every this many optimizer steps
            (0: never); None (the default) follows ``Trainer(log_every_n_steps)``.

    Raises:
        TypeError: ``strategy`` is none of those, or ``log_every`` is not an int or None.
        ValueError: a malformed spec string, or a negative ``log_every``.

    Attributes:
        clippers: one clipper per optimizer, in the trainer's order (built in
            ``on_fit_start`` for a spec or a factory).
        last_stats: each optimizer's :class:`~gradclip.ClipStats` of its latest step.

    Example:
        >>> GradClip("zclip:z=2.5", log_every=10)
        GradClip('zclip:z=2.5', log_every=10)
    """

    def __init__(self, strategy: Strategy, *, log_every: int | None = None) -> None:
        check_strategy(strategy, "GradClip")
        if log_every is not None and (
            isinstance(log_every, bool) or not isinstance(log_every, int)
        ):
            raise TypeError(f"log_every must be an int >= 0 or None; got {log_every!r}")
        if log_every is not None and log_every < 0:
            raise ValueError(f"log_every must be >= 0 (0: no logging); got {log_every}")
        self.strategy = strategy
        self.log_every = log_every
        self._every = 0 if log_every is None else log_every
        self.clippers: list[ClipperLike] = []
        self.last_stats: list[ClipStats | None] = []
        self._pending: list[dict[str, Any]] | None = None
        self._calls: list[int] = []
        self._clipped: list[Tensor | None] = []  # clipped steps since the last log
        self._since_log: list[int] = []
        self._fitting = False
        if isinstance(strategy, Clipper | Chain):
            self._set_clippers([strategy])

    def __repr__(self) -> str:
        strategy = self.strategy if isinstance(self.strategy, str) else describe(self.strategy)
        return f"GradClip({strategy!r}, log_every={self.log_every})"

    @property
    def state_key(self) -> str:
        """The key of this callback's state in checkpoints (includes the strategy)."""
        return f"GradClip[{describe(self.strategy)}]"

    # -- Lightning hooks ------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse settings that would clip twice or that gradclip cannot clip correctly."""
        if stage != "fit":
            return
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and clip_val != 0:
            raise ValueError(
                f"{self!r} and Trainer(gradient_clip_val={clip_val}) both clip the "
                "gradients: Lightning would clip again after GradClip. Leave "
                "gradient_clip_val unset (None) to clip with GradClip alone."
            )
        own_clipping = _user_defines(pl_module, "configure_gradient_clipping")
        if pl_module.automatic_optimization and own_clipping:
            warnings.warn(
                f"{type(pl_module).__name__} overrides configure_gradient_clipping, which "
                f"Lightning calls after {self!r} has clipped: if it clips too, the "
                "gradients are clipped twice",
                stacklevel=2,
            )
        strategy = type(trainer.strategy).__name__
        if strategy == "DeepSpeedStrategy":
            raise ValueError(
                f"{self!r} cannot clip under DeepSpeedStrategy: DeepSpeed clips inside its "
                "engine (set 'gradient_clipping' in its config)"
            )
        if strategy == "FSDPStrategy":
            raise ValueError(
                f"{self!r} cannot clip under FSDPStrategy: FSDP1's flat sharded gradients "
                "give per-rank norms; use ModelParallelStrategy (FSDP2), whose DTensor "
                "gradients gradclip reduces across ranks"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build a clipper per optimizer (spec or factory) and restore a held checkpoint state."""
        optimizers = list(trainer.optimizers)
        every = self.log_every
        self._every = getattr(trainer, "log_every_n_steps", 50) if every is None else every
        if not self._buildable():
            if len(optimizers) > 1:
                raise ValueError(
                    f"{self!r} got a clipper bound to fixed parameters, but the "
                    f"LightningModule has {len(optimizers)} optimizers; pass a spec string "
                    "or a factory so each optimizer gets its own clipper"
                )
        else:
            named = list(pl_module.named_parameters())
            clippers: list[ClipperLike] = []
            for index, optimizer in enumerate(optimizers):
                params = named_optimizer_params(optimizer, named)
                old = self.clippers[index] if index < len(self.clippers) else None
                if old is not None and _same(bound_params(old), [p for _, p in params]):
                    clippers.append(old)  # a second fit on the same optimizer's parameters
                else:
                    clippers.append(build_clipper(self.strategy, params))
            self._set_clippers(clippers)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        self._fitting = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mark the fit as over: a state loaded from now on waits for the next ``on_fit_start``."""
        self._fitting = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """As :meth:`on_fit_end`, for a fit that ended with an exception."""
        self._fitting = False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Unscale if Lightning has not (fused optimizers under ``16-mixed``), clip, log."""
        index = self._index_of(trainer, optimizer)
        clipper = self.clippers[index]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and has_grads(bound_params(clipper)):
            unscale_once_(scaler, optimizer)
        stats = clipper.clip_()
        self.last_stats[index] = stats
        self._calls[index] += 1
        if not self._every:
            return
        clipped = self._clipped[index]
        self._clipped[index] = stats.clipped.long() if clipped is None else clipped + stats.clipped
        self._since_log[index] += 1
        if self._calls[index] % self._every == 0:
            self._log(pl_module, index, stats)

    def state_dict(self) -> dict[str, Any]:
        """``{"clippers": [each optimizer's clipper state]}``: tensors and numbers only."""
        if self._pending is not None:  # loaded, not yet applied: still the latest state
            return {"clippers": self._pending}
        if self.clippers:
            return {"clippers": [c.state_dict() for c in self.clippers]}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: now if the clippers exist, else when they are built.

        Raises:
            ValueError: the number of clippers differs from the checkpoint's.
        """
        states = list(state_dict.get("clippers", []))
        if not self._buildable() or self._fitting:
            self._load(states)  # the clippers in use now are the ones to restore
        else:
            self._pending = states  # Lightning restores callbacks before on_fit_start

    # -- internals ---------------------------------------------------------------------

    def _buildable(self) -> bool:
        """Whether the strategy builds clippers (a spec or a factory), not a bound clipper."""
        return not isinstance(self.strategy, Clipper | Chain)

    def _set_clippers(self, clippers: list[ClipperLike]) -> None:
        self.clippers = clippers
        n = len(clippers)
        self.last_stats = [None] * n
        self._calls = [0] * n
        self._clipped = [None] * n
        self._since_log = [0] * n

    def _load(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.clippers):
            raise ValueError(
                f"the checkpoint holds {len(states)} clipper state(s) for {self!r}, but it "
                f"has {len(self.clippers)} clipper(s) (one per optimizer)"
            )
        for clipper, state in zip(self.clippers, states):
            clipper.load_state_dict(state)

    def _index_of(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
        optimizers = list(trainer.optimizers)
        index = next((i for i, o in enumerate(optimizers) if o is optimizer), None)
        if not self._buildable():
            return 0
        if index is None:
            raise ValueError(
                f"{self!r} was called for an optimizer ({type(optimizer).__name__}) that is "
                "not in trainer.optimizers"
            )
        if index >= len(self.clippers):
            raise RuntimeError(
                f"{self!r} has no clipper for optimizer {index}: on_fit_start did not run "
                "for it (optimizers added after the fit started?)"
            )
        return index

    def _log(self, pl_module: pl.LightningModule, index: int, stats: ClipStats) -> None:
        clipped = self._clipped[index]
        count = stats.clipped.long() if clipped is None else clipped
        rate = count.to(stats.total_norm.dtype) / max(self._since_log[index], 1)
        values = (stats.total_norm, stats.clipped_norm, stats.threshold, rate)
        suffix = f"/opt{index}" if len(self.clippers) > 1 else ""
        for name, value in zip(_NAMES, values):
            pl_module.log(name + suffix, value, on_step=True, on_epoch=False)
        self._clipped[index] = None
        self._since_log[index] = 0


def _user_defines(pl_module: object, name: str) -> bool:
    """Whether a class of the user's (not Lightning's) in the module's MRO defines ``name``."""
    for cls in type(pl_module).__mro__:
        if cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning", "builtins"):
            continue
        if name in cls.__dict__:
            return True
    return False


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
