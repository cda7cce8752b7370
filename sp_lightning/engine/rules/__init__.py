"""The soft rules: each module owns its autograd Functions and the handlers that apply them.

``HANDLERS`` maps every torch callable some rule intercepts to its handler (see
``interface``); ``watch`` lets the attention rule see softmax weights reach other calls.
"""

from __future__ import annotations

from typing import Any

from . import activations, attention, norms, pooling, recipes, uncovered
from .attention import watch
from .interface import Deferred, Handler, Scope


def _merged() -> dict[Any, Handler]:
    table: dict[Any, Handler] = {}
    for module in (activations, pooling, norms, attention, recipes, uncovered):
        clash = set(table) & set(module.HANDLERS)
        if clash:
            raise RuntimeError(f"sp_lightning: two rules claim {sorted(map(str, clash))}")
        table.update(module.HANDLERS)
    return table


#: callable -> handler, built once.
HANDLERS: dict[Any, Handler] = _merged()

__all__ = ["HANDLERS", "Deferred", "Handler", "Scope", "watch"]
