"""sp-lightning: Semantic Pullbacks for PyTorch Lightning."""

from .callbacks import SemanticPullbackCallback, SoftBackwardTraining
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
from .schedule import RuleSchedules, TemperatureSchedule

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
    "RuleSchedules",
    "SemanticPullbackCallback",
    "SmoothGrad",
    "SmoothPullback",
    "SoftBackward",
    "SoftBackwardTraining",
    "SoftPullback",
    "SoftRules",
    "TemperatureSchedule",
    "UncoveredGatedOpWarning",
    "coverage_report",
    "equivalent_alpha",
    "soft_backward",
]
