"""``ClipStats``: what one clipping step did, as 0-d tensors (no host sync to produce)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class ClipStats:
    """The record of one ``clip_()`` call. Every field is a 0-d tensor on the gradients' device.

    Reading a field on the host (``.item()``) waits for the device: do it at a
    logging interval, not every step (:class:`gradclip.GradMonitor` does that).

    Attributes:
        total_norm: global norm of the gradients before clipping (float32/float64).
        threshold: the largest total norm the strategy let through unchanged this
            step: the norm bound of a global-norm strategy; for per-tensor, per-unit
            and per-element strategies, the norm of their per-piece bounds. ``inf``
            when the strategy does not clip (e.g. during a warm-up).
        scale: the factor applied to the gradients (1 = untouched): for a strategy
            that multiplies every gradient by one factor, that very factor, bit for
            bit (NaN when a NaN norm was applied under ``nonfinite="ignore"``, as
            torch does); 0 on a non-finite step under ``nonfinite="zero"`` (every
            gradient was set to zero). For strategies that scale pieces differently
            (per tensor, per unit, per element, several param groups, chains), the
            effective ``clipped_norm / total_norm`` (1 for a zero norm).
        clipped_norm: global norm of the gradients after clipping.
        clipped: whether any gradient was scaled down (bool).
        finite: whether ``total_norm`` is finite (bool).
        step: the clipper's step count including this call (int64).
        norms: per-tensor pre-clip norms, in the order of the bound parameters that
            had gradients (1-D); lets a monitor log per-layer norms without a second pass.
        params: the parameters ``norms`` belong to, in the same order (not compared,
            not printed), so a monitor can match norms to its own parameters.
    """

    total_norm: Tensor
    threshold: Tensor
    scale: Tensor
    clipped_norm: Tensor
    clipped: Tensor
    finite: Tensor
    step: Tensor
    norms: Tensor
    params: tuple[Tensor, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def empty(cls, step: int) -> ClipStats:
        """The record of a step with no gradient to clip (norms 0, threshold ``inf``)."""
        zero = torch.tensor(0.0)
        return cls(
            total_norm=zero,
            threshold=torch.tensor(math.inf),
            scale=torch.tensor(1.0),
            clipped_norm=zero,
            clipped=torch.tensor(False),
            finite=torch.tensor(True),
            step=torch.tensor(step),
            norms=torch.zeros(0),
        )

    def as_dict(self) -> dict[str, float]:
        """Host copies of the scalar fields, in one transfer (a host sync)."""
        names = [f.name for f in fields(self) if f.name not in ("norms", "params")]
        values = torch.stack([getattr(self, n).double() for n in names]).tolist()
        return dict(zip(names, values, strict=True))
