"""Clip before every ``optimizer.step()``: ``attach``, for any ``torch.optim`` optimizer.

::

    handle = attach(optimizer, NormClip(model.parameters(), max_norm=1.0))
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()          # clips first; skips the step if a gradient is NaN/inf
        optimizer.zero_grad()
    handle.last_stats, handle.skipped_steps
    handle.remove()               # or use the handle as a context manager

``attach`` registers a step pre-hook (and a post-hook that cleans up after the step)
on the optimizer; :func:`clipping` does the same through torch's global optimizer
hooks, for training code that builds its optimizer out of reach.

**Folding into fused optimizers.** A torch optimizer built with ``fused=True`` (Adam,
AdamW, SGD, Adagrad; on CPU too) divides every gradient by ``optimizer.grad_scale``
inside its update kernel and skips the update where ``optimizer.found_inf`` is 1:
the contract ``torch.amp.GradScaler`` uses. When the clipper is foldable (a
:class:`~gradclip.clippers.base.GlobalNormClipper` with one parameter group covering
exactly the optimizer's parameters), the hook only measures
(:meth:`~gradclip.clippers.base.Clipper.measure_`: one read of the gradients for their
norms), sets ``grad_scale = 1 / scale`` (times a GradScaler's scale, if one is
active) and, under ``"skip"``, ``found_inf``: no pass over the gradients to apply
the clip and no host sync. Observable consequence: the hook does not write the
gradients; torch's fused kernels store ``grad / grad_scale`` back into ``p.grad`` as
they update, so after the step ``p.grad`` holds the clipped (and unscaled) gradient,
as it would after an explicit clip, written in the kernel's own pass. (On CPU that
store makes a fused step with ``grad_scale`` slower than one without, by about what
the saved scaling pass costs: see ``benchmarks/RESULTS.md``; so on CPU, where
reading a value is free, a step with nothing to clip gets no ``grad_scale`` at all.)
Other clippers
(per-tensor or per-unit scales, several parameter groups, a clipper covering part
of the optimizer, a :func:`~gradclip.clippers.compose.chain`) and the ``"zero"``
policy clip in place, as without folding.

**Chains**: ``attach(optimizer, chain(AGC(params), NormClip(params, 1.0)))`` clips
as ``chain.clip_()`` followed by the step would. The policy applies to the chain's
result (``stats.finite`` of the union of its parameters): the members run with
``"ignore"``; ``"skip"`` skips the whole step, ``"zero"`` zeroes every gradient the
chain binds, and ``"raise"`` checks the gradients before any member runs (one extra
read of them, besides its host sync), so nothing is modified when it raises. A skip
decided on the host rolls back the step counters of the chain and of every member.

**Non-finite gradients** (``nonfinite``; see :mod:`gradclip.nonfinite`): ``"skip"``
(default) skips the optimizer step, leaving parameters and optimizer state
bit-identical to a run without that batch; ``"ignore"``, ``"raise"`` and ``"zero"``
act as in the functional API. Any optimizer that is not fused needs one host sync
per step to skip: the hook reads ``stats.finite`` and, if the gradients are not
finite, hides them (``p.grad = None``) so ``step()`` updates nothing, and puts them
back after the step. A fused optimizer skips through ``found_inf`` (no sync),
except where the skip must be decided on the host (one sync per step, as above):

* on its first step, until it has state for every parameter, because torch's fused
  SGD skipped via ``found_inf`` on its first step would keep uninitialised momentum
  buffers;
* while the clipper's behaviour depends on its step count, so a skipped call must
  not count: a threshold schedule still in progress (``LinearWarmup`` before its
  ``warmup_steps``, ``Cosine`` before its ``total_steps``, any schedule of your own
  always; ``Constant`` and ``RelaxOnCalm`` never), or a warm-up counted in clipper
  steps still in progress (``AdaGC``, ``EMARatio``: until ``clipper.step`` reaches
  ``warmup_steps``). A chain depends on its step count when a member does. Once the
  schedule or warm-up has ended, the fused skip is sync-free again.

A skipped step counts in ``handle.skipped_steps``; where the skip is decided on the
host, the clipper's step counter is rolled back too, so warm-ups and schedules
resume as if the batch never came. On the sync-free fused path the clipper's tensor
state is untouched (its strategy masks non-finite norms) but its step counter
counts the call, which changes nothing gradclip's strategies compute from then on
(that is why the path is taken only then). Each clipper says which case it is in through its
:attr:`~gradclip.clippers.base.Clipper.step_dependent` property (a schedule says
through :meth:`~gradclip.clippers.schedule.Schedule.follows_step`): a clipper of your
own whose strategy reads ``clipper.step`` overrides it, and while it is True the skip
is decided on the host.

**AMP** (``scaler``): see :mod:`gradclip.integrations.amp`. Gradients are unscaled
once before clipping; ``scaler.step`` / ``scaler.update`` work as documented; a step
the scaler skips for inf/NaN never reaches the clipper with an unfused optimizer,
and with a fused one leaves the clipper's tensor state untouched.

**Monitor protocol**: any object with ``observe(stats)``
(:class:`gradclip.GradMonitor` has it) is called once per clipped step with the
step's :class:`~gradclip.clippers.stats.ClipStats`, skipped steps included (under
``"skip"``, ``stats.finite == False`` marks them).

Closures (``optimizer.step(closure)``, e.g. LBFGS): the closure is wrapped so each
evaluation's gradients are clipped in place after it returns; a step that evaluates
its closure cannot be skipped beforehand, so ``"skip"`` raises there.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from gradclip._params import collect_grads
from gradclip._sync import branch_on_host
from gradclip.clippers.base import Clipper
from gradclip.clippers.compose import Chain
from gradclip.clippers.stats import ClipStats
from gradclip.integrations.amp import check_scaler, grads_scaled_by, unscale_grads_
from gradclip.nonfinite import (
    StepPolicy,
    check_step_policy,
    hide_grads_,
    raise_if_nonfinite,
    restore_grads_,
    skip_found_inf,
    zero_if_nonfinite_,
)
from gradclip.norms import tensor_norms, total_norm_of

__all__ = ["ClipHandle", "StepMonitor", "attach", "clipping"]

_MISSING = object()
_BOUND_OPTIMIZERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, ClipHandle] = (
    weakref.WeakKeyDictionary()
)
_BOUND_CLIPPERS: weakref.WeakKeyDictionary[Clipper | Chain, ClipHandle] = (
    weakref.WeakKeyDictionary()
)


@runtime_checkable
class StepMonitor(Protocol):
    """What ``attach`` calls a monitor with: ``observe(stats)`` once per clipped step."""

    def observe(self, stats: ClipStats) -> Any:
        """Record one step's clip statistics (0-d tensors; do not read them every step)."""


