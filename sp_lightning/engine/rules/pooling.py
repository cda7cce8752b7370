"""Soft max-pool backward and its handler (docs/method.md section 2).

The forward is the original ``max_pool2d``. The backward routes each output's
cotangent to its window with weights ``softmax(x_window / tau)`` (held
constant); overlapping windows add up. Padded positions are -inf, as in the
true max-pool, so they receive no weight; ``padding_mode="zeros"`` reproduces
the reference code, which pads the soft window with zeros.

Windows that tile the input (VGG's 2x2, stride 2) take each window's own maximum,
the pooled output, as the softmax shift (``_TiledRouting``). Other windows with
-inf padding are separable (``_SeparableRouting``): one shift per channel, window
sums and their transpose (pooling kernels, or a depthwise convolution when the
windows are dilated; for the stems' 3x3 windows at stride 2 on even sizes, adds
of the even and odd positions). Otherwise (zero padding, ceil_mode, extreme dynamic range)
``_PhaseRouting`` handles each window offset separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interface import Handler, Scope, arg, derived, ensure_held, flush_tiny_, needs_soft, release
from .kernels import CompiledKernel
from .windows import (
    Geometry,
    halves,
    halving_spread_times,
    offset_sum,
    pool_geometry,
    repeat_columns,
    spread,
    tiles,
    window_sums,
)


#: The separable path needs every window's softmax denominator above this many times the
#: smallest normal float: each window's largest weight is then a normal float, and the
#: subnormal weights it flushes to zero are below 1e-8 of their window's total.
_DENOMINATOR_MARGIN = 1e8


def _shifted_weights_body(x: Tensor, peak: Tensor, k: Tensor) -> Tensor:
    """exp((x - M) * k) with no subnormals left: the traced body of the compiled kernel."""
    weights = torch.exp((x - peak) * k)
    return torch.where(weights < torch.finfo(x.dtype).tiny, 0.0, weights)


_SHIFTED_WEIGHTS = CompiledKernel(_shifted_weights_body)


def _shifted_weights(x: Tensor, peak: Tensor, tau: float) -> Tensor:
    """exp((x - M) / tau) with no subnormals left; one compiled kernel on large inputs."""
    fused = _SHIFTED_WEIGHTS.maybe(x, x, peak, scalar=1.0 / tau)
    if fused is not None:
        return fused
    # x - M first, then / tau: folding both into one pass (x / tau - M / tau) cancels badly at small tau
    return torch.threshold_(torch.sub(x, peak).mul_(1.0 / tau).exp_(), torch.finfo(x.dtype).tiny, 0.0)


@dataclass(eq=False)
class _SeparableRouting:
    """Fast path: with one shift M per (sample, channel), exp((x - M) / tau) does not depend on the window.

    The softmax denominators are then a sum over each window (a depthwise convolution with a
    kernel of ones, zero padding standing for the -inf padding), and routing v back is that
    convolution's transpose, times the weights.
    """

    x: Tensor
    geometry: Geometry
    tau: float
    peak: Tensor
    reciprocal: Tensor  # 1 / window sums, shaped like the output
    spare: list[int]  # output padding of the transpose
    weights: Tensor  # exp((x - M) / tau), held for the backward pass(es)
    owned: bool  # one backward pass uses the routing: it may overwrite its tensors with the result
    compiled: bool  # the weights came from the compiled kernel, so the spread is compiled too

    @classmethod
    def build(
        cls, x: Tensor, out_size: torch.Size, geometry: Geometry, tau: float, keep: bool, compiled_only: bool = False
    ) -> "_SeparableRouting | None":
        """None when the output size needs ceil_mode or some window's denominator would underflow, and with
        ``compiled_only`` (the caller has a faster eager path) when the compiled kernel did not run."""
        kernel, stride, padding, dilation = geometry
        extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
        spare = [n + 2 * p - e - (o - 1) * s for n, p, e, o, s in zip(x.shape[-2:], padding, extent, out_size, stride)]
        if min(spare) < 0:  # ceil_mode: the last window hangs over the padded input
            return None
        if compiled_only and (keep or not _WINDOW_TOTALS.wanted(x)):
            return None
        peak = x.amax(dim=(-2, -1), keepdim=True)
        fused = None if keep else _WINDOW_TOTALS.maybe(x, x, peak, geometry, scalar=1.0 / tau)
        if fused is not None:
            total, weights = fused
        elif compiled_only:
            return None
        else:
            weights = _shifted_weights(x, peak, tau)
            total = window_sums(weights, geometry)
        if not bool((total > torch.finfo(x.dtype).tiny * _DENOMINATOR_MARGIN).all()):
            return None
        reciprocal = total.reciprocal_()
        return cls(x, geometry, tau, peak, reciprocal, spare, weights, owned=not keep, compiled=fused is not None)

    def route(self, v: Tensor) -> Tensor:
        """The weights times the spread of ``v / window sums``; when owned, written over the weights
        (the result needs no new input-sized tensor)."""
        routed = self.reciprocal.mul_(v) if self.owned else self.reciprocal * v
        if halves(self.x, self.geometry) and not (torch.is_grad_enabled() or _batched(routed)):
            # eager, and faster than the compiled spread below (resnet50's stem: 8 against 12-18 ms)
            return halving_spread_times(routed, self.weights, self.weights if self.owned else None)
        layout = (self.geometry, self.spare)
        if self.owned and self.compiled:
            fused = _SPREAD_INTO.follow(self.weights, routed, self.x, layout)
            if fused is not None:
                return fused
        spreads = spread(routed, self.x, *layout)
        return self.weights.mul_(spreads) if self.owned else spreads.mul_(self.weights)


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by the vmap of a backward batched across targets."""
    return torch._C._functorch.is_legacy_batchedtensor(t)


