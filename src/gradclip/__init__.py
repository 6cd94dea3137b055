"""gradclip: gradient clipping for PyTorch that you can trust and measure.

Drop-in replacements for ``torch.nn.utils`` clipping (same signatures, same results),
unit-wise AGC, stateful adaptive strategies (AutoClip, ZClip, AdaGC, EMA-ratio,
schedules), gradient-norm monitoring, and ``attach`` for existing training loops, all
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
from gradclip.integrations.optim import ClipHandle, attach, clipping
from gradclip.monitor import GradMonitor
from gradclip.nonfinite import NonFiniteGradientError, NonFinitePolicy
from gradclip.norms import get_total_norm, grad_norm, tensor_norms
from gradclip.spec import from_spec
from gradclip.suggest import ThresholdCandidate, suggest_threshold
from gradclip.writers import CallbackWriter, CSVWriter, JSONLWriter, TensorBoardWriter, read_log

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AdaGC",
    "AutoClip",
    "CSVWriter",
    "CallbackWriter",
    "Chain",
    "ClipHandle",
    "ClipStats",
    "Clipper",
    "Constant",
    "Cosine",
    "EMARatio",
    "GlobalNormClipper",
    "GradMonitor",
    "JSONLWriter",
    "LinearWarmup",
    "NoClip",
    "NonFiniteGradientError",
    "NonFinitePolicy",
    "NormClip",
    "RelaxOnCalm",
    "Schedule",
    "TensorBoardWriter",
    "ThresholdCandidate",
    "ValueClip",
    "ZClip",
    "__version__",
    "attach",
    "chain",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clipping",
    "final_classifier_names",
    "from_spec",
    "get_total_norm",
    "grad_norm",
    "read_log",
    "suggest_threshold",
    "tensor_norms",
]
