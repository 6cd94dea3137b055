"""Stateful clipping strategies, each bound to parameters like a torch optimizer.

Importing this package registers every strategy for :func:`gradclip.from_spec`.
"""

from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.agc import AGC, final_classifier_names
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.base import Clipper, GlobalNormClipper, GroupResult, ScheduledClipper
from gradclip.clippers.compose import Chain, chain
from gradclip.clippers.emaratio import EMARatio
from gradclip.clippers.fixed import NoClip, NormClip
from gradclip.clippers.schedule import Constant, Cosine, LinearWarmup, RelaxOnCalm, Schedule
from gradclip.clippers.stats import ClipStats
from gradclip.clippers.value import ValueClip
from gradclip.clippers.zclip import ZClip

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
    "GroupResult",
    "LinearWarmup",
    "NoClip",
    "NormClip",
    "RelaxOnCalm",
    "Schedule",
    "ScheduledClipper",
    "ValueClip",
    "ZClip",
    "chain",
    "final_classifier_names",
]
