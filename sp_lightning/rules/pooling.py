"""Soft max-pool backward (SPEC section 2).

The forward is the original ``max_pool2d``. The backward routes each output's
cotangent to its window with weights ``softmax(x_window / tau)`` (held
constant); overlapping windows add up. Padded positions are -inf, as in the
true max-pool, so they receive no weight; ``padding_mode="zeros"`` reproduces
the reference code, which pads the soft window with zeros.

The windows are visited one kernel offset at a time with strided views (k*k
output-sized buffers, each exponential computed once) instead of an unfold copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def pool_geometry(kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> tuple[tuple[int, int], ...]:
    """Normalise max_pool2d arguments to (kernel, stride, padding, dilation) pairs."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride not in (None, [], ()) else k
    return k, s, _pair(padding), _pair(dilation)


def soft_maxpool_backward(
    x: Tensor,
    v: Tensor,
    geometry: tuple[tuple[int, int], ...],
    tau: float,
    padding_mode: str,
) -> Tensor:
    """Cotangent of the input: ``v`` routed through the soft windows of ``x``."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    oh, ow = v.shape[-2:]
    h, w = x.shape[-2:]
    # Pad so every output window lies inside; a negative right pad crops rows no window reaches.
    need_h = (oh - 1) * sh + dh * (kh - 1) + 1
    need_w = (ow - 1) * sw + dw * (kw - 1) + 1
    pads = (pw, need_w - w - pw, ph, need_h - h - ph)
    fill = float("-inf") if padding_mode == "neginf" else 0.0
    xp = F.pad(x / tau, pads, value=fill)

    def window(t: Tensor, i: int, j: int) -> Tensor:
        return t[..., i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]

    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    peak = window(xp, *offsets[0]).clone()
    for i, j in offsets[1:]:
        torch.maximum(peak, window(xp, i, j), out=peak)
    weights = [torch.sub(window(xp, i, j), peak).exp_() for i, j in offsets]
    total = weights[0].clone()
    for w in weights[1:]:
        total.add_(w)
    routed = v / total
    gp = torch.zeros(v.shape[:-2] + xp.shape[-2:], dtype=v.dtype, device=v.device)
    for (i, j), w in zip(offsets, weights):
        window(gp, i, j).addcmul_(w, routed)
    return F.pad(gp, tuple(-p for p in pads))


class SoftMaxPool2d(torch.autograd.Function):
    """Forward: the original max-pool (values and indices). Backward: soft window routing."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        call: Any,
        geometry: tuple[tuple[int, int], ...],
        tau: float,
        padding_mode: str,
    ) -> Any:
        out = call(x)
        ctx.save_for_backward(x)
        ctx.geometry, ctx.tau, ctx.padding_mode = geometry, tau, padding_mode
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def backward(ctx: Any, v: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        squeeze = x.dim() == 3
        xb, vb = (x.unsqueeze(0), v.unsqueeze(0)) if squeeze else (x, v)
        grad = soft_maxpool_backward(xb, vb, ctx.geometry, ctx.tau, ctx.padding_mode)
        return (grad.squeeze(0) if squeeze else grad), None, None, None, None
