"""Soft gates for elementwise activations (SPEC section 2).

Every rule keeps the forward bit-identical (it calls the original op) and
replaces the vector-Jacobian product by ``v * gate(x)``. For ReLU the gate is
Phi(x / tau): the probability that the unit is on when its input is perturbed by
N(0, tau^2) noise. The other piecewise-linear activations use the same
Gaussian-smoothed gates; SiLU and Mish soften their smooth gate by scaling its
argument (``sigmoid(x / tau)``), as SPEC prescribes for SiLU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .sources import Source

#: gate(source, tau, params) -> tensor of d(out)/d(in) surrogates, shaped like x.
Gate = Callable[[Source, float, dict[str, Any]], Tensor]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _phi(z: Tensor) -> Tensor:
    """Standard normal CDF, in place on a fresh tensor."""
    return torch.special.ndtr(z, out=z)


def relu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """Phi(x / tau): ReLU and GELU."""
    return _phi(src.scaled(1.0 / tau))


def leaky_relu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """s + (1 - s) * Phi(x / tau) for negative slope s."""
    s = float(params.get("negative_slope", 0.01))
    return _phi(src.scaled(1.0 / tau)).mul_(1.0 - s).add_(s)


def hardtanh_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """Phi((x - lo) / tau) - Phi((x - hi) / tau): smoothed indicator of lo < x < hi (ReLU6 too)."""
    lo, hi = float(params.get("min_val", -1.0)), float(params.get("max_val", 1.0))
    z = src.scaled(1.0 / tau)
    return torch.special.ndtr(z - lo / tau).sub_(_phi(z.sub_(hi / tau)))


def elu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """Blend of ELU's two branch derivatives (1 and alpha*exp(x)) by the soft gate Phi(x / tau)."""
    alpha = float(params.get("alpha", 1.0))
    x = src.value()
    p = torch.special.ndtr(x / tau)
    neg = torch.exp(torch.clamp(x, max=0.0)).mul_(alpha)
    return neg.mul_(1.0 - p).add_(p)


def silu_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """sigmoid(x / tau): SiLU's gate, not its derivative (SPEC)."""
    z = src.scaled(1.0 / tau)
    return torch.sigmoid(z, out=z)


def mish_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """tanh(softplus(x / tau)): Mish's gate softened like SiLU's."""
    return torch.tanh(torch.nn.functional.softplus(src.scaled(1.0 / tau)))


def _smoothed_ramp(m: Tensor, tau: float) -> Tensor:
    """E[max(0, m + tau * eps)] for eps ~ N(0, 1)."""
    u = m / tau
    density = torch.exp(-0.5 * u * u).mul_(_INV_SQRT_2PI * tau)
    return torch.special.ndtr(u).mul_(m).add_(density)


def hardswish_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """Gaussian-smoothed hardsigmoid gate E[hardsigmoid(x + tau*eps)] (x * gate is hardswish)."""
    x = src.value()
    return (_smoothed_ramp(x + 3.0, tau) - _smoothed_ramp(x - 3.0, tau)).div_(6.0)


def hardsigmoid_gate(src: Source, tau: float, params: dict[str, Any]) -> Tensor:
    """Gaussian-smoothed derivative of hardsigmoid: (Phi((x+3)/tau) - Phi((x-3)/tau)) / 6."""
    params = {"min_val": -3.0, "max_val": 3.0}
    return hardtanh_gate(src, tau, params).div_(6.0)


class SoftElementwise(torch.autograd.Function):
    """Forward: the original activation (bit-identical). Backward: ``v * gate(x)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        call: Callable[[Tensor], Tensor],
        gate: Gate,
        tau: float,
        params: dict[str, Any],
        source: Source,
        inplace: bool,
    ) -> Tensor:
        out = call(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.gate, ctx.tau, ctx.params, ctx.source = gate, tau, params, source
        return out

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        grad = ctx.gate(ctx.source, ctx.tau, ctx.params).mul_(v)
        return grad, None, None, None, None, None, None
