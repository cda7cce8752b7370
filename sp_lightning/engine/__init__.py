"""The soft-backward engine: rules, the mode that applies them, their scope on a model, coverage.

Layout (imports go one way, top to bottom):

* ``config``: :class:`SoftRules`, the validated settings, and their one coercion ``SoftRules.coerce``;
* ``rules``: one module per rule family, each owning its autograd Functions and handlers,
  behind the narrow ``rules.Scope`` interface;
* ``mode``: :class:`SoftBackwardMode`, the ``TorchFunctionMode`` that dispatches to the handlers;
* ``scope``: :func:`soft_backward`, the mode scoped to one model's forward;
* ``session``: an explanation run that is exclusive per model and leaves no trace;
* ``logits``: :func:`read_logits`, the one way logits are read from a model;
* ``coverage``: :func:`coverage_report`.
"""

from .config import DEFAULT_TEMPERATURES, UNTEMPERED_RULES, MaxPoolPadding, SoftRules
from .coverage import CoverageReport, coverage_report
from .logits import LogitsFn, default_logits, read_logits
from .mode import CoverageRecorder, SoftBackwardMode, UncoveredGatedOpWarning
from .rules.kernels import eager_kernels
from .scope import SoftBackward, soft_backward, suspended
from .session import explaining, preserved_state

__all__ = [
    "DEFAULT_TEMPERATURES",
    "UNTEMPERED_RULES",
    "CoverageRecorder",
    "CoverageReport",
    "LogitsFn",
    "MaxPoolPadding",
    "SoftBackward",
    "SoftBackwardMode",
    "SoftRules",
    "UncoveredGatedOpWarning",
    "coverage_report",
    "default_logits",
    "eager_kernels",
    "explaining",
    "preserved_state",
    "read_logits",
    "soft_backward",
    "suspended",
]
