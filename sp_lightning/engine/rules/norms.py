"""Normalisation layers with their statistics held constant in the backward, and their handlers (docs/method.md section 2).

With mean and variance treated as constants, LayerNorm is an input-conditioned
affine map and its input VJP is ``v * gamma / sqrt(var + eps)``. GroupNorm and
RMSNorm follow the same pattern. Parameter gradients are the exact ones for the
given upstream cotangent. The forward always calls the original op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interface import Handler, Scope, arg, needs_soft


def _at_least_float(t: Tensor) -> Tensor:
    """Statistics in float32 for half/bfloat16 inputs, else in the input's own precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _sum_to(t: Tensor, like: Tensor) -> Tensor:
    """Sum leading dims so ``t`` matches ``like`` (trailing, LayerNorm-style parameters)."""
    return t.reshape(-1, *like.shape).sum(0)


class SoftLayerNorm(torch.autograd.Function):
    """LayerNorm / RMSNorm over the trailing dims with frozen statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, call: Any, weight: Tensor | None, bias: Tensor | None, dims: int, eps: float, rms: bool
    ) -> Tensor:
        red = tuple(range(x.dim() - dims, x.dim()))
        if not rms and not torch.is_autocast_enabled(x.device.type):
            # The kernel behind F.layer_norm; it returns the statistics with the (identical) output.
            out, center, rstd = torch.native_layer_norm(x, x.shape[x.dim() - dims :], weight, bias, eps)
        else:
            out = call(x)
            xf = _at_least_float(x)
            if rms:
                center = None
                rstd = torch.rsqrt(xf.pow(2).mean(red, keepdim=True) + eps)
            else:
                var, center = torch.var_mean(xf, red, unbiased=False, keepdim=True)
                rstd = torch.rsqrt(var + eps)
        needs_normalized = weight is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(rstd, weight, x if needs_normalized else None, center)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        rstd, weight, x, center = ctx.saved_tensors
        scale = rstd.to(v.dtype) if weight is None else rstd.to(v.dtype) * weight
        grad_x = v * scale if ctx.needs_input_grad[0] else None
        normalized = None
        if x is not None:
            normalized = ((_at_least_float(x) if center is None else _at_least_float(x) - center) * rstd).to(v.dtype)
        gw = _sum_to(v * normalized, weight) if normalized is not None else None
        gb = _sum_to(v, weight) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, gw, gb, None, None, None


class SoftGroupNorm(torch.autograd.Function):
    """GroupNorm with frozen per-(sample, group) statistics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, call: Any, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
    ) -> Tensor:
        out = call(x)
        xg = _at_least_float(x).reshape(x.shape[0], groups, -1)
        var, mean = torch.var_mean(xg, -1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        needs_normalized = weight is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(rstd, weight, x if needs_normalized else None, mean)
        ctx.groups, ctx.has_bias = groups, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        rstd, weight, x, mean = ctx.saved_tensors
        n, c = v.shape[0], v.shape[1]
        channel_shape = (n, c) + (1,) * (v.dim() - 2)
        per_channel = rstd.expand(n, ctx.groups, c // ctx.groups).reshape(channel_shape).to(v.dtype)
        param_shape = (1, c) + (1,) * (v.dim() - 2)
        scale = per_channel if weight is None else per_channel * weight.reshape(param_shape)
        grad_x = v * scale if ctx.needs_input_grad[0] else None
        reduce_dims = [0] + list(range(2, v.dim()))
        gw = gb = None
        if x is not None:
            xg = _at_least_float(x).reshape(n, ctx.groups, -1)
            normalized = ((xg - mean) * rstd).reshape(v.shape).to(v.dtype)
            gw = (v * normalized).sum(reduce_dims)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = v.sum(reduce_dims)
        return grad_x, None, gw, gb, None, None


def _params(scope: Scope, *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """The norm's parameters as the rule should see them (detached when no parameter gradient is wanted)."""
    if scope.rules.param_grads:
        return params
    return tuple(None if p is None else p.detach() for p in params)


def _layer_norm(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    on = scope.rules.tau("layernorm")
    scope.softened("layernorm", on)
    if on is None or not needs_soft(x, weight, bias):
        return func(*args, **kwargs)
    eps = float(arg(args, kwargs, 4, "eps", 1e-5))
    dims = 1 if isinstance(shape, int) else len(shape)
    rest = args[1:]
    weight, bias = _params(scope, weight, bias)
    return SoftLayerNorm.apply(x, lambda t: func(t, *rest, **kwargs), weight, bias, dims, eps, False)


def _rms_norm(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
    weight = arg(args, kwargs, 2, "weight")
    on = scope.rules.tau("rmsnorm")
    scope.softened("rmsnorm", on)
    if on is None or not needs_soft(x, weight):
        return func(*args, **kwargs)
    eps = arg(args, kwargs, 3, "eps")
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    dims = 1 if isinstance(shape, int) else len(shape)
    rest = args[1:]
    (weight,) = _params(scope, weight)
    return SoftLayerNorm.apply(x, lambda t: func(t, *rest, **kwargs), weight, None, dims, eps, True)


def _group_norm(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    x, groups = arg(args, kwargs, 0, "input"), int(arg(args, kwargs, 1, "num_groups"))
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    on = scope.rules.tau("groupnorm")
    scope.softened("groupnorm", on)
    if on is None or not needs_soft(x, weight, bias):
        return func(*args, **kwargs)
    eps = float(arg(args, kwargs, 4, "eps", 1e-5))
    rest = args[1:]
    weight, bias = _params(scope, weight, bias)
    return SoftGroupNorm.apply(x, lambda t: func(t, *rest, **kwargs), weight, bias, groups, eps)


def _table() -> dict[Any, Handler]:
    table: dict[Any, Handler] = {F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm, F.group_norm: _group_norm}
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = _rms_norm
    return table


#: callable -> handler for the normalisation layers.
HANDLERS: dict[Any, Handler] = _table()
