"""``AGC``: unit-wise adaptive gradient clipping as a stateful clipper (Brock et al., 2021).

For each unit ``i`` of a weight ``W`` with gradient ``G`` (a row of a Linear weight,
an output filter of a Conv weight; vectors and scalars are one unit)::

    ‖W_i‖* = max(‖W_i‖, eps)
    if ‖G_i‖ / ‖W_i‖* > λ:  G_i ← λ · ‖W_i‖* / max(‖G_i‖, 1e-6) · G_i

Where this follows the paper: the unit definition (the paper's reference code
reduces over every axis but the output one; PyTorch puts the output dimension
first, so units reduce over dims 1..n), the rule, ``eps = 1e-3`` and the
``1e-6`` floor on ``‖G_i‖`` of the reference code, and ``λ = 0.01`` as the default
(the paper tunes λ with the batch size: 0.01 at batch 4096 for NFNets).

Where it deliberately differs:

* **The final classifier is not excluded automatically.** The paper leaves the
  last linear layer unclipped, but a clipper bound to parameters cannot know
  which one that is. ``exclude`` takes names, patterns or a predicate, and
  :func:`final_classifier_names` finds the last ``nn.Linear`` of a model::

      AGC(model.named_parameters(), exclude=final_classifier_names(model))

* **Per-tensor norms come from the unit norms.** ``‖G‖² = Σ_i ‖G_i‖²``, so
  ``clip_()`` reads each gradient once for its unit norms and derives the per-tensor
  norms of :class:`ClipStats` from them (equal to a direct norm up to rounding).

The test is branch-free (units under their bound are multiplied by 1), so
``clip_()`` needs no host sync. The clipping itself is the kernel of
:func:`gradclip.clip_grad_agc_` (:mod:`gradclip._agc`), so results are identical.

References:
    Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
    Without Normalization. ICML 2021, arXiv:2102.06171.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from gradclip._agc import (
    UnitFactors,
    Workspace,
    caller_order,
    norms_from_units,
    scale_units_,
    sharded_unit_clip_factors,
    unit_clip_factors,
)
from gradclip._foreach import Groups
from gradclip._params import ParamsLike, check_threshold
from gradclip._sync import index_on
from gradclip.clippers.base import Clipper, GroupResult, ParamGroup, State
from gradclip.functional import _check_units_whole
from gradclip.norms import any_dtensor, globalize_norms, local_views, tensor_norms, total_norm_of

__all__ = ["AGC", "Exclude", "final_classifier_names"]

Exclude: TypeAlias = "str | Iterable[str] | Callable[[str, Tensor], bool] | None"
"""What ``AGC(exclude=...)`` accepts: a pattern, patterns, or a ``(name, param)`` predicate."""


class AGC(Clipper):
    """Unit-wise adaptive gradient clipping, bound to parameters (Brock et al., 2021).

    Each unit's gradient norm is capped at ``clip_factor`` times its weight norm
    (see the module docstring for the rule). Excluded parameters stay bound: their
    gradients are left untouched, but their norms count in ``total_norm`` and
    ``clipped_norm``.

    Stats: ``threshold`` is the L2 norm of the per-unit bounds ``λ·max(‖W_i‖, eps)``
    over the units AGC clips (the excluded parameters have no bound and are left
    out; ``inf`` if every parameter is excluded): the total norm the clipped
    parameters' gradients would have with every unit exactly at its bound.
    ``clipped_norm`` comes from the unit norms times their factors (no extra pass);
    ``clipped`` is whether any unit was scaled down.

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups (each may
            set its own ``clip_factor``, ``eps`` and ``exclude``). Exclusion by name
            needs ``named_parameters()``: plain parameters are named
            ``"params[i]"`` by position in their group.
        clip_factor: λ > 0, the largest allowed ``‖G_i‖ / max(‖W_i‖, eps)``.
        eps: the floor on weight norms, ≥ 0, so zero-initialised units can move.
        exclude: parameters to leave unclipped: a name or ``fnmatch`` pattern
            (``"head.*"``), several of them, or a predicate ``(name, param) -> bool``.
            Patterns are checked at construction: one that matches no parameter
            raises (it is almost always a typo or unnamed parameters).
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``.

    Raises:
        ValueError, TypeError: bad options, naming the value; an ``exclude`` pattern
            that matches no parameter.

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
        Without Normalization. ICML 2021, arXiv:2102.06171.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> model(torch.randn(5, 3)).pow(2).sum().backward()
        >>> head_grad = model[1].weight.grad.clone()
        >>> clipper = AGC(model.named_parameters(), clip_factor=0.01,
        ...               exclude=final_classifier_names(model))
        >>> clipper.excluded_names
        ['1.weight', '1.bias']
        >>> stats = clipper.clip_()
        >>> torch.equal(model[1].weight.grad, head_grad), bool(stats.clipped)
        (True, True)
    """

    spec_name = "agc"
    spec_positional = "clip_factor"

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        clip_factor: float = 0.01,
        *,
        eps: float = 1e-3,
        exclude: Exclude = None,
        nonfinite: str = "ignore",
    ) -> None:
        super().__init__(
            params,
            {"clip_factor": clip_factor, "eps": eps, "exclude": exclude},
            norm_type=2.0,
            nonfinite=nonfinite,
        )
        self._step_units: dict[int, _GroupUnits] = {}
        """This ``clip_()`` call's units per group (by ``id``), from ``_tensor_norms``."""
        self._workspaces: defaultdict[int, Workspace] = defaultdict(Workspace)
        """Per group (by ``id``): buffers reused from step to step (see ``Workspace``)."""
        default = _check_exclude(exclude)
        if isinstance(default, tuple):
            _require_matches(default, [n for g in self.param_groups for n in g["names"]])

    @property
    def excluded_names(self) -> list[str]:
        """The names of the parameters left unclipped, in group order."""
        return [
            name
            for g in self.param_groups
            for name, excluded in zip(g["names"], g["excluded"])
            if excluded
        ]

    def _check_options(self, group: ParamGroup) -> None:
        group["clip_factor"] = check_threshold(
            group["clip_factor"], "clip_factor", allow_zero=False
        )
        group["eps"] = check_threshold(group["eps"], "eps")
        raw = group["exclude"]
        exclude = _check_exclude(raw)
        if isinstance(exclude, tuple) and raw is not self.defaults["exclude"]:
            _require_matches(exclude, group["names"])
        group["exclude"] = exclude
        group["excluded"] = tuple(
            _is_excluded(exclude, name, p) for name, p in zip(group["names"], group["params"])
        )
        for name, p, excluded in zip(group["names"], group["params"], group["excluded"]):
            if not excluded:
                _check_units_whole(name, p)

    def _tensor_norms(
        self, grouped: list[list[Tensor]], every: list[Tensor], groups: Groups
    ) -> Tensor:
        """Per-tensor norms from the unit norms: AGC reads each gradient once, not twice.

        ``‖G‖² = Σ_i ‖G_i‖²`` over the units, so the base class's norm pass would read
        the gradients again for values already at hand (equal up to rounding).
        Excluded parameters are measured directly. The units are kept for
        :meth:`_clip_group`.
        """
        self._step_units = {}
        pieces: list[Tensor] = []
        dtype = torch.float64 if any(d == torch.float64 for _, d in groups) else torch.float32
        for group, grads in zip(self.param_groups, grouped):
            if grads:
                known = groups if grads is every else None
                workspace = self._workspaces[id(group)]
                units = self._step_units[id(group)] = _GroupUnits.of(group, grads, known, workspace)
                pieces.append(units.norms(dtype, every[0].device))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _clip_group(
        self, group: ParamGroup, state: State, grads: list[Tensor], norms: Tensor
    ) -> GroupResult:
        step = self._step_units.pop(id(group), None)
        if step is None or step.grads is not grads:  # not from this clip_() call
            step = _GroupUnits.of(group, grads)
        if not step.keep:
            inf = torch.full((), math.inf, dtype=norms.dtype, device=norms.device)
            none = torch.zeros((), dtype=torch.bool, device=norms.device)
            return GroupResult(inf, total_norm_of(norms, 2.0), none)
        units = step.units
        scale_units_(step.local_grads, units)

        # A tensor none of whose units was scaled keeps its measured norm exactly (the
        # unit norms would give it again up to rounding, and scale could exceed 1).
        pre_kept = (
            norms
            if len(step.keep) == len(grads)
            else norms.index_select(0, index_on(norms.device, tuple(step.keep)))
        )
        scaled = step.per_tensor([u.factors < 1.0 for u in units], "any", norms)
        from_units = step.per_tensor([u.unit_norms * u.factors for u in units], "norm", norms)
        clipped_kept = torch.where(scaled, torch.minimum(from_units, pre_kept), pre_kept)
        bounds = step.per_tensor([u.bounds for u in units], "norm", norms)
        if len(step.keep) == len(grads):
            clipped_norms = clipped_kept
        else:
            where = index_on(norms.device, tuple(step.keep))
            clipped_norms = norms.index_copy(0, where, clipped_kept)
        clipped = scaled.any()
        return GroupResult(total_norm_of(bounds, 2.0), total_norm_of(clipped_norms, 2.0), clipped)


