"""The ``Clipper`` base: a stateful strategy bound to parameters like a torch optimizer.

A clipper owns parameter groups (each with its own options), per-group state made
of tensors and numbers, and one entry point, :meth:`Clipper.clip_`, which:

1. reads every bound gradient's norm in one fused pass (:func:`gradclip.tensor_norms`),
2. applies the non-finite policy's check (``"raise"`` only: one host sync),
3. lets the strategy turn norms and state into scales, apply them in place and
   update its state (:meth:`Clipper._clip_group`), all on the device,
4. returns :class:`ClipStats` of 0-d tensors.

Nothing in ``clip_()`` reads a device tensor on the host, except the explicit
``"raise"`` policy. A strategy never lets a non-finite norm into its state: updates
are masked with :meth:`Clipper.keep_if_finite`, so a bad batch cannot poison an
adaptive threshold.

Subclasses set ``defaults`` through ``super().__init__`` and implement
``_clip_group`` (or, for strategies that scale a group by one factor, subclass
:class:`GlobalNormClipper` and implement ``_threshold`` and ``_update``). A strategy
with a threshold that may follow a schedule subclasses :class:`ScheduledClipper`
(as :class:`GlobalNormClipper` does).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from gradclip._foreach import Groups, group_tensors
from gradclip._params import GradList, ParamsLike, check_norm_type, collect_grads, split_named
from gradclip.clippers.schedule import Schedule, check_schedule
from gradclip.clippers.stats import ClipStats
from gradclip.functional import clip_coefficient, scale_grads_
from gradclip.nonfinite import check_policy, raise_if_nonfinite, zero_if_nonfinite_
from gradclip.norms import check_norm_kernel, tensor_norms, total_norm_of

State = dict[str, Any]
"""A group's state: names to tensors or numbers (so ``torch.load(weights_only=True)`` works)."""

ParamGroup = dict[str, Any]
"""A parameter group: ``params`` (list of tensors), ``names`` (list of str), and options."""


@dataclass(frozen=True)
class GroupResult:
    """What a strategy did to one parameter group (all 0-d tensors).

    Attributes:
        threshold: the largest group norm let through unchanged (``inf``: no clipping).
        clipped_norm: the group's norm after clipping.
        clipped: whether any gradient of the group was scaled down.
        scale: the one factor every gradient of the group was multiplied by, for
            strategies that have one (:class:`GlobalNormClipper`, EMARatio's global
            mode, AdaGC's warm-up); None otherwise. ``ClipStats.scale`` of a
            one-group clipper is this very tensor, so it is exactly the factor applied.
    """

    threshold: Tensor
    clipped_norm: Tensor
    clipped: Tensor
    scale: Tensor | None = None


_REGISTRY: dict[str, type[Clipper]] = {}


