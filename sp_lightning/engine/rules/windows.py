"""Sums over max-pool windows and their transpose, the arithmetic under the soft max-pool's routings.

Window sums of the softmax weights are the routings' denominators; their transpose
spreads each window's cotangent back over its positions. ATen's pooling kernels
compute both, but for the two commonest geometries adds of strided slices are
several times faster on CPU: windows that tile the input (VGG's 2x2) and the
stems' 3x3 windows at stride 2 (ResNet, DenseNet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


Geometry = tuple[tuple[int, int], ...]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def pool_geometry(kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> Geometry:
    """Normalise max_pool2d arguments to (kernel, stride, padding, dilation) pairs."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride not in (None, [], ()) else k
    return k, s, _pair(padding), _pair(dilation)


def ones_kernel(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """A depthwise kernel of ones: window sums."""
    return torch.ones(x.shape[1], 1, *kernel, dtype=x.dtype, device=x.device)


def tiles(x: Tensor, geometry: Geometry) -> bool:
    """Whether the windows tile ``x`` exactly (kernel = stride, no padding or dilation), as in VGG."""
    kernel, stride, padding, dilation = geometry
    whole = x.shape[-2] % kernel[0] == 0 and x.shape[-1] % kernel[1] == 0
    return stride == kernel and padding == (0, 0) and dilation == (1, 1) and whole


def halves(x: Tensor, geometry: Geometry) -> bool:
    """Whether the windows are 3 wide at stride 2 with padding 1 over even sizes (the stem max-pool of
    ResNets and DenseNets, where this rule costs most): window i then covers positions 2i - 1, 2i and
    2i + 1, so the window sums and their transpose are two adds per dimension on the even and odd
    positions, several times faster than ATen's pooling kernels on CPU. (With ceil_mode one more window
    would hang over the end; the caller has refused that geometry before.)"""
    kernel, stride, padding, dilation = geometry
    even = x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0
    return kernel == (3, 3) and stride == (2, 2) and padding == (1, 1) and dilation == (1, 1) and even


def halving_sums(t: Tensor, dim: int) -> Tensor:
    """Sums along ``dim`` (negative) of the halving windows: window i adds positions 2i - 1, 2i, 2i + 1."""
    pairs = t.unflatten(dim, (-1, 2))
    even, odd = pairs.select(dim, 0), pairs.select(dim, 1)
    total = even + odd
    n = total.shape[dim]
    total.narrow(dim, 1, n - 1).add_(odd.narrow(dim, 0, n - 1))
    return total


def halving_shares(r: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The transpose of :func:`halving_sums` along ``dim`` (negative), as what the even and the odd
    positions receive: position 2i gets window i, position 2i + 1 windows i and i + 1."""
    n = r.shape[dim]
    odd = torch.empty_like(r)
    torch.add(r.narrow(dim, 0, n - 1), r.narrow(dim, 1, n - 1), out=odd.narrow(dim, 0, n - 1))
    odd.narrow(dim, n - 1, 1).copy_(r.narrow(dim, n - 1, 1))
    return r, odd


def halving_spread_times(routed: Tensor, weights: Tensor, out: Tensor | None) -> Tensor:
    """``weights`` times the spread of ``routed`` over the halving windows, written into ``out`` (the
    weights themselves when they are owned) or a new tensor: columns first, then each row parity's
    share multiplied straight into its rows (no input-sized spread is formed)."""
    cols = torch.stack(halving_shares(routed, -1), dim=-1).flatten(-2)
    out = torch.empty_like(weights) if out is None else out
    rows_in, rows_out = weights.unflatten(-2, (-1, 2)), out.unflatten(-2, (-1, 2))
    for parity, share in enumerate(halving_shares(cols, -2)):
        torch.mul(rows_in.select(-2, parity), share, out=rows_out.select(-2, parity))
    return out


def spread(routed: Tensor, x: Tensor, geometry: Geometry, spare: list[int]) -> Tensor:
    """Each window's value added to all its positions of ``x``: the transpose of the window sum.

    The transposed depthwise convolution is general; for the usual geometries the pooling
    kernels that compute the same sums are several times faster on CPU.
    """
    kernel, stride, padding, dilation = geometry
    if dilation == (1, 1):
        return torch.ops.aten.avg_pool2d_backward(routed, x, kernel, stride, padding, False, True, 1)
    return F.conv_transpose2d(routed, ones_kernel(x, kernel), None, stride, padding, spare, x.shape[1], dilation)


def window_sums(weights: Tensor, geometry: Geometry) -> Tensor:
    """Each window's sum of ``weights`` (zero padding stands for the -inf padding)."""
    kernel, stride, padding, dilation = geometry
    if halves(weights, geometry):
        return halving_sums(halving_sums(weights, -2), -1)
    if dilation == (1, 1):
        return F.avg_pool2d(weights, kernel, stride, padding, divisor_override=1)
    return F.conv2d(weights, ones_kernel(weights, kernel), None, stride, padding, dilation, weights.shape[1])


def offset_sum(t: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """Sum over ``dim`` as adds of its slices, into ``out`` or a fresh tensor: on VGG's 2x2 windows
    this takes the window totals in 32-38 ms where ``avg_pool2d`` takes 59 ms (8x64x224x224, 2 threads)."""
    parts = t.unbind(dim)
    if len(parts) == 1:
        return parts[0].clone() if out is None else out.copy_(parts[0])
    total = torch.add(parts[0], parts[1]) if out is None else torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        total.add_(part)
    return total


def repeat_columns(t: Tensor, times: int) -> Tensor:
    """``t`` with each column repeated ``times`` times: one row of tiling windows' values laid over the
    columns they cover. Always a fresh tensor, which the routing writes into (an expanded reshape would
    be a view of ``t`` when ``t`` has one column or ``times`` is 1)."""
    return t.repeat_interleave(times, dim=-1)
