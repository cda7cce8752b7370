"""Soft backward rules: configuration, autograd Functions and the op table."""

from .config import DEFAULT_TEMPERATURES, SoftRules
from .handlers import UncoveredGatedOpWarning

__all__ = ["DEFAULT_TEMPERATURES", "SoftRules", "UncoveredGatedOpWarning"]
