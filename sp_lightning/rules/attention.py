"""Attention as value transport through frozen, softened attention (SPEC section 2).

For ``out = softmax(Q K^T s) V`` the soft VJP sends ``Ã^T v`` to V with
``Ã = sg(softmax(Q K^T s / tau))`` and nothing to Q or K.

Two forms are covered:

* ``F.scaled_dot_product_attention`` (fused kernels serve the forward; the
  backward rebuilds Ã from the saved Q and K, mask and scale);
* attention written by hand, ``softmax(scores) @ V`` (Swin, timm without fused
  attention, ``nn.MultiheadAttention`` with ``need_weights=True``): the softmax
  output A is tagged, and the matmul that consumes it uses the soft rule.
  Ã is rebuilt from A alone, since softmax(S / tau) is A^(1/tau) renormalised,
  so no attention logits are kept alive.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .gates import TINY, derived, flush_tiny_

_SOFTMAX_TAG = "_sp_softmax"


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Undo matmul broadcasting of a batch dimension."""
    return t if t.shape == shape else t.sum_to_size(shape)


def _value_cotangent(attn: Tensor, v: Tensor, value_shape: torch.Size) -> Tensor:
    """Ã^T v, summed back over broadcast batch dimensions."""
    return _sum_to_shape(attn.transpose(-2, -1).to(v.dtype) @ v, value_shape)


def soften(attn: Tensor, tau: float) -> Tensor:
    """softmax(S / tau) from A = softmax(S) along the last dim (A^(1/tau), renormalised), tails flushed."""
    if tau == 1.0:
        return torch.threshold(attn, TINY, 0.0)  # a copy: ``attn`` is also saved by the softmax
    powered = attn.pow(1.0 / tau)
    return flush_tiny_(powered.div_(powered.sum(-1, keepdim=True).clamp_min(torch.finfo(powered.dtype).tiny)))


class SoftSDPA(torch.autograd.Function):
    """Fused scaled-dot-product attention forward; value-transport backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        call: Any,
        attn_mask: Tensor | None,
        is_causal: bool,
        scale: float | None,
        tau: float,
        keep: bool,
    ) -> Tensor:
        out = call(q, k, v)
        ctx.save_for_backward(q, k, attn_mask)
        ctx.is_causal, ctx.scale, ctx.tau, ctx.value_shape, ctx.keep = is_causal, scale, tau, v.shape, keep
        return out

    @staticmethod
    def _softened(ctx: Any) -> Tensor:
        """Ã = softmax(Q K^T s / tau) with the forward's mask, rebuilt from the saved Q and K."""
        q, k, attn_mask = ctx.saved_tensors
        if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # grouped-query attention
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        logits = (q @ k.transpose(-2, -1)).mul_(scale / ctx.tau)
        if ctx.is_causal:
            length, source = logits.shape[-2:]
            keep = torch.ones(length, source, dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask / ctx.tau
        return flush_tiny_(torch.softmax(logits, dim=-1))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        attn = derived(ctx, lambda: SoftSDPA._softened(ctx))
        grad_v = attn.transpose(-2, -1).to(g.dtype) @ g
        value_shape = ctx.value_shape
        if len(value_shape) >= 3 and grad_v.shape[-3] != value_shape[-3]:
            groups = grad_v.shape[-3] // value_shape[-3]  # grouped-query attention: fold the repeats back
            grad_v = grad_v.unflatten(-3, (value_shape[-3], groups)).sum(-3)
        return None, None, _sum_to_shape(grad_v, value_shape), None, None, None, None, None, None


class SoftAttentionValue(torch.autograd.Function):
    """``A @ V`` where A is a softmax output: forward unchanged, backward ``Ã^T v`` to V only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, attn: Tensor, value: Tensor, call: Any, tau: float, keep: bool
    ) -> Tensor:
        out = call(attn, value)
        ctx.save_for_backward(attn)
        ctx.tau, ctx.value_shape, ctx.keep = tau, value.shape, keep
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        softened = derived(ctx, lambda: soften(ctx.saved_tensors[0], ctx.tau))
        return None, _value_cotangent(softened, g, ctx.value_shape), None, None, None


def tag_softmax(out: Tensor, dim: int) -> None:
    """Mark a softmax output taken over its last dim as attention weights."""
    if dim % out.dim() == out.dim() - 1:
        setattr(out, _SOFTMAX_TAG, out._version)


def is_tagged_softmax(t: Any) -> bool:
    """Whether ``t`` is an unmodified softmax output over its last dim."""
    return isinstance(t, Tensor) and getattr(t, _SOFTMAX_TAG, None) == t._version
