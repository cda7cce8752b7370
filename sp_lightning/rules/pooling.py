"""Soft max-pool backward (SPEC section 2).

The forward is the original ``max_pool2d``. The backward routes each output's
cotangent to its window with weights ``softmax(x_window / tau)`` (held
constant); overlapping windows add up. Padded positions are -inf, as in the
true max-pool, so they receive no weight; ``padding_mode="zeros"`` reproduces
the reference code, which pads the soft window with zeros.

With -inf padding the backward is separable (see ``_separable_backward``):
a depthwise convolution and its transpose. Otherwise (zero padding, ceil_mode,
extreme dynamic range) the padded
input is split once into its stride phases, so each kernel offset is a
unit-stride slice (strided views run several times slower), and the pooled
output, saved anyway by the next layer, is the softmax shift.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .gates import flush_tiny_


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def pool_geometry(kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> tuple[tuple[int, int], ...]:
    """Normalise max_pool2d arguments to (kernel, stride, padding, dilation) pairs."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride not in (None, [], ()) else k
    return k, s, _pair(padding), _pair(dilation)


#: The separable path needs every window's softmax denominator above this many times the
#: smallest normal float: each window's largest weight is then a normal float, and the
#: subnormal weights it flushes to zero are below 1e-8 of their window's total.
_DENOMINATOR_MARGIN = 1e8


def _separable_backward(
    x: Tensor, v: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], tau: float,
) -> Tensor | None:
    """Fast path: with one shift per (sample, channel), exp((x - M) / tau) does not depend on the window.

    The softmax denominators are then a sum over each window (a depthwise convolution with a
    kernel of ones, zero padding standing for the -inf padding), and routing v back is that
    convolution's transpose. Returns None when the output size needs ceil_mode or when some
    window lies so far below its channel's maximum that its denominator would underflow.
    """
    channels = x.shape[1]
    ones = torch.ones(channels, 1, *kernel, dtype=x.dtype, device=x.device)
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    spare = [n + 2 * p - e - (o - 1) * s for n, p, e, o, s in zip(x.shape[-2:], padding, extent, v.shape[-2:], stride)]
    if min(spare) < 0:  # ceil_mode: the last window hangs over the padded input
        return None
    peak = x.amax(dim=(-2, -1), keepdim=True)
    smallest = torch.finfo(x.dtype).tiny

    def weights(rows: slice) -> Tensor:
        """exp((x - M) / tau) for some samples, with no subnormals left."""
        return torch.threshold_(torch.sub(x[rows], peak[rows]).mul_(1.0 / tau).exp_(), smallest, 0.0)

    total = F.conv2d(weights(slice(None)), ones, None, stride, padding, dilation, channels)
    if not bool((total > smallest * _DENOMINATOR_MARGIN).all()):
        return None
    routed = total.reciprocal_().mul_(v)
    spread = F.conv_transpose2d(routed, ones, None, stride, padding, spare, channels, dilation)
    # Recompute the weights one sample at a time rather than keep a second input-sized tensor alive.
    for i in range(spread.shape[0]):
        spread[i].mul_(weights(slice(i, i + 1))[0])
    return spread


def soft_maxpool_backward(
    x: Tensor,
    out: Tensor,
    v: Tensor,
    geometry: tuple[tuple[int, int], ...],
    tau: float,
    padding_mode: str,
) -> Tensor:
    """Cotangent of the input: ``v`` routed through the soft windows of ``x`` (``out`` is the max-pool output)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
    if padding_mode == "neginf":
        fast = _separable_backward(x, v, (kh, kw), (sh, sw), (ph, pw), (dh, dw), tau)
        if fast is not None:
            return fast
    oh, ow = v.shape[-2:]
    h, w = x.shape[-2:]
    # Pad so every output window lies inside; a negative right pad crops rows no window reaches.
    need_h = (oh - 1) * sh + dh * (kh - 1) + 1
    need_w = (ow - 1) * sw + dw * (kw - 1) + 1
    pads = (pw, need_w - w - pw, ph, need_h - h - ph)
    xp = F.pad(x, pads, value=float("-inf") if padding_mode == "neginf" else 0.0)

    # Split the padded input into stride phases (contiguous, scaled by 1/tau): every window
    # offset is then a unit-stride slice of one phase, which elementwise kernels vectorise.
    taps = [((i * dh) % sh, (i * dh) // sh, (j * dw) % sw, (j * dw) // sw) for i in range(kh) for j in range(kw)]
    phases = {(a, c) for a, _, c, _ in taps}
    planes = {(a, c): xp[..., a::sh, c::sw].mul(1.0 / tau).contiguous() for a, c in phases}
    # The max of each window is the pooled output: a safe softmax shift (softmax is shift-invariant).
    shift = (out if padding_mode == "neginf" else out.clamp_min(0.0)).mul(1.0 / tau)
    weights = [
        flush_tiny_(torch.sub(planes[(a, c)][..., r : r + oh, q : q + ow], shift).exp_()) for a, r, c, q in taps
    ]
    total = weights[0].clone()
    for weight in weights[1:]:
        total.add_(weight)
    routed = v / total
    grads = {key: torch.zeros_like(plane, dtype=v.dtype) for key, plane in planes.items()}
    for (a, r, c, q), weight in zip(taps, weights):
        grads[(a, c)][..., r : r + oh, q : q + ow].addcmul_(weight, routed)
    gp = torch.zeros(v.shape[:-2] + xp.shape[-2:], dtype=v.dtype, device=v.device)
    for (a, c), grad in grads.items():
        gp[..., a::sh, c::sw] = grad
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
        ctx.save_for_backward(x, out[0] if isinstance(out, tuple) else out)
        ctx.geometry, ctx.tau, ctx.padding_mode = geometry, tau, padding_mode
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def backward(ctx: Any, v: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        x, out = ctx.saved_tensors
        squeeze = x.dim() == 3
        xb, ob, vb = (x.unsqueeze(0), out.unsqueeze(0), v.unsqueeze(0)) if squeeze else (x, out, v)
        grad = soft_maxpool_backward(xb, ob, vb, ctx.geometry, ctx.tau, ctx.padding_mode)
        return (grad.squeeze(0) if squeeze else grad), None, None, None, None
