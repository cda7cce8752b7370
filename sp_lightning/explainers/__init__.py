"""Explainers with one call shape: ``attribute(inputs, target)``."""

from .ascent import AscentResult, GradientAscent, PullbackAscent, equivalent_alpha
from .base import Explainer, NonFiniteWarning, default_logits
from .pullback import DoublePullback, Gradient, SmoothGrad, SmoothPullback, SoftPullback

__all__ = [
    "AscentResult",
    "DoublePullback",
    "Explainer",
    "Gradient",
    "GradientAscent",
    "NonFiniteWarning",
    "PullbackAscent",
    "SmoothGrad",
    "SmoothPullback",
    "SoftPullback",
    "default_logits",
    "equivalent_alpha",
]
