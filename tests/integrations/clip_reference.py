"""Expected gradients for the adapter tests, from the recorded pre-clip gradients.

``reference`` drives a separate instance of the same gradclip strategy (the adapters
must apply it to the right gradients, once, in order: what the strategy computes is
tested against the papers in tests/clippers); ``independent`` computes the result
from torch or the paper's formula for the stateless strategies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from gradclip.spec import from_spec


def reference(spec: str, names: list[str], records: list[dict[str, Any]]) -> list[list[Tensor]]:
    """The gradients a fresh clipper of ``spec`` makes from the recorded pre-clip ones.

    Each record holds ``grads`` and ``params`` (the values at that step, in the
    order of ``names``), and ``stage``/``scale`` if the gradients were AMP-scaled.
    """
    params = [nn.Parameter(torch.zeros_like(p)) for p in records[0]["params"]]
    clipper = from_spec(spec, list(zip(names, params)))
    expected = []
    for record in records:
        for p, value, grad in zip(params, record["params"], record["grads"]):
            p.data.copy_(value)
            p.grad = unscaled(grad, record)
        clipper.clip_()
        expected.append([p.grad.clone() for p in params])
    return expected


def unscaled(grad: Tensor, record: dict[str, Any]) -> Tensor:
    """The gradient divided by the loss scale if the record says it was still scaled."""
    if record.get("stage") is OptState.READY:  # the probe saw scaled gradients
        return grad * (1.0 / record["scale"])  # powers of two: exact
    return grad.clone()


def independent(spec: str, records: list[dict[str, Any]]) -> list[list[Tensor]] | None:
    """Expected gradients from torch or from the paper's formula, for stateless specs."""
    out = []
    for record in records:
        grads = [unscaled(g, record) for g in record["grads"]]
        if spec.startswith("norm:"):
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            scale = min(1.0, float(spec[5:]) / (float(total) + 1e-6))
            out.append([g * scale for g in grads])
        elif spec.startswith("value:"):
            c = float(spec[6:])
            out.append([g.clamp(-c, c) for g in grads])
        elif spec.startswith("agc:"):
            # Brock et al. 2021 (arXiv:2102.06171): per unit i (a row; a vector is one
            # unit), if ‖G_i‖/max(‖W_i‖, 1e-3) > λ: G_i ← λ·max(‖W_i‖, 1e-3)/‖G_i‖ · G_i.
            lam = float(spec[4:])
            clipped = []
            for w, g in zip(record["params"], grads):
                rows_w, rows_g = (w, g) if w.ndim > 1 else (w[None], g[None])
                wn = rows_w.double().norm(dim=1, keepdim=True).clamp_min(1e-3)
                gn = rows_g.double().norm(dim=1, keepdim=True)
                new = torch.where(gn / wn > lam, rows_g * (lam * wn / gn.clamp_min(1e-6)), rows_g)
                clipped.append(new.to(g.dtype).reshape(g.shape))
            out.append(clipped)
        else:
            return None
    return out


def assert_grads(actual: list[Tensor], expected: list[Tensor], exact: bool = True) -> None:
    """Bit-identical (``exact``) or equal to float32 rounding."""
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-7}
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


def check_steps(
    spec: str,
    names: list[str],
    records: list[dict[str, Any]],
    at_step: list[dict[str, Any]],
    lr: float,
) -> None:
    """The gradients at every optimizer step are ``spec``'s output, and SGD applied them.

    ``records`` are the pre-clip gradients and parameters (``reference``'s input);
    ``at_step`` the gradients the optimizer's update used (``grads``) and the
    parameters before and after it (``before``/``after``, optional), one per step.
    """
    assert len(records) == len(at_step) > 0
    expected = reference(spec, names, records)
    clipped_any = False
    for record, step, want in zip(records, at_step, expected):
        assert_grads(step["grads"], want)
        pre = [unscaled(g, record) for g in record["grads"]]
        clipped_any |= any(not torch.equal(g, w) for g, w in zip(pre, want))
        if "after" in step:
            for before, after, g in zip(step["before"], step["after"], want):
                torch.testing.assert_close(after, before - lr * g, rtol=1e-6, atol=1e-7)
    assert clipped_any, f"{spec} never clipped in this run: the test could not fail"
    other = independent(spec, records)
    if other is not None:
        for step, want in zip(at_step, other):
            assert_grads(step["grads"], want, exact=False)
