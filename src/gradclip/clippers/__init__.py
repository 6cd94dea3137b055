"""Stateful clipping strategies, each bound to parameters like a torch optimizer."""

from gradclip.clippers.base import Clipper, GlobalNormClipper, GroupResult
from gradclip.clippers.fixed import NoClip, NormClip
from gradclip.clippers.stats import ClipStats
from gradclip.clippers.value import ValueClip

__all__ = [
    "ClipStats",
    "Clipper",
    "GlobalNormClipper",
    "GroupResult",
    "NoClip",
    "NormClip",
    "ValueClip",
]
