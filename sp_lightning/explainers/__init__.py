"""Explainers with one call shape: ``attribute(inputs, target)`` (others, e.g. Captum's, through :func:`as_explainer`)."""

from .ascent import AscentResult, GradientAscent, PullbackAscent, equivalent_alpha
from .base import Explainer, NonFiniteWarning, default_logits
from .external import ExplainFn, ExternalExplainer, as_explainer
from .pullback import DoublePullback, Gradient, SmoothGrad, SmoothPullback, SoftPullback

__all__ = [
    "AscentResult",
    "DoublePullback",
    "ExplainFn",
    "Explainer",
    "ExternalExplainer",
    "Gradient",
    "GradientAscent",
    "NonFiniteWarning",
    "PullbackAscent",
    "SmoothGrad",
    "SmoothPullback",
    "SoftPullback",
    "as_explainer",
    "default_logits",
    "equivalent_alpha",
]
