"""What to do when gradients are NaN or infinite: an explicit policy, never silence by accident.

Policies for the functional API:

* ``"ignore"``: torch's default. The gradients are scaled by the non-finite norm, so
  they become NaN; the optimizer step will spread the NaN into the parameters.
* ``"raise"``: raise :class:`NonFiniteGradientError` naming the first parameter whose
  gradient is not finite (its name when named parameters were given), or saying that
  that the norm overflowed when every gradient value is finite but a norm is not
  (float32 gradients with values above about 1.8e19). Checking needs one host sync per call, as
  torch's ``error_if_nonfinite=True`` does.
* ``"zero"``: set every gradient to zero for this step, so a plain SGD step leaves the
  parameters unchanged. Stateful optimizers still advance their state (momentum
  decays, Adam's step count grows); skipping the step altogether is the ``"skip"``
  policy of :func:`gradclip.attach`. On CPU this costs nothing when gradients are
  finite; on accelerators it is one extra branch-free pass over the gradients.

One more policy needs the optimizer, so only :func:`gradclip.integrations.optim.attach`
takes it (the functional API and the clippers reject it with a message saying so):

* ``"skip"``: the optimizer step does not happen. Parameters and optimizer state
  (moments, step counters) stay bit-identical to a run without that batch. A fused
  torch optimizer (``fused=True``) is told through its ``found_inf`` tensor, as
  ``torch.amp.GradScaler`` does, and skips inside its kernel: no host sync
  (:func:`skip_found_inf`). Any other optimizer needs the decision on the host (one
  sync per step); its step is then made a no-op by hiding the gradients
  (:func:`hide_grads_`, undone by :func:`restore_grads_` after the step).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from gradclip._params import GradList
from gradclip._sync import branch_on_host
from gradclip.norms import is_dtensor, local_views

__all__ = [
    "NonFiniteGradientError",
    "NonFinitePolicy",
    "StepPolicy",
    "check_policy",
    "check_step_policy",
]

NonFinitePolicy = Literal["ignore", "raise", "zero"]
"""The non-finite policies of the functional API."""

POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)

StepPolicy = Literal["ignore", "raise", "zero", "skip"]
"""The non-finite policies of :func:`gradclip.integrations.optim.attach`: ``"skip"`` too."""

STEP_POLICIES: tuple[str, ...] = get_args(StepPolicy)


class NonFiniteGradientError(RuntimeError):
    """A gradient is NaN or infinite and the policy is ``"raise"``.

    Also raised when every gradient value is finite but the norm overflows
    (:meth:`overflow`).

    Attributes:
        name: the first parameter with a non-finite gradient; for an overflowing
            total norm, the parameter whose gradient has the largest norm.
    """

    def __init__(self, name: str, total_norm: float, *, message: str | None = None) -> None:
        self.name = name
        if message is None:
            message = (
                f"gradient of {name} is not finite (total norm {total_norm}); the gradients "
                "were left untouched. Choose nonfinite='zero' or 'ignore' to go on, or look "
                "for the cause (learning rate too high, a log or division of zero, fp16 overflow)"
            )
        super().__init__(message)

    @classmethod
    def overflow(
        cls, name: str, largest: float, total_norm: float, norm_type: float | None
    ) -> NonFiniteGradientError:
        """Every gradient value is finite, but the norm overflowed its dtype.

        Args:
            name: the parameter whose gradient has the largest norm.
            largest: that norm.
            total_norm: the overflowed total (inf).
            norm_type: the order p of the norms, if known.
        """
        order = "" if norm_type is None else f" of order {norm_type}"
        return cls(
            name,
            total_norm,
            message=(
                f"the gradient norm{order} overflowed to {total_norm}, although every "
                f"gradient value is finite (the largest per-tensor norm is {largest}, of {name}); "
                "the gradients were left untouched. Scale the loss down, or choose "
                "nonfinite='zero' or 'ignore' to go on"
            ),
        )


def check_policy(policy: object, *, error_if_nonfinite: bool = False) -> NonFinitePolicy:
    """Validate a policy name; ``error_if_nonfinite=True`` (torch's flag) means ``"raise"``.

    >>> check_policy("zero")
    'zero'
    >>> check_policy("ignore", error_if_nonfinite=True)
    'raise'

    Raises:
        ValueError: an unknown policy (``"skip"`` included: only ``attach`` can skip an
            optimizer step), or ``error_if_nonfinite`` with ``"zero"``.
    """
    if policy == "skip":
        raise ValueError(
            f"nonfinite must be one of {', '.join(POLICIES)}; got 'skip': skipping the "
            "optimizer step needs the optimizer, so only gradclip.attach(optimizer, "
            "clipper, nonfinite='skip') offers it"
        )
    if policy not in POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(POLICIES)}; got {policy!r}")
    if error_if_nonfinite:
        if policy == "zero":
            raise ValueError(
                "error_if_nonfinite=True conflicts with nonfinite='zero'; pass only one"
            )
        return "raise"
    return policy  # type: ignore[return-value]


def raise_if_nonfinite(
    grads: GradList, norms: Tensor, total_norm: Tensor, *, norm_type: float | None = None
) -> None:
    """The ``"raise"`` policy: one host sync, and an error naming the first culprit.

    ``norms`` are the per-tensor norms of ``grads`` and ``total_norm`` their total of
    order ``norm_type`` (2 if not given). A norm can overflow although every value of
    its gradient is finite (float32 squares overflow above about 1.8e19): then the
    error says that the total norm overflowed, with the largest per-tensor norm
    (recomputed in float64), instead of blaming a parameter. Looking at the values
    costs more syncs, but only once the step is known to fail.
    """
    if bool(torch.isfinite(total_norm)):
        return
    for k in (~torch.isfinite(norms)).nonzero().flatten().tolist():
        grad = grads.grads[k]
        # A DTensor's values are checked on every rank by its (global) norm only.
        if is_dtensor(grad) or not bool(torch.isfinite(grad).all()):
            raise NonFiniteGradientError(grads.name(k), float(total_norm))
    p = 2.0 if norm_type is None else norm_type
    exact = [
        float(norms[k])
        if is_dtensor(g)
        else float(torch.linalg.vector_norm(g, p, dtype=torch.float64))
        for k, g in enumerate(grads.grads)
    ]
    largest = max(range(len(exact)), key=exact.__getitem__)
    raise NonFiniteGradientError.overflow(
        grads.name(largest), exact[largest], float(total_norm), norm_type
    )


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


def check_step_policy(policy: object) -> StepPolicy:
    """Validate the policy of an optimizer integration: a functional one or ``"skip"``.

    >>> check_step_policy("skip")
    'skip'

    Raises:
        ValueError: an unknown policy, naming it and the valid ones.
    """
    if policy not in STEP_POLICIES:
        raise ValueError(f"nonfinite must be one of {', '.join(STEP_POLICIES)}; got {policy!r}")
    return policy  # type: ignore[return-value]


def skip_found_inf(finite: Tensor, found_inf: Tensor | None = None) -> Tensor:
    """The ``found_inf`` of a fused optimizer step under ``"skip"``: 1.0 skips it, 0.0 not.

    1.0 when the clip saw a non-finite norm (``finite`` is False) or ``found_inf``
    (a ``GradScaler``'s, if any) is already set. Torch's fused kernels skip the update
    when ``found_inf == 1`` and subtract ``found_inf`` from their step counters, so
    the result is exactly 0 or 1. A float32 0-d tensor on ``finite``'s device; no
    host sync.

    >>> skip_found_inf(torch.tensor(False)), skip_found_inf(torch.tensor(True))
    (tensor(1.), tensor(0.))
    """
    bad = (~finite).to(torch.float32)
    if found_inf is None:
        return bad
    return torch.clamp(found_inf.to(bad.device, torch.float32) + bad, max=1.0)


def hide_grads_(params: Iterable[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Skip a step on the host: set every ``.grad`` to None, so ``step()`` touches nothing.

    Torch optimizers update only parameters that have a gradient (their state,
    step counters included, stays as it is), so with every gradient hidden a step
    is a no-op. Returns what :func:`restore_grads_` puts back after the step.
    """
    hidden: list[tuple[Tensor, Tensor]] = []
    for p in params:
        if p.grad is not None:
            hidden.append((p, p.grad))
            p.grad = None
    return hidden


def restore_grads_(hidden: Iterable[tuple[Any, Tensor]]) -> None:
    """Give back the gradients :func:`hide_grads_` took."""
    for p, grad in hidden:
        p.grad = grad
