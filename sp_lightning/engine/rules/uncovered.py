"""Gated ops with no soft rule: they run with their plain backward, and the engine says so."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from .interface import Handler, Scope

#: callable -> the name the coverage report and the warning use.
_NAMES: dict[Any, str] = {
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.rrelu: "rrelu",
    F.rrelu_: "rrelu",
    F.celu: "celu",
    F.celu_: "celu",
    F.selu: "selu",
    F.selu_: "selu",
    torch.selu: "selu",
    F.threshold: "threshold",
    F.threshold_: "threshold",
    F.hardshrink: "hardshrink",
    F.softshrink: "softshrink",
    F.max_pool1d: "max_pool1d",
    F.max_pool3d: "max_pool3d",
    F.adaptive_max_pool1d: "adaptive_max_pool1d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d",
    F.adaptive_max_pool3d: "adaptive_max_pool3d",
    F.fractional_max_pool2d: "fractional_max_pool2d",
    F.fractional_max_pool3d: "fractional_max_pool3d",
    F.instance_norm: "instance_norm",
    F.local_response_norm: "local_response_norm",
}


def _reporter(name: str) -> Handler:
    def handler(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
        scope.uncovered(name)
        return func(*args, **kwargs)

    return handler


#: callable -> handler that reports the op and runs it unchanged.
HANDLERS: dict[Any, Handler] = {func: _reporter(name) for func, name in _NAMES.items()}