def _spread_into_body(weights: Tensor, routed: Tensor, x: Tensor, layout: tuple[Geometry, list[int]]) -> Tensor:
    """The spread cotangent times the weights, written over the weights: the traced body of the kernel."""
    return weights.mul_(spread(routed, x, *layout))


def _window_totals_body(x: Tensor, peak: Tensor, geometry: Geometry, k: Tensor) -> tuple[Tensor, Tensor]:
    """The softmax denominators of every window, and the weights: the traced body of the kernel."""
    weights = _shifted_weights_body(x, peak, k)
    return window_sums(weights, geometry), weights


_WINDOW_TOTALS = CompiledKernel(_window_totals_body)
_SPREAD_INTO = CompiledKernel(_spread_into_body)


@dataclass(eq=False)
class _TiledRouting:
    """Eager path for windows that tile x (kernel = stride, no padding or dilation, as in VGG): each
    window's own maximum, the pooled output, is its softmax shift.

    Every window's largest weight is then exactly 1, so no denominator can underflow and no
    max over x is taken. The weights are held as window rows, shaped (..., oh, kh, w). What each
    window shares (its maximum, then its routed cotangent) reaches them as a row of the
    ``columns`` buffer, each window's value repeated over its kw columns: the broadcast then runs
    along whole rows. Broadcasting a (..., oh, 1, ow, 1) tensor instead runs loops of kw elements:
    VGG's five pools at batch 8, 2 threads, took 336-377 ms that way against 261-293 ms (two runs).
    The same buffer takes the sums over each window's rows first. Eagerly faster than the separable
    code. Compiled, the separable kernels are faster than any compiled form of this one (at VGG's
    first pool: 68 ms against 105 ms or more), so tiling windows take them whenever they are compiled.
    """

    weights: Tensor  # exp((x - window max) / tau), shaped (..., oh, kh, w)
    reciprocal: Tensor  # 1 / window sums, shaped like the output
    columns: Tensor | None  # (..., oh, w) scratch for the owned route; None when kept or a graph is recorded
    shape: torch.Size  # x's shape

    @classmethod
    def build(cls, x: Tensor, out: Tensor, kernel: tuple[int, int], tau: float, keep: bool) -> "_TiledRouting":
        kh, kw = kernel
        rows = x.unflatten(-2, (out.shape[-2], kh))
        columns = repeat_columns(out, kw)
        # x - max first (exactly 0 at each window's maximum), then / tau: folding both into one pass
        # (x / tau - max / tau) cancels badly at small tau
        weights = flush_tiny_(torch.sub(rows, columns.unsqueeze(-2)).mul_(1.0 / tau).exp_())
        scratch = None if torch.is_grad_enabled() else columns  # ``out=`` records no graph
        row_sums = offset_sum(weights, -2, out=scratch)
        total = offset_sum(row_sums.unflatten(-1, (-1, kw)), -1)
        return cls(weights, total.reciprocal_(), None if keep else scratch, x.shape)

    def route(self, v: Tensor) -> Tensor:
        """The weights times each window's ``v / window sum``; when owned (one backward pass, no graph
        recorded, not batched), written over the weights and through the ``columns`` buffer."""
        kw = self.weights.shape[-1] // v.shape[-1]
        if self.columns is not None and not _batched(v):
            routed = self.reciprocal.mul_(v)
            self.columns.unflatten(-1, (-1, kw)).copy_(routed.unsqueeze(-1))
            return self.weights.mul_(self.columns.unsqueeze(-2)).reshape(self.shape)
        routed = repeat_columns(self.reciprocal * v, kw)
        return (self.weights * routed.unsqueeze(-2)).reshape(self.shape)


