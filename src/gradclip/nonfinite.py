"""What to do when gradients are NaN or infinite: an explicit policy, never silence by accident.

Policies for the functional API:

* ``"ignore"``: torch's default. The gradients are scaled by the non-finite norm, so
  they become NaN; the optimizer step will spread the NaN into the parameters.
* ``"raise"``: raise :class:`NonFiniteGradientError` naming the first parameter whose
  gradient is not finite (its name when named parameters were given). Checking needs
  one host sync per call, as torch's ``error_if_nonfinite=True`` does.
* ``"zero"``: set every gradient to zero for this step, so a plain SGD step leaves the
  parameters unchanged. Stateful optimizers still advance their state (momentum
  decays, Adam's step count grows); skipping the step altogether is the ``"skip"``
  policy of :func:`gradclip.attach`. On CPU this costs nothing when gradients are
  finite; on accelerators it is one extra branch-free pass over the gradients.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from gradclip._params import GradList
from gradclip._sync import branch_on_host
from gradclip.norms import local_views

__all__ = ["NonFiniteGradientError", "NonFinitePolicy", "check_policy"]

NonFinitePolicy = Literal["ignore", "raise", "zero"]
"""The non-finite policies of the functional API."""

POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)


class NonFiniteGradientError(RuntimeError):
    """A gradient is NaN or infinite and the policy is ``"raise"``.

    Attributes:
        name: the first parameter with a non-finite gradient.
    """

    def __init__(self, name: str, total_norm: float) -> None:
        self.name = name
        super().__init__(
            f"gradient of {name} is not finite (total norm {total_norm}); the gradients "
            "were left untouched. Choose nonfinite='zero' or 'ignore' to go on, or look "
            "for the cause (learning rate too high, a log or division of zero, fp16 overflow)"
        )


def check_policy(policy: object, *, error_if_nonfinite: bool = False) -> NonFinitePolicy:
    """Validate a policy name; ``error_if_nonfinite=True`` (torch's flag) means ``"raise"``.

    >>> check_policy("zero")
    'zero'
    >>> check_policy("ignore", error_if_nonfinite=True)
    'raise'

    Raises:
        ValueError: an unknown policy, or ``error_if_nonfinite`` with ``"zero"``.
    """
    if policy not in POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(POLICIES)}; got {policy!r}")
    if error_if_nonfinite:
        if policy == "zero":
            raise ValueError(
                "error_if_nonfinite=True conflicts with nonfinite='zero'; pass only one"
            )
        return "raise"
    return policy  # type: ignore[return-value]


def raise_if_nonfinite(grads: GradList, norms: Tensor, total_norm: Tensor) -> None:
    """The ``"raise"`` policy: one host sync, and an error naming the first culprit."""
    if bool(torch.isfinite(total_norm)):
        return
    bad = (~torch.isfinite(norms)).nonzero()
    index = int(bad[0]) if len(bad) else 0
    raise NonFiniteGradientError(grads.name(index), float(total_norm))


def zero_if_nonfinite_(grads: list[Tensor], total_norm: Tensor) -> None:
    """The ``"zero"`` policy, applied after scaling: zero every gradient if the norm is not finite.

    On CPU the branch is taken on the host (no device to wait for); elsewhere a
    branch-free masked fill keeps the step free of host syncs.
    """
    grads = local_views(grads)
    nonfinite = ~torch.isfinite(total_norm)
    if branch_on_host([total_norm, *grads]):
        if bool(nonfinite):
            torch._foreach_zero_(grads)
        return
    for g in grads:
        g.masked_fill_(nonfinite.to(g.device), 0.0)
