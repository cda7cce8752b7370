"""The engine: a stateless ``TorchFunctionMode`` that routes gated ops to soft rules.

While the mode is active, every torch function call goes through
:meth:`SoftBackwardMode.__torch_function__`; calls with a soft rule get a
custom autograd Function whose forward is the original call (bit-identical)
and whose backward is the rule's VJP. Everything else passes straight through.

The mode holds only frozen configuration (and an optional coverage recorder
that only :func:`sp_lightning.coverage_report` passes in), so entering it
repeatedly does not make ``torch.compile`` recompile.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch.overrides import TorchFunctionMode

from .rules.config import SoftRules
from .rules.handlers import HANDLERS, warn_uncovered


@dataclass
class CoverageRecorder:
    """Counts which gated ops ran softened, with a rule switched off, or with no rule."""

    softened: Counter = field(default_factory=Counter)
    switched_off: Counter = field(default_factory=Counter)
    uncovered: Counter = field(default_factory=Counter)


class SoftBackwardMode(TorchFunctionMode):
    """Apply ``rules`` to every gated op called while the mode is active."""

    def __init__(self, rules: SoftRules, recorder: CoverageRecorder | None = None) -> None:
        super().__init__()
        self.rules = rules
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, func, args, kwargs)

    def record(self, rule: str, tau: Any) -> None:
        """Note that a gated op ran (softened when ``tau`` is set)."""
        if self.recorder is not None:
            (self.recorder.softened if tau is not None else self.recorder.switched_off)[rule] += 1

    def uncovered(self, name: str) -> None:
        """Note (and warn about) a gated op with no soft rule."""
        if self.recorder is not None:
            self.recorder.uncovered[name] += 1
        if self.rules.warn_uncovered:
            warn_uncovered(name)
