"""One explanation run on a model, leaving no trace: exclusive, eval mode, RNG forked, state restored.

Two threads explaining the same model at once would flip each other's
train/eval flags, restore them in the wrong order and so update BatchNorm
running statistics. :func:`explaining` therefore holds a per-model lock for the
whole run: concurrent calls on one model take turns (calls on different models
run in parallel), and a thread may nest runs on its own model.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from .scope import suspended

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_of(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s compiled submodules eagerly: each ``torch.compile``'d child (an ``OptimizedModule``)
    is replaced by its original module, and ``module.compile()``'d modules call their plain forward.

    The soft rules act on the ops of a forward as it runs; a compiled graph would run
    without them (or recompile for every explanation). Everything is put back on exit.

    Example:
        >>> net = torch.nn.Sequential(torch.compile(torch.nn.Linear(2, 2)))
        >>> with eager(net):
        ...     type(net[0]).__name__
        'Linear'
        >>> type(net[0]).__name__
        'OptimizedModule'
    """
    children = [
        (parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
        if isinstance(child, OptimizedModule)
    ]
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    try:
        for parent, name, child in children:
            parent._modules[name] = child._orig_mod
        for module, _ in compiled:
            module._compiled_call_impl = None
        yield
    finally:
        for module, impl in compiled:
            module._compiled_call_impl = impl
        for parent, name, child in reversed(children):
            parent._modules[name] = child


@contextmanager
def preserved_state(model: nn.Module, devices: list[int] | None = None) -> Iterator[None]:
    """Eval mode, grad on, RNG forked, compiled submodules run :func:`eager`; every submodule's mode
    and FSDP2's sharding restored on exit (also after errors).

    Args:
        model: the model to run in eval mode.
        devices: CUDA devices whose RNG state to fork; default: those holding the model's parameters.
    """
    if devices is None:
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    modes = [(m, m.training) for m in model.modules()]
    sharded = _sharded_fsdp_modules(model)
    try:
        with eager(model), torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        for module in sharded:  # FSDP2 keeps some modules (the root) gathered after a forward: shard them again
            module.reshard()


def _sharded_fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """``model``'s FSDP2 modules if every parameter is sharded now (as between training steps), else none.

    Resharding them after an explanation frees the parameters its forwards gathered and
    leaves FSDP as training left it; it runs no collective.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):  # FSDP2 needs a process group
        return []
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if modules and all(isinstance(p, DTensor) for p in model.parameters()):
        return modules
    return []


@contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Everything one explanation run needs around it: the model's lock, :func:`preserved_state`,
    and the model's own soft-backward handles paused in this thread (the run's rules are the only ones)."""
    with _lock_of(model), preserved_state(model), suspended(model):
        yield
