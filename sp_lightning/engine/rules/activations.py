"""Elementwise activations: soft gates, their autograd Function and their handlers (docs/method.md section 2).

Every rule keeps the forward bit-identical (it calls the original op) and
replaces the vector-Jacobian product by ``v * gate(x)``. For ReLU the gate is
Phi(x / tau): the probability that the unit is on when its input is perturbed by
N(0, tau^2) noise. The other piecewise-linear activations use the same
Gaussian-smoothed gates; SiLU and Mish soften their smooth gate by scaling its
argument (``sigmoid(x / tau)``), as the method prescribes for SiLU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interface import Handler, Scope, arg, derived, ensure_held, flush_tiny_, needs_soft, release
from .kernels import Scales, emit_cotangents, fused_gate_cotangents, fused_phi, fused_phi_cotangents
from .recipes import Source, Stored, detach_recipe, source_for

#: gate(source, tau, params) -> the surrogate derivative, a fresh tensor shaped like x (or, for ReLU
#: and GELU's eager gate, an ``ErfGate`` holding one).
Gate = Callable[[Source, float, dict[str, Any]], "Tensor | ErfGate"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def _phi_(z: Tensor) -> Tensor:
    """Standard normal CDF in place: Phi(z) = erfc(-z / sqrt(2)) / 2 (one fused op, unlike ``ndtr``)."""
    return z.mul_(-_INV_SQRT_2).erfc_().mul_(0.5)


@dataclass(frozen=True, eq=False)
class ErfGate:
    """The eager ReLU/GELU gate Phi(x / tau), held as ``erf(x / (tau sqrt 2))``: ``v * Phi`` is then
    ``(v + v * erf) / 2``, one ``addcmul`` and the halving folded into the terms' scales, where
    gate, flush, halving and product would take four passes. The erf form needs no flush: in float32
    ``1 + erf`` is exactly 0 or at least 2**-24 (the compiled kernels use the same form), and ATen's
    erf is faster than its erfc. One target and several use the same ops: bit-identical results."""

    erf: Tensor

    @classmethod
    def of(cls, src: Source, tau: float) -> "ErfGate":
        return cls(src.scaled(_INV_SQRT_2 / tau).erf_())

    def cotangents(self, v: Tensor, scales: Scales, owned: bool) -> tuple[Tensor, ...]:
        """``v * Phi`` passed on to each term; ``owned``: this is the gate's only use, so the result may
        take its memory (not while a higher-order graph is recorded: ``out=`` has no derivative)."""
        if owned and not torch.is_grad_enabled():
            twice = torch.addcmul(v, v, self.erf, out=self.erf)
        else:
            twice = torch.addcmul(v, v, self.erf)
        halves = tuple(0.5 if scale is None else scale * 0.5 for scale in scales)
        return tuple(twice * half for half in halves[:-1]) + (twice.mul_(halves[-1]),)


def relu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor | ErfGate:
    """Phi(x / tau): ReLU and GELU. One compiled kernel on large inputs (see ``kernels``), else eagerly
    as an :class:`ErfGate`, the constants folded into the one pass that recomputes x."""
    fused = fused_phi(src, tau)
    return fused if fused is not None else ErfGate.of(src, tau)


def leaky_relu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """s + (1 - s) * Phi(x / tau) for negative slope s."""
    s = float(params.get("negative_slope", 0.01))
    return _phi_(src.scaled(1.0 / tau)).mul_(1.0 - s).add_(s)


def _band(z: Tensor, lo: float, hi: float) -> Tensor:
    """Phi(z - lo) - Phi(z - hi): Gaussian-smoothed indicator of lo < z < hi (z consumed)."""
    upper = _phi_(z - lo)
    return upper.sub_(_phi_(z.sub_(hi)))


def hardtanh_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """Phi((x - lo) / tau) - Phi((x - hi) / tau): ReLU6 and hardtanh."""
    lo, hi = float(params.get("min_val", -1.0)), float(params.get("max_val", 1.0))
    return flush_tiny_(_band(src.scaled(1.0 / tau), lo / tau, hi / tau))


def elu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """ELU's branch derivatives (1 and alpha*exp(x)) blended by the soft gate Phi(x / tau)."""
    alpha = float(params.get("alpha", 1.0))
    x = src.value()
    p = _phi_(x / tau)
    neg = torch.exp(torch.clamp(x, max=0.0)).mul_(alpha)
    return flush_tiny_(neg.mul_(1.0 - p).add_(p))


