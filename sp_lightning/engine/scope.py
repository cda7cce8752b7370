"""Scope the soft rules to one model's forward: ``soft_backward(model)``.

The handle adds two hooks to the model: a forward pre-hook that enters the
engine's mode and a forward hook (``always_call=True``, so it also runs when the
forward raises) that leaves it. Only ops run *inside* the model's forward are
softened; losses and other models are untouched. Removing the hooks restores
the model exactly: no classes or modules are swapped and nothing is cached.

Used as a context manager it undoes itself on exit; ``enable()`` /
``disable()`` keep it on across many training steps. What a forward changes
(the mode entered, a suspension) is per thread: a forward in one thread never
sees another thread's state.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import SoftRules
from .mode import SoftBackwardMode

#: model -> enabled handles on it (so an explainer can suspend them).
_ENABLED: "weakref.WeakKeyDictionary[nn.Module, list[SoftBackward]]" = weakref.WeakKeyDictionary()


class SoftBackward:
    """Soft backward rules on every forward through ``model`` while enabled.

    Args:
        model: the module whose forward gets the soft backward.
        temperatures: rule name -> temperature (``None`` switches a rule off);
            missing rules take the documented defaults. See ``DEFAULT_TEMPERATURES``.
        maxpool_padding: ``"neginf"`` (exact) or ``"zeros"`` (reference-code compatibility).
        warn_uncovered: warn when a gated op with no soft rule runs.
    """

    def __init__(
        self,
        model: nn.Module,
        temperatures: Mapping[str, Any] | SoftRules | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"soft_backward needs a torch.nn.Module, got {type(model).__name__}.")
        self.rules = SoftRules.coerce(temperatures, **options)
        self.model = model
        self._hooks: tuple[RemovableHandle, RemovableHandle] | None = None
        self._local = threading.local()  # per thread: the mode, which forwards entered it, suspension

    @property
    def _thread(self) -> threading.local:
        """This thread's state, created on first use."""
        local = self._local
        if not hasattr(local, "mode"):
            local.mode, local.entered, local.suspended = SoftBackwardMode(self.rules), [], False
        return local

    @property
    def suspended(self) -> bool:
        """Whether this thread's forwards skip the rules (see :func:`suspended`)."""
        return self._thread.suspended

    @suspended.setter
    def suspended(self, value: bool) -> None:
        self._thread.suspended = bool(value)

    @property
    def enabled(self) -> bool:
        """Whether the hooks are installed."""
        return self._hooks is not None

    def enable(self) -> "SoftBackward":
        """Install the hooks (idempotent)."""
        if self._hooks is None:
            self._hooks = (
                self.model.register_forward_pre_hook(self._enter),
                self.model.register_forward_hook(self._exit, always_call=True),
            )
            _ENABLED.setdefault(self.model, []).append(self)
        return self

    def disable(self) -> None:
        """Remove the hooks; the model is exactly as before ``enable()``."""
        if self._hooks is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = None
        thread = self._thread
        while thread.entered:  # a forward that never returned (e.g. a KeyboardInterrupt between hooks)
            if thread.entered.pop():
                thread.mode.__exit__(None, None, None)
        handles = _ENABLED.get(self.model, [])
        if self in handles:
            handles.remove(self)
        if not handles:
            _ENABLED.pop(self.model, None)

    def __deepcopy__(self, memo: dict) -> "SoftBackward":
        """Copies of the model keep copies of the hooks, bound to this handle: they stay inert."""
        return self

    def __enter__(self) -> "SoftBackward":
        return self.enable()

    def __exit__(self, *exc: Any) -> None:
        self.disable()

    def _enter(self, module: nn.Module, args: Any) -> None:
        # ``module is not self.model``: a deep copy of the model carries copies of these hooks; they stay inert.
        thread = self._thread
        active = (
            module is self.model and not thread.suspended and self.rules.any_active and _backward_possible(module, args)
        )
        if active:
            thread.mode.__enter__()
        thread.entered.append(active)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        thread = self._thread
        if thread.entered and thread.entered.pop():
            thread.mode.__exit__(None, None, None)


def _backward_possible(module: nn.Module, args: Any) -> bool:
    """Whether this forward can be differentiated at all.

    Without a possible backward the mode stays out of the way entirely, so the
    forward takes exactly the path it takes without us (e.g. the fused
    inference fast path of ``nn.MultiheadAttention``, which any active
    ``__torch_function__`` handler disables).
    """
    if not torch.is_grad_enabled():
        return False
    tensors = [a for a in (args if isinstance(args, tuple) else (args,)) if isinstance(a, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in module.parameters())


def soft_backward(
    model: nn.Module, temperatures: Mapping[str, Any] | SoftRules | None = None, **options: Any
) -> SoftBackward:
    """Soft backward rules on ``model``'s forward: ``with soft_backward(model): ...``.

    Inside the block the forward values are bit-identical and every backward
    uses the soft rules. Call ``.enable()`` on the result instead to keep the
    rules on (e.g. for training) until ``.disable()``.
    """
    return SoftBackward(model, temperatures, **options)


@contextmanager
def suspended(model: nn.Module) -> Iterator[None]:
    """Pause, in this thread, every enabled soft-backward handle on ``model`` and its submodules.

    Explainers use this so their own rules (or none, for the plain gradient) are
    the only ones applied, never on top of a training-time handle.
    """
    handles = [h for m in model.modules() for h in _ENABLED.get(m, []) if not h.suspended]
    for handle in handles:
        handle.suspended = True
    try:
        yield
    finally:
        for handle in handles:
            handle.suspended = False
