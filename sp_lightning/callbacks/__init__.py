"""Lightning callbacks built on the engine."""

from .probe import ProbeSet, default_batch_fn, select_probe
from .semantic_pullback import Explanations, SemanticPullbackCallback
from .soft_training import SoftBackwardTraining

__all__ = ["Explanations", "ProbeSet", "SemanticPullbackCallback", "SoftBackwardTraining", "default_batch_fn", "select_probe"]
