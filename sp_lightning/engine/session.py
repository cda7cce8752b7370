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
def preserved_state(model: nn.Module, devices: list[int] | None = None) -> Iterator[None]:
    """Eval mode, grad on, RNG forked; every submodule's mode restored on exit (also after errors).

    Args:
        model: the model to run in eval mode.
        devices: CUDA devices whose RNG state to fork; default: those holding the model's parameters.
    """
    if devices is None:
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def explaining(model: nn.Module) -> Iterator[None]:
    """Everything one explanation run needs around it: the model's lock, :func:`preserved_state`,
    and the model's own soft-backward handles paused in this thread (the run's rules are the only ones)."""
    with _lock_of(model), preserved_state(model), suspended(model):
        yield