@dataclass(eq=False)
class _PhaseRouting:
    """General path (zero padding, ceil_mode, extreme dynamic range): softmax weights per window offset.

    The padded input is split once into its stride phases, so each kernel offset is a
    unit-stride slice (strided views run several times slower), and the pooled output,
    saved anyway by the next layer, is the softmax shift.
    """

    taps: list[tuple[int, int, int, int]]  # (row phase, row offset, column phase, column offset)
    plane_shapes: dict[tuple[int, int], torch.Size]
    padded_shape: torch.Size
    pads: tuple[int, int, int, int]
    stride: tuple[int, int]
    weights: list[Tensor]
    total: Tensor

    @classmethod
    def build(cls, x: Tensor, out: Tensor, geometry: Geometry, tau: float, padding_mode: str) -> "_PhaseRouting":
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry
        oh, ow = out.shape[-2:]
        h, w = x.shape[-2:]
        # Pad so every output window lies inside; a negative right pad crops rows no window reaches.
        need_h = (oh - 1) * sh + dh * (kh - 1) + 1
        need_w = (ow - 1) * sw + dw * (kw - 1) + 1
        pads = (pw, need_w - w - pw, ph, need_h - h - ph)
        xp = F.pad(x, pads, value=float("-inf") if padding_mode == "neginf" else 0.0)
        taps = [((i * dh) % sh, (i * dh) // sh, (j * dw) % sw, (j * dw) // sw) for i in range(kh) for j in range(kw)]
        planes = {(a, c): xp[..., a::sh, c::sw].mul(1.0 / tau).contiguous() for a, _, c, _ in taps}
        # The max of each window is the pooled output: a safe softmax shift (softmax is shift-invariant).
        shift = (out if padding_mode == "neginf" else out.clamp_min(0.0)).mul(1.0 / tau)
        weights = [
            flush_tiny_(torch.sub(planes[(a, c)][..., r : r + oh, q : q + ow], shift).exp_()) for a, r, c, q in taps
        ]
        total = weights[0].clone()
        for weight in weights[1:]:
            total.add_(weight)
        shapes = {key: plane.shape for key, plane in planes.items()}
        return cls(taps, shapes, xp.shape, pads, (sh, sw), weights, total)

    def route(self, v: Tensor) -> Tensor:
        oh, ow = v.shape[-2:]
        sh, sw = self.stride
        routed = v / self.total
        if _batched(v):
            return self._route_out_of_place(routed)
        # new_zeros, not torch.zeros: under a batched backward (vmap over targets) the buffers must carry the batch too
        grads = {key: routed.new_zeros(shape) for key, shape in self.plane_shapes.items()}
        for (a, r, c, q), weight in zip(self.taps, self.weights):
            grads[(a, c)][..., r : r + oh, q : q + ow].addcmul_(weight, routed)
        gp = routed.new_zeros(v.shape[:-2] + self.padded_shape[-2:])
        for (a, c), grad in grads.items():
            gp[..., a::sh, c::sw] = grad
        return F.pad(gp, tuple(-p for p in self.pads))

    def _route_out_of_place(self, routed: Tensor) -> Tensor:
        """:meth:`route` without writes into slices, which the batched backward across targets
        (``is_grads_batched``) cannot run: each tap's share is padded into place and summed, and each
        stride phase is interleaved into the padded input's grid by a reshape."""
        oh, ow = routed.shape[-2:]
        sh, sw = self.stride
        height, width = self.padded_shape[-2:]
        gp = None
        for (a, r, c, q), weight in zip(self.taps, self.weights):
            ph, pw = self.plane_shapes[(a, c)][-2:]
            share = F.pad(weight * routed, (q, pw - q - ow, r, ph - r - oh))  # in the plane's grid
            stuffed = F.pad(share[..., :, None, :, None], (c, sw - 1 - c, 0, 0, a, sh - 1 - a))
            placed = stuffed.reshape(*share.shape[:-2], ph * sh, pw * sw)
            placed = F.pad(placed, (0, width - pw * sw, 0, height - ph * sh))
            gp = placed if gp is None else gp + placed
        assert gp is not None
        return F.pad(gp, tuple(-p for p in self.pads))


def soft_maxpool_routing(
    x: Tensor,
    *,
    pooled: Callable[[], Tensor],
    out_size: torch.Size,
    geometry: Geometry,
    tau: float,
    padding_mode: str,
    keep: bool,
) -> _TiledRouting | _SeparableRouting | _PhaseRouting:
    """How cotangents go back through the soft windows of ``x``.

    ``pooled`` returns the max-pool output (only the general path needs it), ``out_size`` is its
    spatial size. ``keep``: the routing will serve several backward passes, so hold the window weights.
    """
    if tiles(x, geometry):  # no padding: both padding modes agree
        fast = _SeparableRouting.build(x, out_size, geometry, tau, keep, compiled_only=True)
        return fast if fast is not None else _TiledRouting.build(x, pooled(), geometry[0], tau, keep)
    if padding_mode == "neginf":
        fast = _SeparableRouting.build(x, out_size, geometry, tau, keep)
        if fast is not None:
            return fast
    return _PhaseRouting.build(x, pooled(), geometry, tau, padding_mode)


class SoftMaxPool2d(torch.autograd.Function):
    """Forward: the original max-pool (values and indices). Backward: soft window routing."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        call: Any,
        geometry: Geometry,
        tau: float,
        padding_mode: str,
        keep: bool,
    ) -> Any:
        out = call(x)
        pooled = out[0] if isinstance(out, tuple) else out
        # The pooled output is held as a detached alias, not saved: the model may change it in place
        # afterwards (``x = pool(x); x += skip``), which the plain max-pool allows; the backward then
        # recomputes it. The alias shares the output's storage (which the next layer saves anyway) and
        # version counter, and has no graph, so it makes no reference cycle.
        ctx.save_for_backward(x)
        ctx.pooled, ctx.pooled_version, ctx.call = pooled.detach(), pooled._version, call
        ctx.geometry, ctx.tau, ctx.padding_mode, ctx.keep = geometry, tau, padding_mode, keep
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def _pooled(ctx: Any, x: Tensor) -> Tensor:
        """The forward's max-pool output: the tensor itself while unchanged, else recomputed from x."""
        if ctx.pooled._version == ctx.pooled_version:
            return ctx.pooled
        with torch.no_grad():
            out = ctx.call(x)
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def backward(ctx: Any, v: Tensor, *unused: Any) -> tuple[Tensor | None, ...]:
        ensure_held(ctx)
        squeeze = v.dim() == 3

        def routing() -> _TiledRouting | _SeparableRouting | _PhaseRouting:
            (x,) = ctx.saved_tensors

            def pooled() -> Tensor:
                out = SoftMaxPool2d._pooled(ctx, x)
                return out.unsqueeze(0) if squeeze else out

            return soft_maxpool_routing(
                x.unsqueeze(0) if squeeze else x,
                pooled=pooled,
                out_size=v.shape[-2:],
                geometry=ctx.geometry,
                tau=ctx.tau,
                padding_mode=ctx.padding_mode,
                keep=ctx.keep,
            )

        grad = derived(ctx, routing).route(v.unsqueeze(0) if squeeze else v)
        release(ctx, "pooled", "call", "kept")
        return (grad.squeeze(0) if squeeze else grad), None, None, None, None, None


def _max_pool2d(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    x = arg(args, kwargs, 0, "input")
    tau = scope.rules.tau("maxpool")
    scope.softened("maxpool", tau)
    if tau is None or not needs_soft(x):
        return func(*args, **kwargs)
    geometry = pool_geometry(
        arg(args, kwargs, 1, "kernel_size"),
        arg(args, kwargs, 2, "stride"),
        arg(args, kwargs, 3, "padding", 0),
        arg(args, kwargs, 4, "dilation", 1),
    )
    rest = args[1:]
    return SoftMaxPool2d.apply(
        x, lambda t: func(t, *rest, **kwargs), geometry, tau, scope.rules.maxpool_padding, scope.rules.keep_derived
    )


#: callable -> handler for 2-D max pooling.
HANDLERS: dict[Any, Handler] = dict.fromkeys((F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d), _max_pool2d)
