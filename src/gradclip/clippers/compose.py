"""Composing clippers: apply several in order, or give parameter sets their own strategy.

``chain(a, b, ...)`` applies clippers one after another, as optax's ``chain`` does
for gradient transformations. Two uses:

* **Stacked strategies on the same parameters**: ``chain(AGC(params), NormClip(params,
  max_norm=1.0))`` clips unit-wise, then caps the global norm of the result.
* **Different strategies for different parameters**: clippers bound to disjoint
  sets, ``chain(AGC(body_params), NormClip(head_params))`` — the usual way to leave
  a classifier head out of AGC (Brock et al. 2021, arXiv:2102.06171) and still cap it.

Both mix freely: ``chain(AGC(body), NormClip(head), NormClip(everything))``.

How one :class:`ClipStats` is made from the members' (no extra pass over the
gradients unless stated):

* ``total_norm``: the pre-clip norm of the union of the bound gradients. Each
  parameter's pre-clip norm is taken from the first member that binds it (nothing
  has touched it before that member runs), so this is exact for any overlap.
* ``norms``/``params``: those first-seen per-tensor norms, in first-seen order.
* ``clipped_norm``: the norm of the union after every member. The members' sets are
  merged into blocks as they come: a member disjoint from the blocks so far starts a
  block, a member whose set contains every block it touches merges them into one,
  and in both cases its own ``clipped_norm`` is that block's final norm so far;
  the blocks' norms combine into the result. Only when a member's set *partially*
  overlaps an earlier block (e.g. sets ``{a, b}`` then ``{b, c}``) is that block's
  norm unknown; then the chain reads the union's gradients once more at the end
  (one extra pass, reported by :attr:`Chain.needs_extra_pass`).
* ``threshold``: block-wise like the norms. A new block has its member's threshold;
  a merge takes the smaller of the merging member's threshold and the combined
  thresholds of the blocks it covers (the tighter bound wins; a block with new
  parameters contributes ``inf``, so the member's threshold); blocks combine as
  norms do. With disjoint members this is the norm of their thresholds, as for
  param groups; with identical sets, the minimum. For partial overlaps it is an
  approximation of "the largest norm let through unchanged".
* ``scale = clipped_norm / total_norm`` (1 for a zero norm), ``clipped`` = any
  member clipped, ``finite`` = ``total_norm`` is finite, ``step`` = the chain's
  own count of ``clip_()`` calls.

All members must use the same ``norm_type`` (the norms are combined).

``Chain`` is not a :class:`~gradclip.clippers.base.Clipper` subclass: a Clipper owns
param groups, per-group state and a ``_clip_group`` step, and a chain owns none of
these; it delegates. It has the same public surface that matters to callers —
``clip_()``, ``state_dict()``, ``load_state_dict()``, ``reset()``, ``step``,
``param_groups`` (the members' groups, concatenated; they may overlap),
``norm_type`` — but no ``add_param_group`` (which member would get it? add to the
member directly). Members may themselves be chains.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor

from gradclip.clippers.base import Clipper, ParamGroup
from gradclip.clippers.stats import ClipStats
from gradclip.norms import tensor_norms, total_norm_of

__all__ = ["Chain", "chain"]

Member: TypeAlias = "Clipper | Chain"


@dataclass(frozen=True)
class _Block:
    """A set of parameters whose combined norm is known after some member ran.

    Attributes:
        ids: ``id()`` of the parameters in the block.
        member: the member that formed the block last.
        children: the blocks it merged (indices into the plan's block list).
        has_new: whether the member binds parameters no earlier member bound.
        exact: whether the member's set is exactly the block (its clipped norm is the
            block's norm).
    """

    ids: frozenset[int]
    member: int
    children: tuple[int, ...]
    has_new: bool
    exact: bool


@dataclass(frozen=True)
class _Plan:
    blocks: tuple[_Block, ...]
    final: tuple[int, ...]  # indices of the blocks that are not merged into later ones
    extra_pass: bool


class _Take:
    """The positions of a member's first-seen norms, and their index tensor per device."""

    def __init__(self, positions: list[int]) -> None:
        self.positions = positions
        self._index: dict[torch.device, Tensor] = {}

    def index_on(self, device: torch.device) -> Tensor:
        """The positions as an int64 tensor on ``device`` (made once per device)."""
        index = self._index.get(device)
        if index is None:
            index = self._index[device] = torch.tensor(self.positions, device=device)
        return index


@dataclass(frozen=True)
class _Takes:
    """Where each parameter's first-seen pre-clip norm comes from, for one set of results.

    Attributes:
        members: ``(result index, positions)`` per member that saw a parameter first;
            positions None when all of that member's norms are taken.
        params: the first-seen parameters, in order.
        one_whole: a single member saw every parameter first (its total is reused).
    """

    members: tuple[tuple[int, _Take | None], ...]
    params: tuple[Tensor, ...]
    one_whole: bool


class Chain:
    """Apply clippers in order; report one :class:`ClipStats` for all of them.

    See the module docstring for how the stats compose. Build it with :func:`chain`.

    Args:
        *clippers: the members, each a :class:`Clipper` or a :class:`Chain`, applied
            in the given order.

    Raises:
        ValueError: no members, the same member twice, or members with different
            ``norm_type``.
        TypeError: a member is not a clipper.

    Attributes:
        members: the clippers, in order.
        step: the number of ``clip_()`` calls so far.
    """

    def __init__(self, *clippers: Member) -> None:
        if not clippers:
            raise ValueError("chain() needs at least one clipper")
        for index, member in enumerate(clippers):
            if not isinstance(member, Clipper | Chain):
                raise TypeError(
                    f"chain() member {index} is a {type(member).__name__}; expected a "
                    "gradclip Clipper (e.g. AGC, NormClip) or a Chain"
                )
        if len({id(m) for m in clippers}) != len(clippers):
            raise ValueError(
                "chain() got the same clipper twice; bind a second instance instead "
                "(each member keeps its own state)"
            )
        types = sorted({m.norm_type for m in clippers})
        if len(types) > 1:
            raise ValueError(
                f"chain() members use different norm_type values {types}; the chain "
                "combines their norms, so they must agree"
            )
        self.members: tuple[Member, ...] = tuple(clippers)
        self.norm_type: float = types[0]
        self.step = 0
        self._plan_key: tuple[tuple[int, int], ...] | None = None
        self._plan: _Plan | None = None
        self._takes: tuple[tuple[tuple[Tensor, ...], ...], _Takes] | None = None

    # -- the Clipper-like surface -------------------------------------------------------

    @property
    def param_groups(self) -> list[ParamGroup]:
        """The members' param groups, concatenated (a parameter may appear more than once)."""
        return [g for m in self.members for g in m.param_groups]

    @property
    def params(self) -> list[Tensor]:
        """Every bound parameter once, in the order the members first bind them."""
        seen: set[int] = set()
        out: list[Tensor] = []
        for member in self.members:
            for p in _bound(member):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @property
    def step_dependent(self) -> bool:
        """Whether a member's next calls depend on its step count (see :class:`Clipper`)."""
        return any(member.step_dependent for member in self.members)

    @property
    def needs_extra_pass(self) -> bool:
        """Whether ``clip_()`` reads the gradients once more to find ``clipped_norm``.

        True only when a member's parameters partially overlap an earlier block (see
        the module docstring).
        """
        return self._current_plan().extra_pass

    @torch.no_grad()
    def clip_(self) -> ClipStats:
        """Apply every member in order, in place, and return the combined stats.

        No host sync beyond the members' own (none, unless one uses
        ``nonfinite="raise"``). Put a ``"raise"`` policy on the first member: a later
        member raising finds the gradients already changed by the earlier ones.

        Returns:
            The combined :class:`ClipStats` (see the module docstring).
        """
        plan = self._current_plan()
        self.step += 1
        results = [m.clip_() for m in self.members]
        device = next((r.norms.device for r in results if r.norms.numel()), torch.device("cpu"))
        p = self.norm_type

        # Pre-clip norms: each parameter from the first member that had it.
        takes = self._first_seen(results)
        pieces: list[Tensor] = []
        for member, take in takes.members:
            result_norms = results[member].norms
            if take is None:
                pieces.append(result_norms.to(device))
            else:
                index = take.index_on(result_norms.device)
                pieces.append(result_norms.index_select(0, index).to(device))
        if not pieces:
            return ClipStats.empty(self.step)
        firsts = takes.params
        dtype = _common_dtype([t.dtype for t in pieces])
        norms = (
            pieces[0].to(dtype) if len(pieces) == 1 else torch.cat([t.to(dtype) for t in pieces])
        )
        if takes.one_whole:  # one member saw every gradient first: reuse its stats
            first = next(r for r in results if r.params)
            total_norm = first.total_norm.to(device=device, dtype=dtype)
            finite = first.finite.to(device)
        else:
            total_norm = total_norm_of(norms, p)
            finite = torch.isfinite(total_norm)

        # Post-clip norm and threshold, block by block.
        thresholds: list[Tensor] = []
        for block in plan.blocks:
            own = results[block.member].threshold.to(device=device, dtype=dtype)
            if block.children and not block.has_new:
                covered = _combine([thresholds[c] for c in block.children], p)
                own = torch.minimum(own, covered)
            thresholds.append(own)
        threshold = _combine([thresholds[b] for b in plan.final], p)
        if plan.extra_pass:
            grads = [q.grad for q in firsts if q.grad is not None]
            clipped_norm = total_norm_of(tensor_norms(grads, p), p).to(device=device, dtype=dtype)
        else:
            finals = [results[plan.blocks[b].member].clipped_norm for b in plan.final]
            clipped_norm = _combine([c.to(device=device, dtype=dtype) for c in finals], p)

        clipped = torch.stack([r.clipped.to(device) for r in results]).any()
        scale = torch.where(total_norm > 0, clipped_norm / total_norm, 1.0)
        return ClipStats(
            total_norm=total_norm,
            threshold=threshold,
            scale=scale,
            clipped_norm=clipped_norm,
            clipped=clipped,
            finite=finite,
            step=torch.tensor(self.step, device=device),
            norms=norms,
            params=firsts,
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int, "members": [each member's state dict]}``: tensors and numbers only."""
        return {"step": self.step, "members": [m.state_dict() for m in self.members]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, member by member.

        Raises:
            ValueError: the number of members differs (or a member rejects its state).
        """
        states = state_dict["members"]
        if len(states) != len(self.members):
            raise ValueError(
                f"state_dict has {len(states)} chain members; this chain has {len(self.members)}"
            )
        for member, state in zip(self.members, states):
            member.load_state_dict(state)
        self.step = int(state_dict["step"])

    def reset(self) -> None:
        """Reset every member and the chain's step count."""
        for member in self.members:
            member.reset()
        self.step = 0

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __getitem__(self, index: int) -> Member:
        return self.members[index]

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(m) for m in self.members) + ")"

    # -- internals -----------------------------------------------------------------------

    def _first_seen(self, results: list[ClipStats]) -> _Takes:
        """Which norms of which member are each parameter's first (cached).

        The members' ``params`` tuples are the key, compared by identity: a clipper
        whose parameters all have gradients hands out the same tuple every step, so
        the per-parameter work (hundreds of ``id`` lookups) runs only when the set of
        gradients changes. The cache holds the tuples, so an identity cannot be reused.
        """
        key = tuple(r.params for r in results)
        cached = self._takes
        if (
            cached is not None
            and len(cached[0]) == len(key)
            and all(a is b for a, b in zip(cached[0], key))
        ):
            return cached[1]
        seen: set[int] = set()
        members: list[tuple[int, _Take | None]] = []
        firsts: list[Tensor] = []
        for index, params in enumerate(key):
            take = [k for k, q in enumerate(params) if id(q) not in seen]
            if not take:
                continue
            seen.update(id(params[k]) for k in take)
            firsts.extend(params[k] for k in take)
            members.append((index, None if len(take) == len(params) else _Take(take)))
        one_whole = len(members) == 1 and members[0][1] is None
        takes = _Takes(tuple(members), tuple(firsts), one_whole)
        self._takes = (key, takes)
        return takes

    def _current_plan(self) -> _Plan:
        """The block plan for the members' current parameter sets (cached)."""
        key = tuple(
            (id(g["params"]), len(g["params"])) for m in self.members for g in m.param_groups
        )
        if self._plan is None or key != self._plan_key:
            self._plan = _make_plan([frozenset(map(id, _bound(m))) for m in self.members])
            self._plan_key = key
        return self._plan


def chain(*clippers: Member) -> Chain:
    """Apply ``clippers`` in order as one clipper (see :mod:`gradclip.clippers.compose`).

    Args:
        *clippers: clippers (or chains), applied in the given order; they may bind
            the same parameters, disjoint ones, or any mix.

    Returns:
        A :class:`Chain` with ``clip_()``, ``state_dict()``, ``load_state_dict()``,
        ``reset()`` and ``step`` like a clipper.

    Raises:
        ValueError: no clippers, one clipper twice, or different ``norm_type``.
        TypeError: an argument is not a clipper.

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image Recognition
        Without Normalization. ICML 2021, arXiv:2102.06171 (AGC with the classifier
        head left out, the motivating case for per-parameter-set strategies).

    Example:
        >>> from gradclip.clippers.fixed import NormClip
        >>> a = torch.nn.Parameter(torch.zeros(2)); a.grad = torch.tensor([3.0, 4.0])
        >>> b = torch.nn.Parameter(torch.zeros(1)); b.grad = torch.tensor([12.0])
        >>> clipper = chain(NormClip([a], max_norm=1.0), NormClip([b], max_norm=2.0))
        >>> stats = clipper.clip_()
        >>> a.grad, b.grad
        (tensor([0.6000, 0.8000]), tensor([2.0000]))
        >>> stats.total_norm, stats.clipped_norm  # sqrt(5² + 12²), sqrt(1² + 2²)
        (tensor(13.), tensor(2.2361))
    """
    return Chain(*clippers)


def _bound(member: Member) -> list[Tensor]:
    """A member's bound parameters (with or without gradients), each once."""
    if isinstance(member, Chain):
        return member.params
    return [p for g in member.param_groups for p in g["params"]]


def _make_plan(sets: Sequence[frozenset[int]]) -> _Plan:
    """Merge the members' parameter sets into blocks (see the module docstring)."""
    blocks: list[_Block] = []
    owner: dict[int, int] = {}  # parameter id -> index of the block it is in now
    final: set[int] = set()
    for index, ids in enumerate(sets):
        touched = tuple(sorted({owner[i] for i in ids if i in owner}))
        merged = frozenset(ids.union(*(blocks[b].ids for b in touched)))
        has_new = any(i not in owner for i in ids)
        block = _Block(merged, index, touched, has_new, exact=merged == ids)
        blocks.append(block)
        final.difference_update(touched)
        final.add(len(blocks) - 1)
        for i in merged:
            owner[i] = len(blocks) - 1
    ordered = tuple(sorted(final))
    extra = not all(blocks[b].exact for b in ordered)
    return _Plan(tuple(blocks), ordered, extra)


def _combine(values: list[Tensor], p: float) -> Tensor:
    if len(values) == 1:
        return values[0]
    return total_norm_of(torch.stack(values), p)


def _common_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32
