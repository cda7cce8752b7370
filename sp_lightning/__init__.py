"""sp-lightning: Semantic Pullbacks for PyTorch Lightning."""

from .callbacks import SemanticPullbackCallback
from .context import SoftBackward, soft_backward
from .coverage import CoverageReport, coverage_report
from .explainers import (
    AscentResult,
    DoublePullback,
    Explainer,
    Gradient,
    GradientAscent,
    PullbackAscent,
    SmoothGrad,
    SmoothPullback,
    SoftPullback,
    equivalent_alpha,
)
from .rules import DEFAULT_TEMPERATURES, SoftRules, UncoveredGatedOpWarning

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TEMPERATURES",
    "AscentResult",
    "CoverageReport",
    "DoublePullback",
    "Explainer",
    "Gradient",
    "GradientAscent",
    "PullbackAscent",
    "SemanticPullbackCallback",
    "SmoothGrad",
    "SmoothPullback",
    "SoftBackward",
    "SoftPullback",
    "SoftRules",
    "UncoveredGatedOpWarning",
    "coverage_report",
    "equivalent_alpha",
    "soft_backward",
]