@dataclass
class _GroupUnits:
    """A parameter group's AGC units for one step (see :meth:`AGC._tensor_norms`).

    Attributes:
        grads: the group's gradients (parameters without one skipped).
        keep: the positions in ``grads`` of the gradients AGC clips (not excluded).
        kept: those gradients; ``local_grads``: the same, DTensors as local shards.
        units: the unit factors, by shape; their ``index`` refers to ``kept``.
        sharded: whether DTensors are involved (per-tensor values are reduced globally).
        inverse: the permutation from the units' order back to ``kept``'s, or None.
    """

    grads: list[Tensor]
    keep: list[int]
    kept: list[Tensor]
    local_grads: list[Tensor]
    units: list[UnitFactors]
    sharded: bool
    inverse: Tensor | None

    @classmethod
    def of(
        cls,
        group: ParamGroup,
        grads: list[Tensor],
        groups: Groups | None = None,
        workspace: Workspace | None = None,
    ) -> _GroupUnits:
        """Unit norms and factors of ``grads``, the gradients of ``group``'s parameters.

        ``groups`` is the device/dtype grouping of ``grads``, if already computed;
        ``workspace``, the group's buffers kept between steps.
        """
        params: list[Tensor] = group["params"]
        excluded: tuple[bool, ...] = group["excluded"]
        if len(grads) != len(params):  # some parameters have no gradient
            present = [(p, e) for p, e in zip(params, excluded) if p.grad is not None]
            params, excluded = [p for p, _ in present], tuple(e for _, e in present)
        if not any(excluded):
            keep, kept, weights = list(range(len(grads))), grads, params
        else:
            groups = None
            keep = [k for k, e in enumerate(excluded) if not e]
            kept, weights = [grads[k] for k in keep], [params[k] for k in keep]
        if not keep:
            return cls(grads, [], [], [], [], False, None)
        sharded = any_dtensor(kept) or any_dtensor(weights)
        clip_factor, eps = group["clip_factor"], group["eps"]
        if sharded:
            # Scaling is linear: the summands of a Partial gradient may be scaled.
            local_grads = local_views(kept)
            units = sharded_unit_clip_factors(weights, kept, clip_factor, eps)
        else:
            local_grads = kept
            units = unit_clip_factors(
                weights, kept, clip_factor, eps, groups=groups, workspace=workspace
            )
        return cls(grads, keep, kept, local_grads, units, sharded, caller_order(units))

    def per_tensor(self, values: list[Tensor], reduce: str, like: Tensor) -> Tensor:
        """Per kept gradient: the norm of its units' ``values`` (``"norm"``), or any set."""
        rows = [
            v.square().reshape(len(u.index), -1).sum(1)
            if reduce == "norm"
            else v.reshape(len(u.index), -1).any(1)
            for v, u in zip(values, self.units)
        ]
        out = torch.cat([r.to(like.device) for r in rows])
        if self.inverse is not None:
            out = out.index_select(0, self.inverse.to(like.device))
        if reduce != "norm":
            # A unit scaled on any rank's shard counts on every rank.
            return (
                globalize_norms(self.kept, out.to(like.dtype), math.inf) > 0
                if self.sharded
                else out
            )
        norms = out.to(like.dtype).sqrt()
        return globalize_norms(self.kept, norms, 2.0) if self.sharded else norms

    def norms(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Each of ``grads``' pre-clip norm (excluded ones measured directly)."""
        if self.keep:
            kept = norms_from_units(self.units, self.inverse, device, dtype)
            if self.sharded:
                kept = globalize_norms(self.kept, kept, 2.0)
            if len(self.keep) == len(self.grads):
                return kept
        chosen = set(self.keep)
        others = [k for k in range(len(self.grads)) if k not in chosen]
        out = torch.empty(len(self.grads), dtype=dtype, device=device)
        measured = tensor_norms([self.grads[k] for k in others], 2.0).to(device, dtype)
        out.index_copy_(0, index_on(device, tuple(others)), measured)
        if self.keep:
            out.index_copy_(0, index_on(device, tuple(self.keep)), kept)
        return out


def final_classifier_names(model: nn.Module) -> list[str]:
    """The names of the final classifier's parameters, to exclude from AGC as the paper does.

    Heuristic: the classifier is the last ``nn.Linear`` (subclasses included) in
    module registration order, i.e. the order of ``model.named_modules()``, which
    follows the order attributes were assigned in ``__init__``. This is right for
    the usual ``features → classifier`` models (torchvision's ResNets, ViTs, MLPs);
    it is wrong when the head is registered before the body or is not a Linear
    (a 1×1 conv head): check the result, or pass names yourself. Names are those of
    ``model.named_parameters()``; a weight tied to another module (a language model
    head tied to its embedding) is reported under its first name, and excluding it
    excludes the embedding too (it is the same tensor).

    Args:
        model: the model.

    Returns:
        The names of that layer's own parameters (weight, and bias if any).

    Raises:
        ValueError: the model has no ``nn.Linear``.

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
        Without Normalization. ICML 2021, arXiv:2102.06171 (Section 4.1: AGC is not
        applied to the final linear layer).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
        ...                           torch.nn.Linear(72, 10))
        >>> final_classifier_names(net)
        ['2.weight', '2.bias']
    """
    last: nn.Module | None = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(
            f"final_classifier_names: {type(model).__name__} has no nn.Linear layer; pass "
            "the names of the classifier's parameters to AGC(exclude=...) yourself"
        )
    mine = {id(p) for p in last.parameters(recurse=False)}
    return [name for name, p in model.named_parameters() if id(p) in mine]


def _check_exclude(value: object) -> tuple[str, ...] | Callable[[str, Tensor], bool] | None:
    """Normalise ``exclude``: None, a tuple of patterns, or a predicate."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, Tensor):
        patterns = tuple(value)
        for item in patterns:
            if not isinstance(item, str):
                raise TypeError(f"AGC exclude patterns must be strings; got {item!r} in {value!r}")
        return patterns
    if callable(value):
        return value  # type: ignore[no-any-return]
    raise TypeError(
        "AGC exclude must be None, a name or fnmatch pattern, a list of them, or a "
        f"predicate (name, param) -> bool; got {value!r}"
    )


def _is_excluded(
    exclude: tuple[str, ...] | Callable[[str, Tensor], bool] | None, name: str, param: Tensor
) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, tuple):
        return any(name == pattern or fnmatchcase(name, pattern) for pattern in exclude)
    return bool(exclude(name, param))


def _require_matches(patterns: tuple[str, ...], names: list[str]) -> None:
    for pattern in patterns:
        if not any(name == pattern or fnmatchcase(name, pattern) for name in names):
            sample = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
            raise ValueError(
                f"AGC exclude pattern {pattern!r} matches no parameter (names: {sample}). "
                "Exclusion by name needs named parameters: pass model.named_parameters(), "
                "not model.parameters() (plain parameters are named 'params[i]')"
            )
