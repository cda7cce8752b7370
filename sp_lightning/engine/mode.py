"""The engine: a ``TorchFunctionMode`` that routes gated ops to the soft rules.

While the mode is active, every torch function call goes through
:meth:`SoftBackwardMode.__torch_function__`; calls with a soft rule get a
custom autograd Function whose forward is the original call (bit-identical)
and whose backward is the rule's VJP. Everything else passes straight through.

The mode holds frozen configuration, an optional coverage recorder (only
:func:`~sp_lightning.engine.coverage_report` passes one) and, while a forward
runs, the few items a rule can only account for at its end (how each softmax
output was used). It is the rules' :class:`~sp_lightning.engine.rules.Scope`.
One instance serves one thread at a time (``SoftBackward`` keeps one per thread).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch.overrides import TorchFunctionMode

from .config import SoftRules
from .rules import HANDLERS, Deferred, watch


class UncoveredGatedOpWarning(UserWarning):
    """A gated op ran with no soft rule: that part of the network uses the plain gradient."""


@dataclass
class CoverageRecorder:
    """Counts which gated ops ran softened, with a rule switched off, or with no rule."""

    softened: Counter = field(default_factory=Counter)
    switched_off: Counter = field(default_factory=Counter)
    uncovered: Counter = field(default_factory=Counter)


class SoftBackwardMode(TorchFunctionMode):
    """Apply ``rules`` to every gated op called while the mode is active.

    Args:
        rules: the soft rules (see :class:`SoftRules`).
        recorder: counts what ran, for the coverage report.
    """

    def __init__(self, rules: SoftRules, recorder: CoverageRecorder | None = None) -> None:
        super().__init__()
        self.rules = rules  # a plain attribute, not a property: torch.compile traces this mode
        self.recorder = recorder
        self._depth = 0
        self._deferred: list[Deferred] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self._deferred:  # some softmax of this forward is still unresolved: see where its weights go
            watch(func, args, kwargs)
        handler = HANDLERS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, func, args, kwargs)

    def __enter__(self) -> "SoftBackwardMode":
        if self._depth == 0:
            self._deferred = []
        self._depth += 1
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        super().__exit__(exc_type, exc, tb)
        self._depth -= 1
        if self._depth == 0:
            deferred, self._deferred = self._deferred, []
            if exc_type is None:
                for item in deferred:
                    item.resolve(self)

    # ------------------------------------------------------------------ the rules' Scope

    def softened(self, rule: str, tau: Any) -> None:
        """Note that a gated op ran (softened when ``tau`` is set)."""
        if self.recorder is not None:
            (self.recorder.softened if tau is not None else self.recorder.switched_off)[rule] += 1

    def uncovered(self, name: str) -> None:
        """Note (and warn about) a gated op with no soft rule."""
        if self.recorder is not None:
            self.recorder.uncovered[name] += 1
        if self.rules.warn_uncovered:
            warnings.warn(
                f"sp_lightning: gated op {name!r} ran with no soft rule; its backward is the plain gradient. "
                "See sp_lightning.coverage_report(model, inputs) for the full list.",
                UncoveredGatedOpWarning,
                stacklevel=3,
            )

    def defer(self, item: Deferred) -> None:
        """Resolve ``item`` when the outermost forward under this mode ends."""
        self._deferred.append(item)

    def reentered(self) -> "SoftBackwardMode":
        """This mode, to enter again inside a handler (nested: the forward does not end with it)."""
        return self