class Clipper:
    """Base class of stateful clipping strategies.

    Args:
        params: an iterable of parameters, ``named_parameters()`` pairs, or dicts
            (param groups) with a ``"params"`` entry and per-group options.
        defaults: the strategy's options and their default values.
        norm_type: the p of the norms, p > 0 or ``inf``.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"`` (see
            :mod:`gradclip.nonfinite`). Whatever the policy, non-finite norms never
            enter the strategy's state.
        norm_kernel: how L2 norms are computed (see :func:`gradclip.tensor_norms`):
            ``"blocked"``: faster and more accurate on large CPU tensors, norms differ
            from ``torch.nn.utils`` in the last bits (more on very large tensors,
            where torch's CPU kernel loses precision); ``"torch"``: bit-identical to
            ``torch.nn.utils``. None: the class's
            :attr:`~gradclip.clippers.base.Clipper.default_norm_kernel`. A
            construction option, not part of the state dict.

    Attributes:
        param_groups: the groups, each a dict with ``params``, ``names`` and options.
        state: one state dict per group.
        step: the number of ``clip_()`` calls so far.
        norm_kernel: the norm kernel in use, ``"torch"`` or ``"blocked"``.

    Raises:
        ValueError: an unknown ``norm_kernel`` (the message names it and the choices).
    """

    spec_name: ClassVar[str | None] = None
    """The name in strategy spec strings (``"zclip"``), or None if not reachable by spec."""
    spec_positional: ClassVar[str | None] = None
    """The option a bare spec value sets (``"norm:1.0"`` sets ``max_norm``)."""
    spec_aliases: ClassVar[Mapping[str, str]] = {}
    """Short option names in specs (``{"z": "z_thresh"}``)."""
    growing_state: ClassVar[frozenset[str]] = frozenset()
    """State keys whose tensors grow with the step count (not shape-checked on load)."""
    default_norm_kernel: ClassVar[str] = "torch"
    """The norm kernel when the constructor's ``norm_kernel`` is None: ``"torch"`` here,
    bit-identical to ``torch.nn.utils``; the adaptive strategies use ``"blocked"``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("spec_name"):
            _REGISTRY[cls.spec_name] = cls  # type: ignore[index]

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
        norm_kernel: str | None = None,
    ) -> None:
        self.defaults = dict(defaults)
        self.norm_type = check_norm_type(norm_type)
        self.nonfinite = check_policy(nonfinite)
        kernel = self.default_norm_kernel if norm_kernel is None else norm_kernel
        self.norm_kernel = check_norm_kernel(kernel, "norm_kernel")
        self.param_groups: list[ParamGroup] = []
        self.step = 0
        self._params_cache: tuple[Tensor, ...] | None = None
        self._step_grads: list[Tensor] | None = None
        self._step_groups: Groups | None = None
        for group in _as_groups(params):
            self.add_param_group(group)
        if not any(g["params"] for g in self.param_groups):
            raise ValueError(
                f"{type(self).__name__} got no parameters to clip (an exhausted "
                "model.parameters() generator?)"
            )
        self.state: list[State] = [self._init_state(g) for g in self.param_groups]

    # -- the strategy's part -------------------------------------------------------

    def _check_options(self, group: ParamGroup) -> None:
        """Validate a group's options; raise ``ValueError``/``TypeError`` naming the value."""

    def _init_state(self, group: ParamGroup) -> State:
        """A fresh state for ``group`` (tensors on the CPU; moved to the gradients' device)."""
        return {}

    def _clip_group(
        self, group: ParamGroup, state: State, grads: list[Tensor], norms: Tensor
    ) -> GroupResult:
        """Clip ``grads`` in place given their pre-clip ``norms``, update ``state``."""
        raise NotImplementedError

    def _measure_group(self, group: ParamGroup, state: State, norms: Tensor) -> GroupResult:
        """Like ``_clip_group`` without touching gradients; only :attr:`foldable` clippers."""
        raise NotImplementedError

    def _tensor_norms(
        self, grouped: list[list[Tensor]], every: list[Tensor], groups: Groups
    ) -> Tensor:
        """The pre-clip norm of each of ``every`` (the groups' gradients, concatenated).

        One fused pass by default, with the clipper's ``norm_kernel``. A strategy that
        reads the gradients anyway (AGC's unit norms) overrides this to derive the norms
        from its own pass and keep what it computed for ``_clip_group``; it must not
        modify anything.
        """
        return tensor_norms(every, self.norm_type, groups=groups, kernel=self.norm_kernel)

    # -- the shared machinery ------------------------------------------------------

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group of parameters with its own options (defaults fill the rest).

        Raises:
            ValueError: an unknown option, or a parameter already in another group.
        """
        unknown = sorted(set(group) - {"params"} - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(
                f"{type(self).__name__} has no option {', '.join(map(repr, unknown))}; "
                f"valid options: {valid}"
            )
        items = group["params"]
        items = [items] if isinstance(items, Tensor) else list(items)
        named = [_named(item, index) for index, item in enumerate(items)]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for name, p in named:
            if id(p) in seen:
                raise ValueError(f"parameter {name} appears in more than one parameter group")
        new: ParamGroup = {**self.defaults, **group}
        new["params"] = [p for _, p in named]
        new["names"] = [n for n, _ in named]
        self._check_options(new)
        self.param_groups.append(new)
        self._params_cache = None
        if hasattr(self, "state"):
            self.state.append(self._init_state(new))

    @torch.no_grad()
    def clip_(self) -> ClipStats:
        """Clip the bound gradients in place and return what was done, without host sync.

        Raises:
            NonFiniteGradientError: policy ``"raise"`` and a gradient is not finite
                (nothing is modified and the state is untouched).
        """
        return self._run(apply=True)

    @property
    def foldable(self) -> bool:
        """Whether :meth:`measure_` works: one factor scales every bound gradient."""
        return False

    @property
    def step_dependent(self) -> bool:
        """Whether the next ``clip_()`` calls depend on how many calls came before.

        Read from host values only (no device read). A strategy with a threshold
        schedule or a warm-up counted in calls says True while it is in progress;
        :func:`gradclip.attach` then decides a skipped step on the host, so that the
        skipped call does not count. False here: the base's strategies follow their
        tensor state, which a non-finite step leaves untouched. Override it in a
        strategy of your own that reads :attr:`step`.
        """
        return False

    @torch.no_grad()
    def measure_(self, *, grad_scale: Tensor | None = None) -> ClipStats:
        """Do what :meth:`clip_` does (state update, step count) but leave the gradients alone.

        The caller applies ``stats.scale`` itself, e.g. folds it into a fused optimizer
        step (:func:`gradclip.integrations.optim.attach`), saving a pass over the
        gradients. Only for :attr:`foldable` clippers (a :class:`GlobalNormClipper`
        with one parameter group); ``stats.scale`` is then exactly the factor
        :meth:`clip_` would have multiplied the gradients by.

        Args:
            grad_scale: the factor the gradients are currently multiplied by (an AMP
                loss scale), or None. Norms are divided by it, so the strategy sees
                the unscaled gradients; the caller divides the gradients by it too.

        Raises:
            ValueError: the clipper is not :attr:`foldable`, or its non-finite policy
                is ``"zero"`` (that policy writes the gradients).
            NonFiniteGradientError: policy ``"raise"`` and a gradient is not finite.

        Example:
            >>> from gradclip.clippers.fixed import NormClip
            >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
            >>> NormClip([w], max_norm=1.0).measure_().scale, w.grad
            (tensor(0.2000), tensor([3., 4.]))
        """
        if not self.foldable:
            raise ValueError(
                f"{type(self).__name__} with {len(self.param_groups)} parameter group(s) "
                "cannot measure without clipping: measure_() needs one factor for all "
                "gradients (a GlobalNormClipper with one parameter group)"
            )
        if self.nonfinite == "zero":
            raise ValueError("measure_() does not write gradients; nonfinite='zero' must")
        return self._run(apply=False, grad_scale=grad_scale)

    def _run(self, *, apply: bool, grad_scale: Tensor | None = None) -> ClipStats:
        grouped, complete = self._bound_grads()
        every = grouped[0] if len(grouped) == 1 else [g for grads in grouped for g in grads]
        if not every:
            self.step += 1
            return ClipStats.empty(self.step)
        p = self.norm_type
        self._step_grads = every
        try:
            try:
                # Grouped by device and dtype once per step: the norm pass uses it, and so
                # does the scaling pass when one parameter group holds every gradient.
                groups = self._step_groups = group_tensors(every)
                norms = self._tensor_norms(grouped, every, groups)
            except Exception:
                # No per-step layout check: torch has no norm kernel for sparse layouts,
                # so a sparse gradient fails here, before anything changed. Name it.
                try:
                    self._named_grads()  # raises the TypeError naming a sparse gradient
                except TypeError as named:
                    raise named from None
                raise
            if grad_scale is not None:
                norms = norms / grad_scale.to(norms.device, norms.dtype)
            total_norm = total_norm_of(norms, p)
            if self.nonfinite == "raise":
                raise_if_nonfinite(self._named_grads(), norms, total_norm, norm_type=p)
            self.step += 1
            results: list[GroupResult] = []
            offset = 0
            for group, state, grads in zip(self.param_groups, self.state, grouped):
                if not grads:
                    continue
                _to_device(state, norms.device)
                group_norms = norms if grads is every else norms[offset : offset + len(grads)]
                offset += len(grads)
                if apply:
                    results.append(self._clip_group(group, state, grads, group_norms))
                else:
                    results.append(self._measure_group(group, state, group_norms))
        finally:
            self._step_grads = self._step_groups = None
        if len(results) == 1:
            threshold, clipped_norm = results[0].threshold, results[0].clipped_norm
            clipped = results[0].clipped
        else:
            threshold = total_norm_of(torch.stack([r.threshold for r in results]), p)
            clipped_norm = total_norm_of(torch.stack([r.clipped_norm for r in results]), p)
            clipped = torch.stack([r.clipped for r in results]).any()
        finite = torch.isfinite(total_norm)
        if len(results) == 1 and results[0].scale is not None:
            # The factor the gradients were multiplied by, not clipped_norm / total_norm
            # recomputed (an ulp off in a few percent of steps).
            scale = results[0].scale.to(total_norm.dtype)
        else:
            scale = torch.where(total_norm > 0, clipped_norm / total_norm, 1.0)
        if self.nonfinite == "zero":
            zero_if_nonfinite_(every, total_norm)
            clipped_norm = torch.where(finite, clipped_norm, 0.0)
            scale = torch.where(finite, scale, 0.0)  # every gradient was set to zero
        return ClipStats(
            total_norm=total_norm,
            threshold=threshold.to(total_norm.dtype),
            scale=scale,
            clipped_norm=clipped_norm,
            clipped=clipped,
            finite=finite,
            step=torch.tensor(self.step, device=total_norm.device),
            norms=norms,
            params=self._all_params if complete else self._params_with_grads(),
        )

    def _bound_grads(self) -> tuple[list[list[Tensor]], bool]:
        """Each group's gradients (parameters without one skipped), and whether all had one.

        This runs every step over every parameter, so it keeps per-tensor work in C
        (``map`` over attribute getters) where it can. Layouts are not checked here
        (reading ``.layout`` of 500 tensors costs tens of microseconds): a sparse
        gradient makes the norm pass fail, and :meth:`_run` then collects
        them by name (:meth:`_named_grads`) for the error naming it.
        """
        grouped: list[list[Tensor]] = []
        complete = True
        for group in self.param_groups:
            grads: list[Any] = list(map(_GRAD, group["params"]))
            if _NONE_TYPE in set(map(type, grads)):
                complete = False
                grads = [g for g in grads if g is not None]
            grouped.append(grads)
        return grouped, complete

    def _step_groups_of(self, grads: list[Tensor]) -> Groups | None:
        """The device/dtype grouping of ``grads`` if this step already computed it.

        Inside ``clip_()``, a strategy whose parameter group holds every bound gradient
        passes this to the scaling functions and saves a second grouping pass.
        """
        return self._step_groups if grads is self._step_grads else None

    @property
    def _all_params(self) -> tuple[Tensor, ...]:
        """Every bound parameter, in order (cached; :meth:`add_param_group` resets it)."""
        if self._params_cache is None:
            self._params_cache = tuple(p for g in self.param_groups for p in g["params"])
        return self._params_cache

    def _params_with_grads(self) -> tuple[Tensor, ...]:
        return tuple(p for g in self.param_groups for p in g["params"] if p.grad is not None)

    @staticmethod
    def keep_if_finite(finite: Tensor, new: Tensor, old: Tensor) -> Tensor:
        """``new`` where ``finite``, else ``old``: a branch-free guard for state updates."""
        return torch.where(finite, new, old)

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state and options: tensors and numbers only.

        Loadable with ``torch.load(..., weights_only=True)``.
        """
        return {
            "step": self.step,
            "state": [{k: _copy(v) for k, v in s.items()} for s in self.state],
            "options": [
                {k: v for k, v in g.items() if isinstance(v, int | float | bool | str)}
                for g in self.param_groups
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (options stay as constructed).

        Everything is checked before anything is changed: on an error the clipper is
        as it was.

        Raises:
            ValueError: the number of groups or the state's keys do not match, or a
                state tensor's shape differs from this clipper's (a checkpoint saved
                with other options, e.g. another ``warmup_steps`` or ``per_tensor``,
                or for a group with another number of parameters); the message names
                the tensor, both shapes and the options that explain them.
        """
        states = state_dict["state"]
        if len(states) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(states)} parameter groups; this "
                f"{type(self).__name__} has {len(self.param_groups)}"
            )
        saved_options = state_dict.get("options") or [{}] * len(states)
        for index, (group, mine, theirs) in enumerate(zip(self.param_groups, self.state, states)):
            if set(mine) != set(theirs):
                raise ValueError(
                    f"state_dict group {index} has keys {sorted(theirs)}; "
                    f"{type(self).__name__} expects {sorted(mine)}"
                )
            options = saved_options[index] if index < len(saved_options) else {}
            self._check_state_shapes(index, group, theirs, options)
        self.state = [{k: _copy(v) for k, v in s.items()} for s in states]
        self.step = int(state_dict["step"])

    def _check_state_shapes(
        self, index: int, group: ParamGroup, theirs: Mapping[str, Any], options: Mapping[str, Any]
    ) -> None:
        """Raise ``ValueError`` if a saved state tensor's shape is not that of a fresh state.

        Keys in :attr:`growing_state` are not checked (their length follows the step
        count). The message names the options of the checkpoint that explain the
        saved shape, found by building a fresh state with each differing option.
        """
        for key, expected in self._init_state(group).items():
            if key in self.growing_state or not isinstance(expected, Tensor):
                continue
            value = theirs[key]
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"state_dict group {index} has {key!r} of type {type(value).__name__}; "
                    f"{type(self).__name__} expects a tensor of shape {tuple(expected.shape)}"
                )
            if value.shape == expected.shape:
                continue
            causes = [
                f"{name}={saved!r} (this {type(self).__name__}: {group[name]!r})"
                for name, saved in options.items()
                if name in group
                and saved != group[name]
                and _shape_with(self, group, name, saved, key) == value.shape
            ]
            if causes:
                why = f"; it was saved with {', '.join(causes)}"
            elif value.dim() == 1 and expected.shape == (len(group["params"]),):
                why = (
                    f"; one entry per parameter: the checkpoint's group had {value.shape[0]} "
                    f"parameters, this one has {len(group['params'])}"
                )
            else:
                why = ""
            raise ValueError(
                f"state_dict group {index} has {key!r} of shape {tuple(value.shape)}; this "
                f"{type(self).__name__} expects {tuple(expected.shape)}{why}"
            )

    def reset(self) -> None:
        """Forget all history: fresh state and step 0 (options are kept)."""
        self.state = [self._init_state(g) for g in self.param_groups]
        self.step = 0

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        sizes = ", ".join(str(len(g["params"])) for g in self.param_groups)
        return f"{type(self).__name__}({options}; params per group: [{sizes}])"

    def _named_grads(self) -> GradList:
        """Every bound gradient with its parameter's name, for error messages."""
        pairs = [pair for g in self.param_groups for pair in zip(g["names"], g["params"])]
        return collect_grads(pairs, empty_generator_ok=True)


class ScheduledClipper(Clipper):
    """A strategy whose threshold may follow a schedule of the step (its ``schedule`` option).

    A subclass that puts a ``"schedule"`` option in its defaults (None by default; see
    :mod:`gradclip.clippers.schedule`) passes the threshold it computed through
    :meth:`_scheduled` before clipping, with the 0-based index of this ``clip_()``
    call as the step. The threshold may be 0-d (one bound for the group) or 1-D (one
    bound per tensor, all multiplied alike). The convention of every strategy here:
    the schedule scales the threshold *applied*; the strategy's own statistics never
    see the scheduled value (they are updated as without a schedule), so a schedule
    cannot feed back into the threshold it scales.

    Schedule state is saved, loaded and reset with the clipper's. A group that would
    share a schedule instance with an earlier group gets a deep copy, so groups never
    share schedule state.
    """

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group (see :meth:`Clipper.add_param_group`); validates its ``schedule``."""
        if "schedule" in self.defaults:
            schedule = check_schedule(group.get("schedule", self.defaults["schedule"]))
            if schedule is not None and any(
                g.get("schedule") is schedule for g in self.param_groups
            ):
                schedule = copy.deepcopy(schedule)
            group = {**group, "schedule": schedule}
        super().add_param_group(group)

    def _scheduled(self, group: ParamGroup, threshold: Tensor, total_norm: Tensor) -> Tensor:
        """``threshold`` through the group's schedule, if it has one (no host sync).

        Returns ``threshold`` itself (the same tensor) when the group has no schedule
        or the schedule leaves it unchanged, so callers can skip work with ``is``.
        """
        schedule: Schedule | None = group.get("schedule")
        if schedule is None:
            return threshold
        return schedule(self.step - 1, threshold, total_norm)

    def _schedules(self) -> list[Schedule | None]:
        return [g.get("schedule") for g in self.param_groups]

    warmup_counts_calls: ClassVar[bool] = False
    """Whether the groups' ``warmup_steps`` option counts ``clip_()`` calls (AdaGC,
    EMARatio), so that the strategy depends on its step count until the warm-up ends."""

    @property
    def step_dependent(self) -> bool:
        """True while a group's schedule, or a warm-up counted in calls, is in progress."""
        if self.warmup_counts_calls and any(
            self.step < g["warmup_steps"] for g in self.param_groups
        ):
            return True
        return any(s is not None and s.follows_step(self.step) for s in self._schedules())

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict plus ``"schedules"``: one schedule state per group."""
        state_dict = super().state_dict()
        state_dict["schedules"] = [{} if s is None else s.state_dict() for s in self._schedules()]
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, schedule states included.

        Raises:
            ValueError: groups, state keys or schedule states do not match.
        """
        schedules = self._schedules()
        saved = state_dict.get("schedules", [{}] * len(schedules))
        if len(saved) != len(schedules):
            super().load_state_dict(state_dict)  # raises naming the group counts if they differ
            raise ValueError(
                f"state_dict has schedule states for {len(saved)} groups; this "
                f"{type(self).__name__} has {len(schedules)}"
            )
        for index, (schedule, theirs) in enumerate(zip(schedules, saved)):
            if schedule is None and theirs:
                raise ValueError(
                    f"state_dict group {index} has schedule state {sorted(theirs)}, but "
                    "that group of this clipper has no schedule"
                )
            if schedule is not None:  # check on a copy: nothing changes if a later part fails
                copy.deepcopy(schedule).load_state_dict(theirs)
        super().load_state_dict(state_dict)
        for schedule, theirs in zip(schedules, saved):
            if schedule is not None:
                schedule.load_state_dict(theirs)

    def reset(self) -> None:
        """Forget all history, the schedules' included."""
        super().reset()
        for schedule in self._schedules():
            if schedule is not None:
                schedule.reset()

    def __repr__(self) -> str:
        if self.defaults.get("schedule", True) is not None:
            return super().__repr__()
        options = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items() if k != "schedule")
        sizes = ", ".join(str(len(g["params"])) for g in self.param_groups)
        return f"{type(self).__name__}({options}; params per group: [{sizes}])"