def silu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """sigmoid(x / tau): SiLU's gate, not its derivative (docs/method.md section 2)."""
    return flush_tiny_(src.scaled(1.0 / tau).sigmoid_())


def mish_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """tanh(softplus(x / tau)): Mish's gate softened like SiLU's."""
    return flush_tiny_(torch.nn.functional.softplus(src.scaled(1.0 / tau)).tanh_())


def _smoothed_ramp(m: Tensor, tau: float) -> Tensor:
    """E[max(0, m + tau * eps)] for eps ~ N(0, 1)."""
    u = m / tau
    density = torch.exp(-0.5 * u * u).mul_(_INV_SQRT_2PI * tau)
    return _phi_(u).mul_(m).add_(density)


def hardswish_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """E[hardsigmoid(x + tau*eps)]: the Gaussian-smoothed gate of hardswish = x * hardsigmoid(x)."""
    x = src.value()
    return flush_tiny_(_smoothed_ramp(x + 3.0, tau).sub_(_smoothed_ramp(x - 3.0, tau)).div_(6.0))


def hardsigmoid_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """(Phi((x+3)/tau) - Phi((x-3)/tau)) / 6: Gaussian-smoothed derivative of hardsigmoid."""
    return flush_tiny_(_band(src.scaled(1.0 / tau), -3.0 / tau, 3.0 / tau).div_(6.0))


def _eager_cotangents(gv: Tensor, scales: Scales) -> tuple[Tensor, ...]:
    """``gv`` (a fresh tensor) passed on to each term; a single scaled term reuses its memory."""
    if len(scales) == 1 and scales[0] is not None:
        return (gv.mul_(scales[0]),)
    return emit_cotangents(gv, scales)


#: Gates with a kernel that fuses gate, product with the cotangent and hand-over to the terms.
_FUSED_COTANGENTS: dict[Gate, Callable[[Source, float, Tensor, Scales], tuple[Tensor, ...] | None]] = {
    relu_gate: fused_phi_cotangents
}


@dataclass(frozen=True, eq=False)
class GateSettings:
    """Everything ``SoftElementwise`` needs besides its tensors, as one value (no positional drift).

    ``early``: the op overwrites x in place and x has no recipe, so the gate is derived in the
    forward, before x is lost. That costs the same memory as keeping a copy of x for the backward,
    and one pass over x fewer.

    ``scales`` (with the recipe's term tensors as further inputs of the Function): x came from frozen
    eval BatchNorms (plus residuals), so the cotangent skips them and goes straight to their inputs,
    times each BatchNorm's scale, in the same pass that forms ``v * gate`` (no separate BatchNorm
    backward). ``None``: the cotangent goes to x.
    """

    call: Callable[[Tensor], Tensor]
    gate: Gate
    tau: float
    params: dict[str, Any]
    source: Source
    inplace: bool
    keep: bool
    early: bool
    scales: Scales | None


