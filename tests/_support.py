"""Helpers shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class Lambda(nn.Module):
    """A module whose forward is an arbitrary function (so soft_backward can scope to it)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


@contextmanager
def float64_default() -> Iterator[None]:
    """Compare formulas in float64 (restored afterwards so other modules are unaffected)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def snapshot(model: nn.Module) -> dict:
    """Everything soft_backward/explainers promise not to change."""
    return {
        "modules": [(name, type(m), id(m)) for name, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()
        ],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "dict_keys": [sorted(vars(m)) for m in model.modules()],
    }


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        if key in ("state", "grads"):
            continue
        assert a[key] == b[key], key
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))


def mode_stack_depth() -> int:
    return torch._C._len_torch_function_stack()
