"""Fixed-threshold strategies: ``NoClip`` (measure only) and ``NormClip`` (Pascanu et al., 2013).

References:
    Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural
    networks. ICML 2013, arXiv:1211.5063.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradclip._params import ParamsLike, check_threshold
from gradclip.clippers.base import GlobalNormClipper, ParamGroup, State
from gradclip.clippers.schedule import Schedule


class NoClip(GlobalNormClipper):
    """Leave gradients untouched but measure them: the baseline of every comparison.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> NoClip([w]).clip_().total_norm
        tensor(5.)
    """

    spec_name = "none"

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        *,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
    ) -> None:
        super().__init__(params, {}, norm_type=norm_type, nonfinite=nonfinite)

    def _threshold(self, group: ParamGroup, state: State, total_norm: Tensor) -> Tensor:
        return torch.full_like(total_norm, math.inf)


class NormClip(GlobalNormClipper):
    """Clip the global gradient norm to a fixed ``max_norm``: ``torch.nn.utils.clip_grad_norm_``.

    Same scale as torch, ``min(1, max_norm / (total_norm + 1e-6))``, and the same norms:
    torch's kernel (``norm_kernel`` ``"torch"``, see :func:`gradclip.tensor_norms`), so
    norms and clipped gradients are bit-identical to torch's. With param groups, each
    group is clipped to its own ``max_norm`` by its own norm.

    Args:
        params: parameters, ``named_parameters()`` pairs, or param groups.
        max_norm: the threshold, > 0.
        norm_type: p > 0 or ``inf``.
        nonfinite: ``"ignore"``, ``"raise"`` or ``"zero"``.
        schedule: a :class:`~gradclip.clippers.schedule.Schedule` applied to
            ``max_norm`` at each step (e.g. ``Cosine(1000, 0.1)``), or None. It
            is part of the clipper's state dict; per param group, as an option.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> stats = NormClip([w], max_norm=1.0).clip_()
        >>> w.grad, stats.total_norm, stats.clipped
        (tensor([0.6000, 0.8000]), tensor(5.), tensor(True))

        With a schedule, the threshold warms up from 0.5 to 1.0 over two steps:

        >>> from gradclip.clippers.schedule import LinearWarmup
        >>> clipper = NormClip([w], max_norm=1.0, schedule=LinearWarmup(2, start_factor=0.5))
        >>> [clipper.clip_().threshold.item() for _ in range(3)]
        [0.5, 0.75, 1.0]
    """

    spec_name = "norm"
    spec_positional = "max_norm"
    default_norm_kernel: ClassVar[str] = "torch"
    """A stateful drop-in for ``clip_grad_norm_``: torch's norms, bit for bit."""

    def __init__(
        self,
        params: ParamsLike | Iterable[dict[str, Any]],
        max_norm: float = 1.0,
        *,
        norm_type: float = 2.0,
        nonfinite: str = "ignore",
        schedule: Schedule | str | None = None,
    ) -> None:
        super().__init__(
            params,
            {"max_norm": max_norm, "schedule": schedule},
            norm_type=norm_type,
            nonfinite=nonfinite,
        )

    def _check_options(self, group: ParamGroup) -> None:
        group["max_norm"] = check_threshold(group["max_norm"], "max_norm", allow_zero=False)

    def _threshold(self, group: ParamGroup, state: State, total_norm: Tensor) -> Tensor:
        return torch.full_like(total_norm, group["max_norm"])