class SoftElementwise(torch.autograd.Function):
    """Forward: the original activation (bit-identical). Backward: ``v * gate(x)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, settings: GateSettings, *terms: Tensor) -> Tensor:  # type: ignore[override]
        source = settings.source
        if settings.early:
            ctx.kept, source = settings.gate(source, settings.tau, settings.params), None
        out = settings.call(x)
        if settings.inplace:
            ctx.mark_dirty(x)
        ctx.gate, ctx.tau, ctx.params, ctx.source, ctx.scales = (
            settings.gate, settings.tau, settings.params, source, settings.scales
        )
        ctx.keep, ctx.single_use = settings.keep, not (settings.keep or settings.early)
        return out

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        ensure_held(ctx)
        grads = _cotangents(ctx, v, ctx.scales if ctx.scales is not None else (None,))
        release(ctx, "source", "kept")
        if ctx.scales is None:  # one cotangent, for x
            return grads[0], None
        wanted = ctx.needs_input_grad[2:]  # the terms follow x and the settings
        return (None, None) + tuple(g if need else None for g, need in zip(grads, wanted))


def _cotangents(ctx: Any, v: Tensor, scales: Scales) -> tuple[Tensor, ...]:
    """``v * gate`` handed on to each term: one fused kernel where there is one, else gate, then product."""
    if ctx.single_use:
        fused = _FUSED_COTANGENTS.get(ctx.gate)
        grads = fused(ctx.source, ctx.tau, v, scales) if fused is not None else None
        if grads is not None:
            return grads
    factor = derived(ctx, lambda: ctx.gate(ctx.source, ctx.tau, ctx.params))
    if isinstance(factor, ErfGate):
        return factor.cotangents(v, scales, owned=ctx.single_use)
    if ctx.single_use:
        return _eager_cotangents(factor.mul_(v), scales)
    grads = fused_gate_cotangents(factor, v, scales)
    return grads if grads is not None else _eager_cotangents(factor * v, scales)


# --------------------------------------------------------------------------- handlers


@dataclass(frozen=True)
class _Activation:
    """How to read one activation callable: its rule, gate, parameters and in-place flag."""

    rule: str
    gate: Gate
    params: tuple[str, ...] = ()  # positional parameters after the input
    fixed: dict[str, float] = field(default_factory=dict)  # parameters implied by the callable
    inplace: bool | None = None  # True/False: always; None: read the ``inplace`` argument

    def __call__(self, scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
        x = arg(args, kwargs, 0, "input")
        tau = scope.rules.tau(self.rule)
        scope.softened(self.rule, tau)
        if tau is None or not needs_soft(x):
            return func(*args, **kwargs)
        values = {name: arg(args, kwargs, i + 1, name) for i, name in enumerate(self.params)}
        params = {k: v for k, v in values.items() if v is not None} | self.fixed
        inplace = self.inplace if self.inplace is not None else bool(arg(args, kwargs, len(self.params) + 1, "inplace"))
        source = source_for(x)
        rest = args[1:]

        def call(t: Tensor) -> Tensor:
            return func(t, *rest, **kwargs)

        scales, terms = _direct_terms(source)
        settings = GateSettings(
            call=call,
            gate=self.gate,
            tau=float(tau),
            params=params,
            source=source,
            inplace=inplace,
            keep=scope.rules.keep_derived,
            early=inplace and isinstance(source, Stored),  # x will be overwritten: derive the gate now
            scales=scales,
        )
        out = SoftElementwise.apply(x, settings, *terms)
        if inplace:
            detach_recipe(x)
        return out


def _direct_terms(source: Source) -> tuple[Scales | None, tuple[Tensor, ...]]:
    """Scales and tensors of the terms x's cotangent goes straight to, when x came from frozen eval
    BatchNorms (see ``GateSettings``); ``(None, ())`` when it goes to x itself."""
    if isinstance(source, Stored) or not source.direct():
        return None, ()
    terms = source.terms()
    return tuple(scale for _, scale, _ in terms), tuple(t for t, _, _ in terms)


def _table() -> dict[Any, Handler]:
    relu = _Activation("relu", relu_gate, inplace=False)
    relu_inplace = _Activation("relu", relu_gate, inplace=True)
    leaky = _Activation("leaky_relu", leaky_relu_gate, ("negative_slope",))
    leaky_inplace = _Activation("leaky_relu", leaky_relu_gate, ("negative_slope",), inplace=True)
    hardtanh = _Activation("hardtanh", hardtanh_gate, ("min_val", "max_val"))
    hardtanh_inplace = _Activation("hardtanh", hardtanh_gate, ("min_val", "max_val"), inplace=True)
    relu6 = _Activation("hardtanh", hardtanh_gate, fixed={"min_val": 0.0, "max_val": 6.0})
    elu = _Activation("elu", elu_gate, ("alpha",))
    elu_inplace = _Activation("elu", elu_gate, ("alpha",), inplace=True)
    return {
        F.relu: _Activation("relu", relu_gate),
        torch.relu: relu,
        Tensor.relu: relu,
        torch.relu_: relu_inplace,
        Tensor.relu_: relu_inplace,
        F.leaky_relu: leaky,
        F.leaky_relu_: leaky_inplace,
        F.hardtanh: hardtanh,
        F.hardtanh_: hardtanh_inplace,
        F.relu6: relu6,
        F.elu: elu,
        F.elu_: elu_inplace,
        F.gelu: _Activation("gelu", relu_gate, ("approximate",), inplace=False),
        F.silu: _Activation("silu", silu_gate),
        F.mish: _Activation("mish", mish_gate),
        F.hardswish: _Activation("hardswish", hardswish_gate),
        F.hardsigmoid: _Activation("hardsigmoid", hardsigmoid_gate),
    }


#: callable -> handler for the activations.
HANDLERS: dict[Any, Handler] = _table()
