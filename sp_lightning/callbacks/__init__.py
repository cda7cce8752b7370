"""Lightning callbacks."""

from .soft_training import SoftBackwardTraining

__all__ = ["SoftBackwardTraining"]
