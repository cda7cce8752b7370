"""What a rule's handlers may know about the engine, and the helpers every rule shares.

A handler is ``(scope, func, args, kwargs) -> result``: it computes its result with
the original callable ``func`` (so forward values are bit-identical) and tells the
engine what happened through :class:`Scope`, a narrow interface. Handlers never
see the mode object itself, so the rules do not depend on the engine that runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor

from ..config import SoftRules

#: Gate values at or below this are set to 0. Soft gates and softmax weights have tails
#: (Phi(-15) ~ 1e-51) that would otherwise become subnormal floats, which slow every
#: downstream CPU kernel several-fold.
TINY = 1e-12


class Deferred(Protocol):
    """Something a rule can only account for once the forward is over (e.g. how a softmax was used)."""

    def resolve(self, scope: "Scope") -> None:
        """Report to ``scope`` what became of it."""


class Scope(Protocol):
    """The engine as a handler sees it."""

    @property
    def rules(self) -> SoftRules:
        """The active rules (temperatures and options)."""

    def softened(self, rule: str, tau: Any) -> None:
        """Note that a gated op of ``rule`` ran: softened when ``tau`` is set, else with the rule switched off."""

    def uncovered(self, name: str) -> None:
        """Note (and warn about) a gated op with no soft rule: it runs with its plain backward."""

    def defer(self, item: Deferred) -> None:
        """Resolve ``item`` when the outermost forward under the rules ends."""

    def reentered(self) -> AbstractContextManager[Any]:
        """The rules active again inside a handler, for a torch function whose body must be seen op by op."""


Handler = Callable[[Scope, Any, tuple, dict], Any]


def arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    """Read an argument given by position or keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def needs_soft(*tensors: Any) -> bool:
    """Whether a backward can reach this op (grad on and some input requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def flush_tiny_(gate: Tensor) -> Tensor:
    """Zero the far tail of a non-negative gate or weight tensor in place (see ``TINY``)."""
    return torch.threshold_(gate, TINY, 0.0)


def release(ctx: Any, *names: str) -> None:
    """Drop what a rule's backward held on ``ctx`` once it has run, as autograd frees saved tensors,
    unless the running backward keeps its graph (``retain_graph``) and may run the rule again.

    Attributes of ``ctx`` otherwise live until the whole graph is dropped: a recipe would hold every
    recomputed layer's input through the rest of the backward, and the backward's own buffers would
    then come from fresh heap pages instead of the ones those inputs leave behind.
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if query is None or query():  # a torch that cannot tell: keep everything, as before
        return
    for name in names:
        setattr(ctx, name, None)
    ctx.released = True


def ensure_held(ctx: Any) -> None:
    """Refuse a second backward through a rule whose held values an earlier one released."""
    if getattr(ctx, "released", False):
        raise RuntimeError(
            "sp_lightning: trying to backward through a soft rule a second time, after the first "
            "backward freed what it held. Pass retain_graph=True to the first backward (or "
            "torch.autograd.grad) to backpropagate through the same graph again."
        )


def derived(ctx: Any, compute: Callable[[], Any]) -> Any:
    """What a rule's backward derives from the forward (a gate, window weights, softened attention).

    Computed at each backward, or, when the rule was told to ``keep`` it (several targets
    pull back through one graph), once per graph and reused by the later backward passes.
    """
    kept = getattr(ctx, "kept", None)
    if kept is None:
        kept = compute()
        if ctx.keep:
            ctx.kept = kept
    return kept