class ClipHandle:
    """The binding of a clipper to an optimizer's steps; :func:`attach` returns one.

    Attributes:
        clipper: the clipper (or chain).
        optimizer: the optimizer (None until the first step for :func:`clipping`).
        scaler: the ``torch.amp.GradScaler``, or None.
        monitor: the object whose ``observe(stats)`` is called each step, or None.
        nonfinite: the non-finite policy.
        last_stats: the most recent step's :class:`ClipStats` (None before the first).
        skipped_steps: how many steps the ``"skip"`` policy skipped, a 0-d int64
            tensor on the gradients' device (reading it is a host sync: do it at a
            logging interval). Steps a GradScaler skips by itself are not counted.
        steps: how many optimizer steps were clipped (a host int, skipped ones included).
        folded: whether the most recent step had the clip folded into a fused kernel.

    Example:
        A step whose gradient holds a NaN is skipped (``nonfinite="skip"``, the
        default): the parameter is untouched and the skip is counted.

        >>> from gradclip.clippers.fixed import NormClip
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> handle = attach(opt, NormClip([w], max_norm=1.0))
        >>> w.grad = torch.tensor([float("nan"), 1.0])
        >>> opt.step()
        >>> handle.steps, handle.skipped_steps, w.detach(), handle.last_stats.finite
        (1, tensor(1), tensor([0., 0.]), tensor(False))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> opt.step()
        >>> handle.steps, handle.skipped_steps, w.detach(), handle.folded
        (2, tensor(1), tensor([-0.6000, -0.8000]), False)
        >>> handle
        ClipHandle(NormClip on SGD, nonfinite='skip', attached, steps=2)
        >>> handle.remove()
        >>> handle.attached
        False
    """

    def __init__(
        self,
        clipper: Clipper | Chain,
        *,
        scaler: torch.amp.GradScaler | None = None,
        monitor: StepMonitor | None = None,
        nonfinite: StepPolicy = "skip",
    ) -> None:
        if not isinstance(clipper, Clipper | Chain):
            raise TypeError(
                "clipper must be a gradclip Clipper (e.g. NormClip(params, 1.0)) or a "
                f"chain(...) of them; got {type(clipper).__name__}"
            )
        self.nonfinite: StepPolicy = check_step_policy(nonfinite)
        self._policy = "ignore" if self.nonfinite == "skip" else self.nonfinite
        for leaf in _leaves(clipper):
            if leaf.nonfinite not in ("ignore", self._policy):
                which = "clipper" if leaf is clipper else f"chain member {type(leaf).__name__}"
                raise ValueError(
                    f"the {which} has nonfinite={leaf.nonfinite!r} but attach got "
                    f"nonfinite={self.nonfinite!r}; the attach policy applies, so build the "
                    "clipper with nonfinite='ignore' or pass the same policy to attach"
                )
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise TypeError(
                "monitor must have an observe(stats) method (e.g. gradclip.GradMonitor) "
                f"or be None; got {type(monitor).__name__}"
            )
        self.clipper = clipper
        self.scaler = check_scaler(scaler)
        self.monitor = monitor
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_stats: ClipStats | None = None
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self.steps = 0
        self.folded = False
        self._hooks: list[RemovableHandle] = []
        self._removed = False
        self._saved_attrs: list[tuple[str, object]] = []
        self._hidden: list[tuple[Tensor, Tensor]] = []
        self._covers: tuple[int, int, bool] = (-1, -1, False)
        self._ignored: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()

    # -- lifetime -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._hooks) and not self._removed

    def remove(self) -> None:
        """Stop clipping: remove the hooks (idempotent). The clipper keeps its state."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._removed = True
        self._undo()
        if self.optimizer is not None and _BOUND_OPTIMIZERS.get(self.optimizer) is self:
            del _BOUND_OPTIMIZERS[self.optimizer]
        if _BOUND_CLIPPERS.get(self.clipper) is self:
            del _BOUND_CLIPPERS[self.clipper]

    detach = remove

    def __enter__(self) -> ClipHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        where = "not bound yet" if self.optimizer is None else type(self.optimizer).__name__
        state = "attached" if self.attached else "removed"
        return (
            f"ClipHandle({type(self.clipper).__name__} on {where}, "
            f"nonfinite={self.nonfinite!r}, {state}, steps={self.steps})"
        )

    def _bind(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}"
            )
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [
            name
            for group in self.clipper.param_groups
            for name, p in zip(group["names"], group["params"])
            if id(p) not in owned
        ]
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise ValueError(
                f"the clipper's parameters {shown} are not in the "
                f"{type(optimizer).__name__}: a clipper must clip parameters its "
                "optimizer updates"
            )
        other = _BOUND_OPTIMIZERS.get(optimizer)
        if other is not None and other is not self:
            raise ValueError(
                f"this {type(optimizer).__name__} already has a clipper attached "
                f"({type(other.clipper).__name__}); remove that handle first"
            )
        other = _BOUND_CLIPPERS.get(self.clipper)
        if other is not None and other is not self:
            raise ValueError(
                f"this {type(self.clipper).__name__} is already attached to another "
                "optimizer; a clipper counts one step per optimizer step, so bind it once"
            )
        self.optimizer = optimizer
        _BOUND_OPTIMIZERS[optimizer] = self
        _BOUND_CLIPPERS[self.clipper] = self

    # -- the hooks ------------------------------------------------------------------

    def _pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._undo()  # what a step that raised before the post-hook left behind
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None:
            wrapped = self._clipping_closure(closure)
            if len(args) > 1:
                return (args[0], wrapped, *args[2:]), kwargs
            return args, {**kwargs, "closure": wrapped}
        try:
            with torch.no_grad():
                self._before_step(optimizer)
        except BaseException:
            self._undo()  # the step will not run: leave the optimizer as it was
            raise
        return None

    def _post_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._undo()

    def _global_pre_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if optimizer is not self.optimizer:
            if optimizer in self._ignored:
                return None
            mine = {id(p) for g in self.clipper.param_groups for p in g["params"]}
            if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
                self._ignored.add(optimizer)
                return None
            if self.optimizer is not None:
                first, second = type(self.optimizer).__name__, type(optimizer).__name__
                raise ValueError(
                    f"the clipper's parameters are in two optimizers ({first} and "
                    f"{second}); a clipper can follow one"
                )
            self._bind(optimizer)
        return self._pre_hook(optimizer, args, kwargs)

    def _global_post_hook(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if optimizer is self.optimizer:
            self._undo()

    # -- one step ---------------------------------------------------------------------

    def _before_step(self, optimizer: torch.optim.Optimizer) -> None:
        scaled_by = grads_scaled_by(optimizer, self.scaler)
        outer_found_inf: Tensor | None = getattr(optimizer, "found_inf", None)
        fused = _is_fused(optimizer)
        decide_on_host = self.nonfinite == "raise" or (
            self.nonfinite == "skip"
            and not (fused and _has_state(optimizer) and not self.clipper.step_dependent)
        )
        if decide_on_host and outer_found_inf is not None and bool(outer_found_inf):
            # The GradScaler skips this step (inf/NaN in the scaled gradients): leave the
            # clipper alone, as an unfused optimizer's scaler.step() does. Hiding the
            # gradients also spares a first fused step from torch's found_inf skip.
            self._hidden = hide_grads_(_params(optimizer))
            return
        self.folded = fused and self._foldable(optimizer)
        if self.folded:
            clipper = cast(Clipper, self.clipper)  # foldable: a Clipper, never a chain
            stats = self._with_policy(lambda: clipper.measure_(grad_scale=scaled_by))
            if scaled_by is None and _nothing_to_fold(stats.scale):
                pass  # on CPU, a kernel given a grad_scale also stores the gradients back
            else:
                divisor = stats.scale.to(torch.float32).reciprocal()
                if scaled_by is not None:
                    divisor = scaled_by.to(divisor.device, torch.float32) * divisor
                self._set(optimizer, "grad_scale", divisor)
        else:
            if scaled_by is not None:  # fused step under a GradScaler: unscale, then clip
                unscale_grads_(_grads(optimizer), scaled_by)
                self._set(optimizer, "grad_scale", None)
            stats = self._with_policy(self._clip)
        self.steps += 1
        self.last_stats = stats
        if self.nonfinite == "skip":
            self._skip_if_nonfinite(optimizer, stats, outer_found_inf, on_host=decide_on_host)
        if self.monitor is not None:
            self.monitor.observe(stats)

    def _skip_if_nonfinite(
        self,
        optimizer: torch.optim.Optimizer,
        stats: ClipStats,
        outer_found_inf: Tensor | None,
        *,
        on_host: bool,
    ) -> None:
        if self.skipped_steps.device != stats.finite.device:
            self.skipped_steps = self.skipped_steps.to(stats.finite.device)
        if on_host:
            if bool(stats.finite):  # the one host sync of this path
                return
            self._hidden = hide_grads_(_params(optimizer))
            _roll_back_step(self.clipper)  # the step never happened, for the clipper too
            self.skipped_steps += 1
            return
        self._set(optimizer, "found_inf", skip_found_inf(stats.finite, outer_found_inf))
        ours = ~stats.finite
        if outer_found_inf is not None:  # the scaler's own skips are the scaler's to count
            ours = ours & (outer_found_inf.to(ours.device) == 0)
        self.skipped_steps += ours

    def _clipping_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        if self.nonfinite == "skip":
            raise ValueError(
                "nonfinite='skip' cannot skip optimizer.step(closure): the gradients exist "
                "only once the step has begun; attach with nonfinite='raise', 'zero' or "
                "'ignore' for closure-based optimizers such as LBFGS"
            )

        def clipped() -> Any:
            loss = closure()
            with torch.no_grad():
                stats = self._with_policy(self._clip)
            self.steps += 1
            self.last_stats = stats
            self.folded = False
            if self.monitor is not None:
                self.monitor.observe(stats)
            return loss

        return clipped

    def _with_policy(self, run: Callable[[], ClipStats]) -> ClipStats:
        """Run with the attach policy set on the clipper (a chain's members: ``"ignore"``)."""
        leaves = _leaves(self.clipper)
        policy = "ignore" if isinstance(self.clipper, Chain) else self._policy
        saved = [leaf.nonfinite for leaf in leaves]
        for leaf in leaves:
            leaf.nonfinite = policy
        try:
            return run()
        finally:
            for leaf, value in zip(leaves, saved):
                leaf.nonfinite = value

    def _clip(self) -> ClipStats:
        """``clipper.clip_()``; for a chain, with the policy applied to the chain's result."""
        clipper = self.clipper
        if not isinstance(clipper, Chain):
            return clipper.clip_()
        if self.nonfinite == "raise":
            _raise_if_nonfinite(clipper)  # before any member modifies a gradient
        stats = clipper.clip_()
        if self.nonfinite == "zero":
            grads = [p.grad for p in clipper.params if p.grad is not None]
            zero_if_nonfinite_(grads, stats.total_norm)
            clipped_norm = torch.where(stats.finite, stats.clipped_norm, 0.0)
            scale = torch.where(stats.finite, stats.scale, 0.0)  # as a Clipper reports it
            stats = dataclasses.replace(stats, clipped_norm=clipped_norm, scale=scale)
        return stats

    def _foldable(self, optimizer: torch.optim.Optimizer) -> bool:
        """A foldable clipper whose parameters are exactly the optimizer's (cached)."""
        if self.nonfinite == "zero" or isinstance(self.clipper, Chain):
            return False  # "zero" writes the gradients; a chain has no single factor
        if not self.clipper.foldable:
            return False
        n_opt = sum(len(g["params"]) for g in optimizer.param_groups)
        n_clip = sum(len(g["params"]) for g in self.clipper.param_groups)
        if self._covers[:2] != (n_opt, n_clip):
            mine = {id(p) for g in self.clipper.param_groups for p in g["params"]}
            theirs = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self._covers = (n_opt, n_clip, mine == theirs)
        return self._covers[2]

    def _set(self, optimizer: torch.optim.Optimizer, name: str, value: object) -> None:
        self._saved_attrs.append((name, getattr(optimizer, name, _MISSING)))
        setattr(optimizer, name, value)

    def _undo(self) -> None:
        """Put back the optimizer attributes and gradients the pre-hook changed."""
        optimizer = self.optimizer
        if optimizer is not None:
            for name, value in reversed(self._saved_attrs):
                if value is _MISSING:
                    if hasattr(optimizer, name):
                        delattr(optimizer, name)
                else:
                    setattr(optimizer, name, value)
        self._saved_attrs = []
        if self._hidden:
            restore_grads_(self._hidden)
            self._hidden = []


def attach(
    optimizer: torch.optim.Optimizer,
    clipper: Clipper | Chain,
    *,
    scaler: torch.amp.GradScaler | None = None,
    monitor: StepMonitor | None = None,
    nonfinite: StepPolicy = "skip",
) -> ClipHandle:
    """Clip with ``clipper`` at the start of every ``optimizer.step()``.

    Works with any ``torch.optim`` optimizer; with ``fused=True`` Adam, AdamW, SGD or
    Adagrad and a foldable clipper, the clip is folded into the fused kernel (no extra
    pass over the gradients, no host sync). See the module docstring for the details.

    Host syncs under ``"skip"``: none per step with a fused optimizer, except on its
    first step and while the clipper depends on its step count (a threshold schedule
    or an ``AdaGC``/``EMARatio`` warm-up still in progress: see the module
    docstring), where the skip is decided on the host (one sync per step) so that a
    skipped batch does not shift the schedule; one per step with any other optimizer.

    Args:
        optimizer: the optimizer whose steps to clip.
        clipper: a :class:`~gradclip.clippers.base.Clipper` or a
            :func:`~gradclip.clippers.compose.chain` of them; its parameters must all
            be in ``optimizer``. Its own non-finite policy (each chain member's) must
            be ``"ignore"`` or the same as ``nonfinite``; for a chain the policy
            applies to the chain's result.
        scaler: the ``torch.amp.GradScaler`` of an AMP loop (step with
            ``scaler.step(optimizer)``), or None.
        monitor: an object with ``observe(stats)``, e.g. :class:`gradclip.GradMonitor`,
            called once per clipped step; or None.
        nonfinite: ``"skip"`` (default: skip the step), ``"ignore"``, ``"raise"`` or
            ``"zero"`` (see :mod:`gradclip.nonfinite`).

    Returns:
        A :class:`ClipHandle`: ``remove()`` (alias ``detach()``) or use it as a context
        manager; ``last_stats``, ``skipped_steps``.

    Raises:
        TypeError: ``optimizer``, ``clipper``, ``scaler`` or ``monitor`` of the wrong type.
        ValueError: an unknown policy, a policy conflicting with the clipper's, clipper
            parameters missing from the optimizer, or an optimizer or clipper that is
            already attached.

    Example:
        >>> from gradclip.clippers.fixed import NormClip
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> with attach(opt, NormClip([w], max_norm=1.0)) as handle:
        ...     w.grad = torch.tensor([3.0, 4.0])
        ...     opt.step()
        >>> w.detach(), handle.last_stats.total_norm
        (tensor([-0.6000, -0.8000]), tensor(5.))
    """
    handle = ClipHandle(clipper, scaler=scaler, monitor=monitor, nonfinite=nonfinite)
    handle._bind(optimizer)
    handle._hooks = [
        optimizer.register_step_pre_hook(handle._pre_hook),
        optimizer.register_step_post_hook(handle._post_hook),
    ]
    return handle


def clipping(
    clipper: Clipper | Chain,
    *,
    scaler: torch.amp.GradScaler | None = None,
    monitor: StepMonitor | None = None,
    nonfinite: StepPolicy = "skip",
) -> ClipHandle:
    """:func:`attach` for code that builds its optimizer out of reach: a context manager.

    Inside the ``with`` block, the first optimizer to step that holds the clipper's
    parameters is attached to (through torch's global optimizer step hooks); other
    optimizers are left alone. Arguments as for :func:`attach`.

    Raises:
        TypeError, ValueError: as :func:`attach`; at the first step for problems that
            need the optimizer (parameters split across optimizers, say).

    Example:
        >>> from gradclip.clippers.fixed import NormClip
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> def train():  # builds its own optimizer
        ...     opt = torch.optim.SGD([w], lr=1.0)
        ...     w.grad = torch.tensor([3.0, 4.0])
        ...     opt.step()
        >>> with clipping(NormClip([w], max_norm=1.0)) as handle:
        ...     train()
        >>> w.detach(), handle.steps
        (tensor([-0.6000, -0.8000]), 1)
    """
    handle = ClipHandle(clipper, scaler=scaler, monitor=monitor, nonfinite=nonfinite)
    other = _BOUND_CLIPPERS.get(clipper)
    if other is not None:
        raise ValueError(
            f"this {type(clipper).__name__} is already attached to an optimizer; "
            "remove that handle first"
        )
    handle._hooks = [
        register_optimizer_step_pre_hook(handle._global_pre_hook),
        register_optimizer_step_post_hook(handle._global_post_hook),
    ]
    return handle


def _leaves(clipper: Clipper | Chain) -> list[Clipper]:
    """The clippers that do the work: the clipper itself, or a chain's members, flattened."""
    if isinstance(clipper, Chain):
        return [leaf for member in clipper.members for leaf in _leaves(member)]
    return [clipper]


def _roll_back_step(clipper: Clipper | Chain) -> None:
    """Undo the step count of one ``clip_()`` call (a chain calls each member once)."""
    clipper.step -= 1
    if isinstance(clipper, Chain):
        for member in clipper.members:
            _roll_back_step(member)


def _raise_if_nonfinite(clipper: Chain) -> None:
    """The ``"raise"`` policy for a chain: check the union of its gradients first (one sync)."""
    seen: set[int] = set()
    pairs: list[tuple[str, Tensor]] = []
    for group in clipper.param_groups:
        for name, p in zip(group["names"], group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                pairs.append((name, p))
    grads = collect_grads(pairs, empty_generator_ok=True)
    if grads.grads:
        norms = tensor_norms(grads.grads, clipper.norm_type)
        raise_if_nonfinite(
            grads, norms, total_norm_of(norms, clipper.norm_type), norm_type=clipper.norm_type
        )


def _params(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    return (p for group in optimizer.param_groups for p in group["params"])


def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for p in _params(optimizer) if p.grad is not None]


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """A torch optimizer whose fused kernel reads ``grad_scale`` and ``found_inf``."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def _nothing_to_fold(scale: Tensor) -> bool:
    """A scale of exactly 1, read on the host only where that is free (on the CPU)."""
    return branch_on_host([scale]) and bool(scale == 1.0)


def _has_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter with a gradient has its optimizer state (host lookups only).

    A fused step skipped through ``found_inf`` before the state exists would create
    it anyway (and torch's fused SGD would keep uninitialised momentum buffers).
    """
    state = optimizer.state
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.SGD):
            if group["momentum"] == 0:
                continue  # plain SGD keeps no state
            needed = "momentum_buffer"
            if any(p.grad is not None and needed not in state.get(p, ()) for p in group["params"]):
                return False
        elif any(p.grad is not None and not state.get(p) for p in group["params"]):
            return False
    return True
