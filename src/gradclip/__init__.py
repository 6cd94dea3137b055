"""gradclip: gradient clipping for PyTorch that you can trust and measure.

Drop-in replacements for ``torch.nn.utils`` clipping (same signatures, same results),
unit-wise AGC, stateful adaptive strategies, and the norms they are built on, all
free of host syncs on the hot path.

Example:
    >>> import torch, gradclip
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> total_norm = gradclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
    >>> bool(gradclip.grad_norm(model) <= 1.0 + 1e-5)
    True
"""

from gradclip.clippers import (
    AGC,
    AdaGC,
    AutoClip,
    Chain,
    Clipper,
    ClipStats,
    Constant,
    Cosine,
    EMARatio,
    GlobalNormClipper,
    LinearWarmup,
    NoClip,
    NormClip,
    RelaxOnCalm,
    Schedule,
    ValueClip,
    ZClip,
    chain,
    final_classifier_names,
)
from gradclip.functional import (
    clip_grad_agc_,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
)
from gradclip.nonfinite import NonFiniteGradientError, NonFinitePolicy
from gradclip.norms import get_total_norm, grad_norm, tensor_norms
from gradclip.spec import from_spec

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AdaGC",
    "AutoClip",
    "Chain",
    "ClipStats",
    "Clipper",
    "Constant",
    "Cosine",
    "EMARatio",
    "GlobalNormClipper",
    "LinearWarmup",
    "NoClip",
    "NonFiniteGradientError",
    "NonFinitePolicy",
    "NormClip",
    "RelaxOnCalm",
    "Schedule",
    "ValueClip",
    "ZClip",
    "__version__",
    "chain",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "final_classifier_names",
    "from_spec",
    "get_total_norm",
    "grad_norm",
    "tensor_norms",
]