class GlobalNormClipper(ScheduledClipper):
    """A strategy that scales all of a group's gradients by one factor, like torch.

    Subclasses give the threshold from their state (``_threshold``) and update the
    state from this step (``_update``); the scale is torch's
    ``min(1, threshold / (total_norm + 1e-6))``, applied in one fused pass.

    Threshold schedules (see :class:`ScheduledClipper`): with a ``"schedule"`` option
    in its defaults, the threshold from ``_threshold`` goes through the group's
    schedule before the scale is computed. Subclasses overriding ``_clip_group`` call
    :meth:`_scheduled` themselves.
    """

    @property
    def foldable(self) -> bool:
        """One parameter group and the base's scaling: :meth:`measure_` can work."""
        return (
            len(self.param_groups) == 1
            and type(self)._clip_group is GlobalNormClipper._clip_group
            and type(self)._measure_group is GlobalNormClipper._measure_group
        )

    def _threshold(self, group: ParamGroup, state: State, total_norm: Tensor) -> Tensor:
        """This step's threshold (a 0-d tensor; ``inf`` to leave the gradients alone)."""
        raise NotImplementedError

    def _update(
        self, group: ParamGroup, state: State, total_norm: Tensor, clipped_norm: Tensor
    ) -> None:
        """Update ``state`` after clipping (guard with :meth:`keep_if_finite`)."""

    def _clip_group(
        self, group: ParamGroup, state: State, grads: list[Tensor], norms: Tensor
    ) -> GroupResult:
        result = self._measure_group(group, state, norms)
        scale = cast(Tensor, result.scale)  # always set by _measure_group
        scale_grads_(grads, scale, groups=self._step_groups_of(grads))
        return result

    def _measure_group(self, group: ParamGroup, state: State, norms: Tensor) -> GroupResult:
        """The group's threshold and scale and the state update, without touching gradients."""
        total_norm = total_norm_of(norms, self.norm_type)
        threshold = self._scheduled(group, self._threshold(group, state, total_norm), total_norm)
        scale = clip_coefficient(threshold, total_norm)
        clipped_norm = total_norm * scale
        self._update(group, state, total_norm, clipped_norm)
        return GroupResult(threshold, clipped_norm, scale < 1.0, scale)


