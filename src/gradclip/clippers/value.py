"""``ValueClip``: clamp every gradient element to ``[-clip_value, clip_value]``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradclip._params import ParamsLike, check_threshold
from gradclip.clippers.base import Clipper, GroupResult, ParamGroup, State
from gradclip.functional import clamp_grads_
from gradclip.norms import tensor_norms, total_norm_of


class ValueClip(Clipper):
    """Clamp each gradient element to ``[-clip_value, clip_value]`` (``clip_grad_value_``).

    Value clipping changes the gradient's direction, unlike norm clipping. The stats'
    ``threshold`` is the norm of a gradient with every element at the bound, and
    ``clipped_norm`` costs one more read of the gradients.

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups.
        clip_value: the bound, > 0.
        norm_type: the p of the reported norms.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([-3.0, 0.5])
        >>> stats = ValueClip([w], clip_value=1.0).clip_()
        >>> w.grad, stats.clipped
        (tensor([-1.0000,  0.5000]), tensor(True))
    """

    spec_name = "value"
    spec_positional = "clip_value"

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        clip_value: float = 1.0,
        *,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
    ) -> None:
        super().__init__(
            params, {"clip_value": clip_value}, norm_type=norm_type, nonfinite=nonfinite
        )

    def _check_options(self, group: ParamGroup) -> None:
        group["clip_value"] = check_threshold(group["clip_value"], "clip_value", allow_zero=False)

    def _clip_group(
        self, group: ParamGroup, state: State, grads: list[Tensor], norms: Tensor
    ) -> GroupResult:
        value = group["clip_value"]
        clamp_grads_(grads, value)
        p = self.norm_type
        total_norm = total_norm_of(norms, p)
        clipped_norm = total_norm_of(tensor_norms(grads, p), p).to(total_norm.dtype)
        numel = sum(g.numel() for g in grads)
        bound = value if math.isinf(p) else value * numel ** (1.0 / p)
        threshold = torch.full_like(total_norm, bound)
        return GroupResult(threshold, clipped_norm, clipped_norm < total_norm)
