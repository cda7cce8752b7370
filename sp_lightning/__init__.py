"""sp-lightning: Semantic Pullbacks for PyTorch Lightning."""

from .callbacks import SemanticPullbackCallback, SoftBackwardTraining
from .engine import (
    DEFAULT_TEMPERATURES,
    CoverageReport,
    SoftBackward,
    SoftRules,
    UncoveredGatedOpWarning,
    coverage_report,
    soft_backward,
)
from .explainers import (
    AscentResult,
    DoublePullback,
    Explainer,
    Gradient,
    GradientAscent,
    NonFiniteWarning,
    PullbackAscent,
    SmoothGrad,
    SmoothPullback,
    SoftPullback,
    equivalent_alpha,
)
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
    "NonFiniteWarning",
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