def registry() -> dict[str, type[Clipper]]:
    """The clippers reachable by spec name (a copy)."""
    return dict(_REGISTRY)


def _as_groups(params: ParamsLike | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(params, Tensor):
        return [{"params": [params]}]
    items = list(params)
    if items and all(isinstance(item, dict) for item in items):
        for index, item in enumerate(items):
            if "params" not in item:
                raise ValueError(f"param group {index} has no 'params' entry")
        return items  # type: ignore[return-value]
    if any(isinstance(item, dict) for item in items):
        raise TypeError("params mixes param-group dicts with tensors; pass one or the other")
    return [{"params": items}]


_GRAD = operator.attrgetter("grad")
_NONE_TYPE = type(None)


def _named(item: object, index: int) -> tuple[str, Tensor]:
    return split_named(item, index, "params")


def _shape_with(
    clipper: Clipper, group: ParamGroup, name: str, value: object, key: str
) -> torch.Size | None:
    """The shape of ``key`` in a fresh state of ``group`` with option ``name`` set to ``value``."""
    try:
        tensor = clipper._init_state({**group, name: value}).get(key)
    except Exception:  # a saved option this clipper cannot build a state from
        return None
    return tensor.shape if isinstance(tensor, Tensor) else None


def _to_device(state: State, device: torch.device) -> None:
    for key, value in state.items():
        if isinstance(value, Tensor) and value.device != device:
            state[key] = value.to(device)


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value
