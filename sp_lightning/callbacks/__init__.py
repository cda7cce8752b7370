"""Lightning callbacks built on the engine."""

from .probe import ProbeSet, default_batch_fn, select_probe
from .semantic_pullback import Explanations, SemanticPullbackCallback

__all__ = ["Explanations", "ProbeSet", "SemanticPullbackCallback", "default_batch_fn", "select_probe"]
