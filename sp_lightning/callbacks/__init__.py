"""Lightning callbacks built on the engine."""

from .semantic_pullback import SemanticPullbackCallback
from .soft_training import SoftBackwardTraining

__all__ = ["SemanticPullbackCallback", "SoftBackwardTraining"]
