"""Builders and comparisons shared by the tests (references never come from gradclip)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
NORM_TYPES = (0.5, 1.0, 2.0, 3.0, math.inf)
FOREACH = (True, False, None)

# Shape sets used by the differential tests: small and large tensors, 0-d scalars,
# empty tensors, conv-like 4-d weights, and many same-shaped tensors.
SHAPE_SETS: dict[str, list[tuple[int, ...]]] = {
    "single-vector": [(7,)],
    "linear": [(16, 8), (16,)],
    "scalars": [(), (), ()],
    "with-empty": [(3, 4), (0,), (5,)],
    "conv": [(8, 3, 3, 3), (8,), (4, 8, 1, 1), (4,)],
    "mlp": [(64, 32), (64,), (32, 64), (32,), (10, 32), (10,)],
    "many-same": [(4, 4)] * 12,
    "large": [(300, 300), (17,)],
}


def make_params(
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype | Sequence[torch.dtype] = torch.float32,
    *,
    seed: int = 0,
    grad_scale: float = 1.0,
    no_grad: Sequence[int] = (),
) -> list[torch.nn.Parameter]:
    """Parameters of the given shapes with random weights and gradients.

    ``dtype`` may be one dtype or one per shape; indices in ``no_grad`` get no gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    dtypes = [dtype] * len(shapes) if isinstance(dtype, torch.dtype) else list(dtype)
    params = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        w = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dt))
        if i not in no_grad:
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * grad_scale
            w.grad = g.to(dt)
        params.append(w)
    return params


def clone_params(params: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    """Independent copies of parameters and their gradients."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
        out.append(q)
    return out


def grads_of(params: Sequence[Tensor]) -> list[Tensor | None]:
    """Copies of the gradients (``None`` where a parameter has none)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def assert_grads_identical(params: Sequence[Tensor], expected: Sequence[Tensor | None]) -> None:
    """Bit-identical gradients (NaN equal to NaN, dtype and shape checked)."""
    assert len(params) == len(expected)
    for i, (p, e) in enumerate(zip(params, expected)):
        if e is None:
            assert p.grad is None, f"parameter {i} unexpectedly has a gradient"
            continue
        assert p.grad is not None, f"parameter {i} lost its gradient"
        torch.testing.assert_close(
            p.grad, e, rtol=0, atol=0, equal_nan=True, msg=lambda m, i=i: f"grad {i}: {m}"
        )


def assert_grads_close(
    params: Sequence[Tensor], expected: Sequence[Tensor | None], *, rtol: float, atol: float
) -> None:
    """Gradients equal to ``expected`` within tolerance (dtype must match)."""
    assert len(params) == len(expected)
    for i, (p, e) in enumerate(zip(params, expected)):
        if e is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(
            p.grad, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, i=i: f"grad {i}: {m}"
        )


def flat64(tensors: Sequence[Tensor]) -> Tensor:
    """All tensors flattened into one float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def reference_total_norm(tensors: Sequence[Tensor], p: float) -> float:
    """The p-norm of all tensors viewed as one vector, computed in float64 from scratch."""
    x = flat64(tensors).abs()
    if x.numel() == 0:
        return 0.0
    if math.isinf(p):
        return float(x.max())
    return float(x.pow(p).sum().pow(1.0 / p))


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing results in ``dtype`` computed two legitimate ways."""
    return {
        torch.float64: (1e-12, 1e-14),
        torch.float32: (2e-6, 1e-7),
        torch.float16: (2e-3, 1e-4),
        torch.bfloat16: (1.6e-2, 1e-3),
    }[dtype]


# --- AGC reference (ALGORITHMS.md) ----------------------------------------------------------


def units_of(t):
    """Index expressions of the units of ``t``: its dim-0 slices, or the whole tensor."""
    return list(range(t.shape[0])) if t.ndim > 1 else [...]


def agc_reference(params, clip_factor=0.01, eps=1e-3):
    """The clipped gradients, one unit at a time in float64 (None for no gradient)."""
    out = []
    for p in params:
        if p.grad is None:
            out.append(None)
            continue
        w = p.detach().to(torch.float64)
        g = p.grad.detach().to(torch.float64).clone()
        for i in units_of(g):
            w_norm = max(math.sqrt(float((w[i] ** 2).sum())), eps)
            g_norm = math.sqrt(float((g[i] ** 2).sum()))
            ratio = g_norm / w_norm if w_norm > 0 else (math.inf if g_norm > 0 else 0.0)
            if ratio > clip_factor:
                g[i] = clip_factor * w_norm / max(g_norm, 1e-6) * g[i]
        out.append(g.to(p.grad.dtype))
    return out


def unit_ratios(params, eps=1e-3):
    """‖G_i‖ / max(‖W_i‖, eps) for every unit of every parameter with a gradient, in float64."""
    ratios = []
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach().double(), p.grad.double()
        for i in units_of(g):
            w_norm = max(math.sqrt(float((w[i] ** 2).sum())), eps)
            ratios.append(math.sqrt(float((g[i] ** 2).sum())) / w_norm)
    return ratios


def agc_params(shapes, dtype=torch.float32, *, seed=0, no_grad=(), zero_weight=()):
    """Parameters whose gradient units span ratios 1e-4..1, so λ=0.01 clips about half."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = [dtype] * len(shapes) if isinstance(dtype, torch.dtype) else list(dtype)
    params = []
    for i, (shape, dt) in enumerate(zip(shapes, dtypes)):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        if i in zero_weight:
            w.zero_()
        param = torch.nn.Parameter(w.to(dt))
        if i not in no_grad:
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            unit_shape = (shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 else ()
            scale = 10.0 ** (torch.rand(unit_shape, generator=gen, dtype=torch.float64) * 4 - 4)
            param.grad = (g * scale).to(dt)
        params.append(param)
    return params
